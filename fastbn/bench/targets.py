"""Performance targets, checked against a run's own rows.

Each :class:`Target` selects rows (section, implementation, operations, cases, dtypes, memory
regime) and a metric (a speedup over a reference, or the % of roofline); its verdict is PASS
when every selected row meets the threshold, FAIL naming the rows that miss it, and SKIP with
the reason when the run measured none (e.g. PyTorch not installed, or the shape not run).
"""

from __future__ import annotations

from dataclasses import dataclass

from .compile_time import WARM_FIRST_RESULT_TARGET_S, floor_of
from .rows import Row

_FASTBN_PASS_ROWS = ("cpu", "cpu-out", "cuda")


@dataclass(frozen=True)
class Target:
    """``metric`` of the selected rows >= ``threshold``.

    ``metric`` is ``"roofline"`` (% of roofline) or a speedup key of :attr:`Row.speedups`
    (``"numpy"``, ``"torch"``, ``"numpy-layer"``, ``"unfused"``). Empty selectors match all.
    """

    description: str
    section: str
    metric: str
    threshold: float
    implementations: tuple[str, ...] = ()
    operations: tuple[str, ...] = ()
    shapes: tuple[tuple[int, ...], ...] = ()
    dtypes: tuple[str, ...] = ()
    memory: str | None = None
    skip_reason: str = "the run measured none of these rows (shape, dtype or pass not run)"

    def selects(self, row: Row) -> bool:
        return (row.section == self.section
                and (not self.implementations or row.implementation in self.implementations)
                and (not self.operations or row.operation in self.operations)
                and (not self.shapes or tuple(row.shape) in self.shapes)
                and (not self.dtypes or row.dtype in self.dtypes)
                and (self.memory is None or row.memory == self.memory))

    def _why_none(self, rows: list[Row]) -> str:
        section_rows = [r for r in rows if r.section == self.section]
        if not section_rows:
            return f"the {self.section} section did not run"
        if self.metric == "torch" and not any("torch" in r.speedups for r in section_rows):
            return NO_TORCH
        return self.skip_reason

    def value_of(self, row: Row) -> float | None:
        if self.metric == "roofline":
            return row.roofline_percent
        ratio = row.speedups.get(self.metric)
        return None if ratio is None else ratio.value

    def evaluate(self, rows: list[Row]) -> dict:
        measured = [(r, self.value_of(r)) for r in rows if self.selects(r)]
        measured = [(r, v) for r, v in measured if v is not None]
        verdict = {"target": self.description, "metric": self.metric,
                   "threshold": self.threshold, "rows": len(measured)}
        if not measured:
            return {**verdict, "status": "SKIP", "value": None, "detail": self._why_none(rows)}
        worst_row, worst = min(measured, key=lambda rv: rv[1])
        missed = [(r, v) for r, v in measured if v < self.threshold]
        misses = [f"{r.implementation} {r.operation} {r.label} {r.dtype} "
                  f"{_value_text(self, v)}{self._ceiling_text(r)}" for r, v in missed]
        beyond = [r for r, _ in missed if self.beyond_ceiling(r)]
        detail = (f"worst {_value_text(self, worst)} ({worst_row.implementation} "
                  f"{worst_row.operation} {worst_row.label} {worst_row.dtype}) over "
                  f"{len(measured)} rows")
        if misses:
            detail += f"; {len(misses)} below: " + "; ".join(misses)
        if beyond and len(beyond) == len(missed):
            detail += ("; every row below has a ceiling under the target at its own streams' "
                       "rates, so the target was out of reach in this run")
        elif beyond:
            detail += (f"; {len(beyond)} of them have a ceiling under the target at their own "
                       "streams' rates")
        return {**verdict, "status": "FAIL" if misses else "PASS", "value": worst,
                "beyond_ceiling": len(beyond), "detail": detail}

    def beyond_ceiling(self, row: Row) -> bool:
        """Whether the row could not meet a roofline target even at its streams' own rates:
        its operation's ceiling (``Row.ceiling_percent``) is under the threshold."""
        return (self.metric == "roofline" and row.ceiling_percent is not None
                and row.ceiling_percent < self.threshold)

    def _ceiling_text(self, row: Row) -> str:
        if self.metric != "roofline" or row.ceiling_percent is None:
            return ""
        return f" (ceiling {row.ceiling_percent:.0f} %)"


def _value_text(target: Target, value: float) -> str:
    return f"{value:.0f} %" if target.metric == "roofline" else f"{value:.2f}x"


NO_TORCH = ("PyTorch was not measured (not installed, or not requested): "
            "pip install 'fastbn[torch]'")
SMALL_BATCH = ((64, 128), (32, 16, 8, 8), (16, 64, 16, 16))
LARGER_BATCH = ((256, 512), (256, 1024))
DRAM_ROOFLINE = {"forward-train": 85.0, "backward": 80.0, "forward-eval": 85.0, "moments": 85.0}

TARGETS: tuple[Target, ...] = (
    # issue 10: no row slower than PyTorch; DRAM-sized passes close to the roofline
    Target("every fastbn row at least as fast as PyTorch on the same device", "pass", "torch",
           1.0, implementations=_FASTBN_PASS_ROWS),
    *(Target(f"cpu {op} on DRAM-sized tensors >= {pct:g} % of roofline", "pass", "roofline",
             pct, implementations=("cpu", "cpu-out"), operations=(op,), memory="dram",
             skip_reason="no DRAM-sized row measured (working set >= 8x the last-level cache)")
      for op, pct in DRAM_ROOFLINE.items()),
    # the original targets against naive NumPy (float32)
    Target("cpu forward-train 256x64x56x56 NCHW float32 >= 6x naive NumPy", "pass", "numpy",
           6.0, ("cpu",), ("forward-train",), ((256, 64, 56, 56),), ("float32",)),
    Target("cpu backward 256x64x56x56 NCHW float32 >= 4x naive NumPy", "pass", "numpy", 4.0,
           ("cpu",), ("backward",), ((256, 64, 56, 56),), ("float32",)),
    Target("cpu forward-train and backward 8192x1024 NC, 64x56x56x64 NHWC float32 >= 4x "
           "naive NumPy", "pass", "numpy", 4.0, ("cpu",), ("forward-train", "backward"),
           ((8192, 1024), (64, 56, 56, 64)), ("float32",)),
    # issue 9: the layer at small training shapes
    Target("layer train step >= 3x PyTorch at 64x128, 32x16x8x8, 16x64x16x16", "layer", "torch",
           3.0, ("fastbn",), ("train-step",), SMALL_BATCH),
    Target("layer train step >= 2x PyTorch at 256x512, 256x1024", "layer", "torch", 2.0,
           ("fastbn",), ("train-step",), LARGER_BATCH),
    Target("layer train step >= 4x the CS231n-style NumPy layer", "layer", "numpy-layer", 4.0,
           ("fastbn",), ("train-step",)),
    Target("layer eval forward >= 1.5x PyTorch eval", "layer", "torch", 1.5, ("fastbn",),
           ("eval-forward",)),
    Target("functional batch_norm (eval) >= 1.5x F.batch_norm", "layer", "torch", 1.5,
           ("fastbn",), ("functional-eval",)),
    # issue 13: fused passes
    Target("fused BN+ReLU(+add) >= 1.3x fastbn then NumPy", "fused", "unfused", 1.3, ("fused",)),
    Target("fused passes on DRAM-sized tensors >= 85 % of the fused roofline", "fused",
           "roofline", 85.0, ("fused",), memory="dram",
           skip_reason="no DRAM-sized fused row measured"),
)


def compile_time_verdict(compile_time: dict | None) -> dict:
    """Issue 9: a new process with a warm cache reaches its first forward+backward result in
    under the target (interpreter start-up included)."""
    value = None if compile_time is None else compile_time["warm_first_result_s"]
    verdict = {"target": f"new process, warm Numba cache, to its first forward+backward result "
                         f"< {WARM_FIRST_RESULT_TARGET_S:g} s",
               "metric": "seconds", "threshold": WARM_FIRST_RESULT_TARGET_S, "value": value,
               "rows": 0 if value is None else 1}
    if value is None:
        return {**verdict, "status": "SKIP",
                "detail": "compile time not measured (--quick or --no-compile-time)"}
    detail = f"measured {value:.2f} s"
    floor = floor_of(compile_time)
    if floor is not None:
        seconds, what = floor
        detail += f"; {what} takes {seconds:.2f} s"
        if seconds >= WARM_FIRST_RESULT_TARGET_S:
            detail += ", so the target was out of fastbn's reach in this run"
    return {**verdict, "status": "PASS" if value < WARM_FIRST_RESULT_TARGET_S else "FAIL",
            "detail": detail}


def evaluate(rows: list[Row], compile_time: dict | None,
             targets: tuple[Target, ...] = TARGETS) -> list[dict]:
    """Verdicts of every target (sections not run are SKIP) and of the compile-time target."""
    return [t.evaluate(rows) for t in targets] + [compile_time_verdict(compile_time)]
