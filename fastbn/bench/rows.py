"""One measured row, and the versioned results record it is saved in.

Every driver (the pass section, the layer section, the fused section) produces :class:`Row`
objects; rendering, plotting and the target checks read only rows. The JSON layout is
``SCHEMA`` and is documented field by field in bench/README.md ("JSON schema").
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .cases import Case
from .stats import Ratio

SCHEMA = "fastbn-bench/2"

# Sections of a run: the functional API's passes against naive NumPy, PyTorch and the memory
# roofline; the layer API at small training shapes; the fused BN+ReLU(+add) passes.
SECTIONS: tuple[str, ...] = ("pass", "layer", "fused")


@dataclass
class Row:
    """The timing of one implementation on one (section, operation, case, dtype).

    Times are seconds per call. ``speedups`` maps a reference implementation to how many times
    faster this row is than it (the reference's median over this row's median, with a 95 %
    bootstrap interval): ``"numpy"`` (naive NumPy), ``"torch"`` (PyTorch on the same device),
    ``"numpy-layer"`` (the CS231n-style layer), ``"unfused"`` (fastbn BN, then NumPy add/ReLU).
    ``ceiling_percent`` is the % of roofline the operation could reach at the same streams'
    rates (:meth:`fastbn.bench.roofline.Bandwidth.attainable_percent`).
    ``memory`` is the pass's regime (``"cache"``, ``"mixed"``, ``"dram"``; see
    :func:`fastbn.bench.roofline.memory_regime`) or None where the roofline does not apply.
    """

    section: str
    implementation: str
    operation: str
    case: str
    shape: tuple[int, ...]
    axis: int
    layout: str
    dtype: str
    median_s: float
    min_s: float
    q1_s: float
    q3_s: float
    samples: int
    calls_per_sample: int
    bytes: int | None = None
    gb_per_s: float | None = None
    bandwidth_group: int | None = None
    roofline_gb_s: float | None = None
    roofline_percent: float | None = None
    ceiling_percent: float | None = None
    peak_roofline_gb_s: float | None = None
    peak_roofline_percent: float | None = None
    memory: str | None = None
    speedups: dict[str, Ratio] = field(default_factory=dict)
    # per-sample times, kept in memory for the confidence intervals, not saved
    times_s: tuple[float, ...] = field(default=(), repr=False, compare=False)

    @property
    def key(self) -> tuple[str, str, str, str]:
        """What the implementations of one comparison share."""
        return (self.section, self.operation, self.case, self.dtype)

    @property
    def label(self) -> str:
        return Case(self.case, tuple(self.shape), self.axis).label

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
             if f.name not in ("times_s", "speedups")}
        d["shape"] = list(self.shape)
        d["speedups"] = {name: r.to_dict() for name, r in self.speedups.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Row":
        names = {f.name for f in dataclasses.fields(cls)} - {"times_s", "speedups", "shape"}
        return cls(shape=tuple(d["shape"]),
                   speedups={k: Ratio.from_dict(v) for k, v in d.get("speedups", {}).items()},
                   **{k: v for k, v in d.items() if k in names})


def find(rows: list[Row], **match: Any) -> Row | None:
    """The first row whose attributes equal ``match``."""
    return next((r for r in rows if all(getattr(r, k) == v for k, v in match.items())), None)
