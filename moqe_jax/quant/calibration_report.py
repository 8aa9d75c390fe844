"""What a GPTQ calibration run did, per layer and overall (returned by ``moqe_jax.calibration.gptq_quantize_model``)."""

from __future__ import annotations

import dataclasses
import resource
import sys
from dataclasses import dataclass, field

__all__ = ["LayerReport", "CalibrationReport", "peak_rss_mb"]


@dataclass
class LayerReport:
    """One compressed FFN (a sparse layer's experts or a dense layer's MLP)."""

    name: str
    kind: str
    tokens: int = 0
    experts: int = 0
    solved: int = 0
    fallbacks: int = 0
    zero_token: int = 0
    capped: int = 0
    rel_err_gptq: float = float("nan")
    rel_err_rtn: float = float("nan")
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


@dataclass
class CalibrationReport:
    layers: list[LayerReport] = field(default_factory=list)
    total_s: float = 0.0
    peak_rss_mb: float = 0.0
    resumed_layers: int = 0
    warnings: list[str] = field(default_factory=list)

    def table(self) -> str:
        """Plain-text table: per layer experts solved / fallbacks / zero-token and rel. error GPTQ vs RTN."""
        head = f"{'layer':34s} {'kind':7s} {'tokens':>8s} {'solved':>7s} {'RTN-fb':>7s} {'0-tok':>6s} " \
               f"{'relerr GPTQ':>11s} {'relerr RTN':>10s} {'time s':>7s}"
        rows = [head, "-" * len(head)]
        for r in self.layers:
            rows.append(f"{r.name:34s} {r.kind:7s} {r.tokens:8d} {r.solved:4d}/{r.experts:<2d} {r.fallbacks:7d} "
                        f"{r.zero_token:6d} {r.rel_err_gptq:11.4f} {r.rel_err_rtn:10.4f} {r.seconds:7.1f}")
            rows.extend(f"    ! {n}" for n in r.notes)
        rows.append(f"total {self.total_s:.1f} s, peak RSS {self.peak_rss_mb:.0f} MB"
                    + (f", resumed after {self.resumed_layers} layer(s)" if self.resumed_layers else ""))
        rows.extend(f"warning: {w}" for w in self.warnings)
        return "\n".join(rows)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def peak_rss_mb() -> float:
    """Peak resident set size of this process (MB)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024.0 if sys.platform != "darwin" else r / 2**20
