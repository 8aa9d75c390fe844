"""``--weight-layout bytes|words`` on the commands that run a model (``moqe eval``): ``load_model_args`` repacks the
loaded model's QuantizedTensor weights once into the kernels' word layout; logits are unchanged."""

from __future__ import annotations

import jax
import numpy as np

from moqe_jax import QuantSpec, load_model, quantize, save_model
from moqe_jax.cli import build_parser
from moqe_jax.commands.common import load_model_args
from moqe_jax.data.locate import BUNDLED
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
