"""``--weight-layout bytes|words`` on the commands that run a model (``moqe eval``, ``moqe demo``) and
``load_model(weight_layout=)`` behind it: the loaded model's QuantizedTensor weights are repacked once into the
kernels' word layout; logits are unchanged."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from moqe_jax import QuantSpec, load_model, quantize, save_model
from moqe_jax.cli import build_parser
from moqe_jax.commands.common import load_model_args
from moqe_jax.data.locate import BUNDLED
from moqe_jax.errors import ConfigError
from moqe_jax.packed.qtensor import QuantizedTensor


def _layouts(model) -> set[str]:
    leaves = jax.tree_util.tree_leaves(model.params, is_leaf=lambda x: isinstance(x, QuantizedTensor))
    return {x.layout for x in leaves if isinstance(x, QuantizedTensor)}


def test_weight_layout_flag_reaches_the_model(tmp_path, seed):
    q4 = tmp_path / "q4"
    save_model(quantize(load_model(BUNDLED / "moe"), QuantSpec(bits=4)), str(q4))
    parser = build_parser()
    bytes_m = load_model_args(parser.parse_args(["eval", str(q4)]))  # default: the stored byte layout
    words_m = load_model_args(parser.parse_args(["eval", str(q4), "--weight-layout", "words"]))
    assert _layouts(bytes_m) == {"bytes"} and _layouts(words_m) == {"words"}
    rng = np.random.default_rng(seed)
    ids, dec = rng.integers(2, bytes_m.config.vocab_size, (2, 9)), rng.integers(2, bytes_m.config.vocab_size, (2, 5))
    np.testing.assert_array_equal(np.asarray(words_m.logits(ids, dec)), np.asarray(bytes_m.logits(ids, dec)))


def test_load_model_weight_layout(tmp_path, seed):
    """``load_model(weight_layout=)``: None keeps the stored layout, "words"/"bytes" repack (both ways, same logits
    in XLA mode); a bad value is one ConfigError before anything is read; the CLI flag reaches ``moqe demo``."""
    q2 = tmp_path / "q2"
    save_model(quantize(load_model(BUNDLED / "moe"), QuantSpec(bits=2)).with_weight_layout("words"), str(q2))
    stored = load_model(q2)  # saved in words: kept as stored
    bytes_m = load_model(q2, weight_layout="bytes").with_kernels("xla")
    words_m = load_model(q2, weight_layout="words").with_kernels("xla")
    assert _layouts(stored) == {"words"} and _layouts(bytes_m) == {"bytes"} and _layouts(words_m) == {"words"}
    rng = np.random.default_rng(seed)
    ids, dec = rng.integers(2, bytes_m.config.vocab_size, (2, 7)), rng.integers(2, bytes_m.config.vocab_size, (2, 4))
    np.testing.assert_array_equal(np.asarray(words_m.logits(ids, dec)), np.asarray(bytes_m.logits(ids, dec)))
    with pytest.raises(ConfigError, match="weight_layout must be None, 'bytes' or 'words', got 'nibbles'"):
        load_model(tmp_path / "does-not-exist", weight_layout="nibbles")
    demo = build_parser().parse_args(["demo", "--weight-layout", "words"])
    assert demo.weight_layout == "words" and build_parser().parse_args(["demo"]).weight_layout is None
