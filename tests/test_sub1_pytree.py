"""Sub1Tensor is a pytree aligned on the expert axis: vmap, scan, st[i] under jit and expert sharding
give the same weights as eager per-expert decoding; the stored (flat) layout is a traceable view."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np

from moqe_jax.packed.qtensor import QuantizedTensor
from moqe_jax.packed.spec import QuantSpec
from moqe_jax.packed.sub1 import Sub1Tensor
from moqe_jax.quant.sub1 import encode


def make(seed, shape=(4, 40, 12), p0=0.85):
    rng = np.random.default_rng(seed)
    codes = rng.choice(3, size=shape, p=[p0, (1 - p0) / 2, (1 - p0) / 2]).astype(np.uint8)
    g = (*shape[:-2], 1, shape[-1])
    qt = QuantizedTensor.from_codes(codes, rng.uniform(0.1, 1, g), -rng.uniform(0.1, 1, g), QuantSpec(bits="ternary"))
    return encode(qt), np.asarray(qt.dequantize())


def test_leaves_aligned_on_experts(seed):
    st, _ = make(seed)
    e, k, n = st.shape
    assert st.codewords.shape[0] == e and st.offsets.shape == (e, n + 1) and st.scales.shape == (e, n)
    assert all(leaf.shape[0] == e for leaf in jax.tree_util.tree_leaves(st))


def test_vmap_over_experts_equals_per_expert(seed):
    st, w = make(seed)
    got = jax.vmap(lambda s: s.dequantize())(st)
    per = np.stack([np.asarray(st[i].dequantize()) for i in range(st.shape[0])])
    np.testing.assert_array_equal(np.asarray(got), per)
    np.testing.assert_array_equal(per, w)


def test_getitem_under_jit_equals_eager(seed):
    st, w = make(seed)
    f = jax.jit(lambda s, i: s[i].dequantize())
    for i in range(st.shape[0]):
        np.testing.assert_array_equal(np.asarray(f(st, i)), np.asarray(st[i].dequantize()))
        np.testing.assert_array_equal(np.asarray(f(st, i)), w[i])
    np.testing.assert_array_equal(np.asarray(jax.jit(lambda s: s[1:3].dequantize())(st)), w[1:3])


def test_scan_over_experts(seed):
    st, w = make(seed)

    def body(acc, s):
        d = s.dequantize()
        return acc + d.sum(), d

    total, ws = jax.lax.scan(body, jnp.float32(0), st)
    np.testing.assert_array_equal(np.asarray(ws), w)
    np.testing.assert_allclose(float(total), w.sum(), rtol=1e-5)


def test_flat_view_traced_matches_stored_layout(seed):
    """flat_arrays() under jit: compacted codewords, global offsets equal to the stored ones."""
    st, _ = make(seed, shape=(2, 3, 33, 8))
    stream, row_off, _, _ = st.flat_arrays()
    ts, tr, _, _ = jax.jit(lambda s: s.flat_arrays())(st)
    np.testing.assert_array_equal(np.asarray(tr), row_off)
    np.testing.assert_array_equal(np.asarray(ts)[:stream.size], stream)
    arrays, meta = st.to_arrays()
    np.testing.assert_array_equal(arrays["stream"], stream)
    back = Sub1Tensor.from_arrays(arrays, meta)
    np.testing.assert_array_equal(np.asarray(back.codewords), np.asarray(st.codewords))


_SHARDED = textwrap.dedent("""
    import sys
    import jax, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    sys.path.insert(0, "tests")
    from test_sub1_pytree import make
    assert jax.device_count() == 4, jax.devices()
    st, w = make(int(sys.argv[1]))
    mesh = Mesh(np.array(jax.devices()), ("expert",))
    sh = jax.device_put(st, NamedSharding(mesh, P("expert")))
    assert len(sh.codewords.sharding.device_set) == 4 and sh.codewords.sharding.spec == P("expert")
    got = jax.jit(lambda s: s.dequantize())(sh)
    np.testing.assert_array_equal(np.asarray(got), w)
    one = jax.jit(lambda s, i: s[i].dequantize())(sh, 2)
    np.testing.assert_array_equal(np.asarray(one), w[2])
    print("ok")
""")


def test_expert_sharded_on_forced_cpu_mesh(seed):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", _SHARDED, str(seed)], cwd=root, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]
