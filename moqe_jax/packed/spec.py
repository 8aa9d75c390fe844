"""`QuantSpec`: how one weight tensor is quantized (docs/ARCHITECTURE.md, "the one contract").

MoQE (Kim et al. 2023, §3): weight-only, channel-wise (one scale per *output* channel), linear or
log-scale, 8/4/3/2 bits. QMoE (Frantar & Alistarh 2023, §3.2 / docs/QMOE.md §1.1): per-row min-max
grids, 2-bit asymmetric and ternary ``{w_min, 0, w_max}``.

Weights follow the Flax/T5X convention ``[..., K, N]`` = ``[..., in, out]``; the "channel" is the last
axis N, groups run along K. The exact storage layout is docs/FORMATS.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Bits = Literal[8, 4, 3, 2, "ternary"]
SUPPORTED_BITS: tuple[object, ...] = (8, 4, 3, 2, "ternary")
_BITS: dict[object, Bits] = {8: 8, 4: 4, 3: 3, 2: 2, "ternary": "ternary", "tern": "ternary", "1.5": "ternary"}


def as_bits(bits: object) -> Bits:
    """``bits`` as a :data:`Bits` value: ints, their strings (``"4"``) and ``"ternary"``/``"tern"``/``"1.5"``."""
    key = int(bits) if isinstance(bits, str) and bits.isdigit() else bits
    if isinstance(key, bool) or key not in _BITS:
        raise ValueError(f"unsupported bits={bits!r}; choose one of 8, 4, 3, 2, 'ternary'")
    return _BITS[key]


@dataclass(frozen=True)
class QuantSpec:
    """Static, hashable description of a quantizer (usable as a jit static argument).

    Args:
      bits: 8, 4, 3, 2 or ``"ternary"``.
      scheme: ``"linear"`` (uniform grid) or ``"log"`` (sign + power-of-two magnitudes, Aji & Heafield
        2020 / Marian, as used by MoQE). Ternary ignores ``scheme`` (it is its own 3-level grid).
      granularity: ``"channel"`` (one scale per output channel) or an int group size along K
        (also accepted: the string ``"group:128"``).
      symmetric: linear only. True = absmax grid with a fixed mid-point zero (MoQE /
        FasterTransformer); False = min-max grid with a per-channel integer zero-point (GPTQ/QMoE).
      mse: linear: grid-search the clipping range (GPTQ reference quantizer: shrink factors
        1.00 → 0.21 in steps of 0.01, error ``Σ|q−w|^2.4``); log: Marian's least-squares scale
        refinement; ternary: the same shrink search on the {w_min, 0, w_max} grid (our extension).
    """

    bits: Bits = 4
    scheme: Literal["linear", "log"] = "linear"
    granularity: str | int = "channel"
    symmetric: bool = True
    mse: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "bits", as_bits(self.bits))
        if self.scheme not in ("linear", "log"):
            raise ValueError(f"unsupported scheme={self.scheme!r}; choose 'linear' or 'log'")
        g = self.granularity
        if isinstance(g, str) and g != "channel":
            if g.startswith("group:") and g[6:].isdigit():
                object.__setattr__(self, "granularity", int(g[6:]))
            elif g.isdigit():
                object.__setattr__(self, "granularity", int(g))
            else:
                raise ValueError(f"granularity must be 'channel' or a group size, got {g!r}")
        g = self.granularity
        if isinstance(g, int) and (isinstance(g, bool) or g <= 0 or g % 8):
            raise ValueError(f"group size must be a positive multiple of 8, got {g!r}")
        if self.scheme == "log" and self.bits == "ternary":
            object.__setattr__(self, "scheme", "linear")
        if self.scheme == "log" and self.bits == 8:
            pass  # allowed: 1 sign bit + 7 exponent bits

    # ---- derived, static -------------------------------------------------------------------
    @property
    def is_ternary(self) -> bool:
        return self.bits == "ternary"

    @property
    def code_bits(self) -> int:
        """Bits of one stored code (ternary codes take 2 bits in a QuantizedTensor)."""
        return 2 if self.is_ternary else int(self.bits)

    @property
    def code_scheme(self) -> str:
        """Code format for ``pallas_kernels.codes``: ``"linear"``, ``"log"`` or ``"ternary"``."""
        return "ternary" if self.is_ternary else self.scheme

    @property
    def nominal_bits(self) -> float:
        """Information bits per weight used in reports (ternary = log2(3))."""
        return 1.584962500721156 if self.is_ternary else float(self.bits)

    @property
    def maxq(self) -> int:
        return 2 if self.is_ternary else (1 << int(self.bits)) - 1

    @property
    def has_zeros(self) -> bool:
        """Whether a per-channel ``zeros`` array is stored (asymmetric linear, ternary's low level)."""
        return self.is_ternary or (self.scheme == "linear" and not self.symmetric)

    def group_size(self, k: int) -> int:
        """Group length along K (K itself for channel-wise)."""
        return k if self.granularity == "channel" else int(self.granularity)

    def num_groups(self, k: int) -> int:
        gs = self.group_size(k)
        if k % gs:
            raise ValueError(f"group size {gs} does not divide the input dimension {k}")
        return k // gs

    def describe(self) -> str:
        b = "ternary" if self.is_ternary else f"int{self.bits}"
        g = "channel" if self.granularity == "channel" else f"g{self.granularity}"
        s = "" if self.is_ternary else ("-" + self.scheme + ("" if self.scheme == "log" else
                                                          ("-sym" if self.symmetric else "-asym")))
        return f"{b}{s}-{g}" + ("-mse" if self.mse else "")

    def to_dict(self) -> dict:
        return {"bits": self.bits, "scheme": self.scheme, "granularity": self.granularity,
                "symmetric": self.symmetric, "mse": self.mse}

    @classmethod
    def from_dict(cls, d: dict) -> QuantSpec:
        return cls(**{k: d[k] for k in ("bits", "scheme", "granularity", "symmetric", "mse") if k in d})
