"""`moqe plan` / `moqe_jax.plan`: per-device memory from abstract shapes, checked against XLA's compiled memory
analysis on forced CPU meshes (docs/MEMORY_PLAN.md says exactly what is compared)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from moqe_jax.cli import main
from moqe_jax.config import SwitchConfig
from moqe_jax.errors import ConfigError, MoqeError
from moqe_jax.plan import candidate_meshes, parse_bytes, plan_memory


def test_param_bytes_split_experts_over_the_expert_axis():
    cfg = SwitchConfig.preset("tiny")
    one = plan_memory(cfg, "", "train", batch=4, length=8)
    two = plan_memory(cfg, "expert=2", "train", batch=4, length=8)
    # independent count from the config: every sparse layer holds wi [E, D, F] and wo [E, F, D] in f32
    n_sparse = len(cfg.sparse_layers("encoder")) + len(cfg.sparse_layers("decoder"))
    expert_bytes = n_sparse * 2 * cfg.num_experts * cfg.d_model * cfg.d_ff * 4
    assert one.rows["params"] - two.rows["params"] == expert_bytes // 2
    assert one.rows["gradients"] == one.rows["params"]
    # activations are split over data × expert: twice the devices on the batch, half the bytes (±rounding)
    four = plan_memory(cfg, "data=2,expert=2", "train", batch=4, length=8)
    assert abs(four.rows["activations"] * 4 - one.rows["activations"]) <= 4 * len(four.rows) * 64


def test_generate_and_gptq_categories():
    cfg = SwitchConfig.preset("tiny")
    g = plan_memory(cfg, "data=2", "generate", batch=4, length=8, decode_length=16, bits=4)
    # KV cache: (self 16 + cross 8 positions) × k,v × heads × d_kv × bf16 × rows per device × decoder layers
    assert g.rows["kv cache"] == (16 + 8) * 2 * cfg.num_heads * cfg.d_kv * 2 * 2 * cfg.num_decoder_layers
    assert g.rows["packed params"] > 0
    q = plan_memory(cfg, "expert=2", "gptq", group_experts=4)
    k = max(cfg.d_ff, cfg.d_model)
    assert q.rows["hessians"] == 2 * k * k * 4  # 4 experts per call over 2 devices, [K, K] f32 each


def test_fit_verdict_and_smallest_mesh():
    cfg = SwitchConfig.preset("tiny")
    single = plan_memory(cfg, "", "train", batch=8, length=16)
    budget = int(single.total * 0.6)
    plan = plan_memory(cfg, "", "train", batch=8, length=16, device_memory=budget)
    assert plan.fits is False and plan.suggestion is not None
    assert plan.suggestion_total is not None and plan.suggestion_total <= budget
    n = math.prod(plan.suggestion.values())
    # brute force: no mesh with fewer devices fits
    for sizes in candidate_meshes(cfg, "train", 8):
        if math.prod(sizes.values()) < n:
            assert plan_memory(cfg, sizes, "train", batch=8, length=16, suggest=False).total > budget
    assert plan_memory(cfg, "", "train", batch=8, length=16, device_memory=single.total).fits is True


def test_parse_bytes():
    assert parse_bytes("80GB") == 80 * 10**9
    assert parse_bytes("80GiB") == 80 * 2**30
    assert parse_bytes("512 MiB") == 512 * 2**20
    for bad in ("eighty", "80XB", "-1GB", "0"):
        with pytest.raises(ConfigError, match="--device-memory"):
            parse_bytes(bad)


def test_cli_table_and_json(capsys):
    assert main(["plan", "--preset", "tiny", "--mesh", "data=2,expert=2", "--job", "qat", "--batch", "8",
                 "--length", "16", "--device-memory", "1GB"]) == 0
    out = capsys.readouterr().out
    assert "tiny qat: mesh data=2,expert=2,model=1 (4 devices)" in out and "fits in" in out
    assert main(["plan", "--preset", "tiny", "--job", "generate", "--batch", "2", "--length", "8", "--json",
                 "--device-memory", "10KB"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["fits"] is False and d["total_bytes"] == sum(d["per_device_bytes"].values())
    assert d["suggested_mesh"] is None or d["suggested_total_bytes"] <= 10_000


@pytest.mark.parametrize("argv, msg", [
    (["--preset", "no-such-preset", "--job", "train"], "no-such-preset"),
    (["--preset", "tiny", "--mesh", "data=two", "--job", "train"], "bad mesh spec"),
    (["--preset", "tiny", "--mesh", "expert=8", "--job", "train"], "num_experts=4 is not divisible"),
    (["--preset", "tiny", "--mesh", "data=3", "--job", "train", "--batch", "4"], "not divisible"),
    (["--preset", "tiny", "--job", "gptq", "--bits", "5"], "--bits"),
    (["--job", "train"], "needs --preset"),
])
def test_bad_input_is_one_clear_error(argv, msg, capsys):
    assert main(["plan", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("moqe: error:") and msg in err and "\n" not in err


def test_bad_mesh_is_a_moqe_error():
    with pytest.raises(MoqeError, match="num_experts=4"):
        plan_memory(SwitchConfig.preset("tiny"), "expert=8", "train")


# One subprocess, 8 forced CPU devices: the plan's per-device total vs the compiled executable's
# argument + output − aliased + temp bytes, for the project's own train/QAT step, greedy generation and the
# batched GPTQ solve (docs/MEMORY_PLAN.md "Validation").
_COMPARE = r'''
import json, sys
import jax, jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
from moqe_jax import sharding as shd
from moqe_jax.config import SwitchConfig
from moqe_jax.plan import plan_memory

def total(c):
    m = c.memory_analysis()
    return m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes

def sds(x, s):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)

def train(cfg, mesh_s, B, L, bits):
    from moqe_jax.model.switch import init_params
    from moqe_jax.training import loop
    from moqe_jax.training.config import TrainConfig
    mesh = shd.make_mesh(mesh_s)
    tx, jstep, _, ss = loop._compiled(cfg, TrainConfig(batch_size=B, mesh=shd.parse_mesh(mesh_s), qat_bits=bits), mesh)
    p = jax.eval_shape(lambda: init_params(cfg, 0))
    st = jax.tree.map(sds, {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": p,
                            "opt_state": jax.eval_shape(tx.init, p), "rng": jax.ShapeDtypeStruct((2,), jnp.uint32)}, ss)
    bs = shd.batch_sharding(mesh)
    b = {k: jax.ShapeDtypeStruct((B, L), jnp.float32 if k == "weights" else jnp.int32, sharding=bs)
         for k in ("input_ids", "decoder_input_ids", "targets", "weights")}
    return total(jstep.lower(st, b).compile())

def generate(cfg, mesh_s, B, L, bits, dlen):
    from moqe_jax.model import decode
    from moqe_jax.model.switch import init_params
    from moqe_jax.packed.spec import QuantSpec
    from moqe_jax.quant.policy import quantize_params
    mesh = shd.make_mesh(mesh_s)
    q = jax.eval_shape(lambda: quantize_params(init_params(cfg, 0), QuantSpec(bits=bits), ("experts",)))
    bs = shd.batch_sharding(mesh)
    ids = jax.ShapeDtypeStruct((B, L), jnp.int32, sharding=bs)
    mask = jax.ShapeDtypeStruct((B, L), jnp.bool_, sharding=bs)
    rv = jax.ShapeDtypeStruct((B,), jnp.bool_, sharding=NamedSharding(mesh, P(bs.spec[0])))
    sc = jax.ShapeDtypeStruct((), jnp.int32)
    run_cfg = cfg.replace(routing_mode=decode.generation_routing_mode(cfg, None))
    c = decode.greedy_search.lower(run_cfg, jax.tree.map(sds, q, shd.param_shardings(q, mesh)), ids, dlen, mask, rv,
                                   sc, sc, sc, kernels="xla").compile()
    return total(c)

def gptq(cfg, mesh_s, bits, group):
    from moqe_jax.packed.spec import QuantSpec
    from moqe_jax.quant.gptq import _batched_fn
    mesh = shd.make_mesh(mesh_s)
    nd = mesh.shape["expert"]
    grp = -(-min(group, cfg.num_experts) // nd) * nd
    k, n = max((cfg.d_ff, cfg.d_model), (cfg.d_model, cfg.d_ff))
    fn = _batched_fn(QuantSpec(bits=bits), 0.1, 128, False, 1, mesh, "expert", "zero", True)
    sh = NamedSharding(mesh, P("expert"))
    args = [jax.ShapeDtypeStruct(s, d, sharding=sh) for s, d in (((grp, k, n), jnp.float32),
                                                                 ((grp, k, k), jnp.float32), ((grp, k), jnp.int32))]
    return total(fn.lower(*args).compile())

cfg = SwitchConfig.preset("small-mt", num_layers=2, num_decoder_layers=2)
out = []
for job, mesh_s, kw in [("train", "data=2,expert=2", dict(B=16, L=64)),
                        ("qat", "data=2,expert=2", dict(B=16, L=64, bits=2)),
                        ("train", "data=2,expert=2,model=2", dict(B=16, L=64)),
                        ("generate", "data=2,expert=2", dict(B=8, L=32, bits=4, dlen=32)),
                        ("gptq", "expert=4", dict(bits=2, group=16)),
                        ("gptq", "expert=8", dict(bits=4, group=16))]:
    plan = plan_memory(cfg, mesh_s, job, batch=kw.get("B", 8), length=kw.get("L", 16), bits=kw.get("bits"),
                       decode_length=kw.get("dlen"), group_experts=kw.get("group", 16)).total
    if job in ("train", "qat"):
        got = train(cfg, mesh_s, kw["B"], kw["L"], kw.get("bits"))
    elif job == "generate":
        got = generate(cfg, mesh_s, kw["B"], kw["L"], kw["bits"], kw["dlen"])
    else:
        got = gptq(cfg, mesh_s, kw["bits"], kw["group"])
    out.append({"job": job, "mesh": mesh_s, "plan": plan, "compiled": got})
print("RESULT " + json.dumps(out))
'''


def test_plan_matches_compiled_memory_analysis_on_8_cpu_devices():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    run = subprocess.run([sys.executable, "-c", _COMPARE], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = json.loads(run.stdout.split("RESULT ", 1)[1])
    assert len(rows) == 6
    for r in rows:
        assert abs(r["plan"] - r["compiled"]) <= 0.10 * r["compiled"], (r, rows)
