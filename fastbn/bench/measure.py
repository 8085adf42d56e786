"""Measuring: run a section's bodies over cases and dtypes, and turn timings into rows.

A :class:`Section` bundles a registry (``{operation: {implementation: setup}}``) with what the
rows need to know about it: which implementations each row is compared with, where an
implementation runs (host or GPU: its bandwidth) and whether the roofline applies.
:func:`run_section` times every (case, dtype, operation) group, one after another, and returns
:class:`~fastbn.bench.rows.Row` objects with their speedups; :func:`apply_roofline` adds the
% of roofline once the bandwidth around each group is known.
"""

from __future__ import annotations

import gc
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterable, TextIO

from . import fused, layer, registry
from .cases import Case, make_inputs
from .roofline import Bandwidth, BandwidthSchedule, bytes_moved, gb_per_s, memory_regime, \
    roofline_percent
from .rows import Row
from .stats import speedup
from .timing import Body, Timing, time_interleaved, time_round_robin


@dataclass(frozen=True)
class Section:
    """One part of a run: a registry and how its rows are compared and judged."""

    name: str
    title: str
    registry: dict[str, dict[str, registry.Setup]]
    labels: dict[str, tuple[str, str]]          # implementation -> (short label, description)
    unavailable: Callable[[str, bool], str | None]
    references: Callable[[str], dict[str, str]]  # implementation -> {speedup key: reference}
    device: Callable[[str], str]                 # implementation -> "host" | "gpu"
    roofline: bool

    @property
    def operations(self) -> tuple[str, ...]:
        return tuple(self.registry)

    @property
    def implementations(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(i for setups in self.registry.values() for i in setups))


def _pass_references(implementation: str) -> dict[str, str]:
    torch = registry.TORCH_ON[registry.IMPLEMENTATIONS[implementation].device]
    refs = {"numpy": registry.BASELINE, "torch": torch}
    return {key: ref for key, ref in refs.items() if ref != implementation}


def _others(*keys: str) -> Callable[[str], dict[str, str]]:
    return lambda implementation: {k: k for k in keys if k != implementation}


SECTIONS: dict[str, Section] = {s.name: s for s in (
    Section("pass", "Passes of the functional API", registry.REGISTRY,
            {name: (impl.short, impl.description)
             for name, impl in registry.IMPLEMENTATIONS.items()},
            registry.unavailable_reason, _pass_references,
            lambda impl: registry.IMPLEMENTATIONS[impl].device, roofline=True),
    Section("layer", "Layer API at small training shapes (cpu backend)", layer.REGISTRY,
            layer.IMPLEMENTATIONS, lambda impl, sim: layer.unavailable_reason(impl),
            _others("torch", "numpy-layer"), lambda impl: "host", roofline=False),
    Section("fused", "Fused batch norm + ReLU (+ residual add), cpu backend", fused.REGISTRY,
            fused.IMPLEMENTATIONS, lambda impl, sim: fused.unavailable_reason(impl),
            _others("unfused", "torch"), lambda impl: "host", roofline=True),
)}


# ----------------------------------------------------------------------------- timers
# A timer takes {implementation: make_body} and returns {implementation: Timing} plus
# {implementation: error text} for those whose setup or first call raised.
Timer = Callable[[dict[str, Callable[[], Body]]], tuple[dict[str, Timing], dict[str, str]]]


def _error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _made(makers: dict[str, Callable[[], Body]]) -> tuple[dict[str, Body], dict[str, str]]:
    """Every implementation's body, made and called once (those that raise: their error)."""
    bodies, errors = {}, {}
    for name, make in makers.items():
        try:
            body = make()
            body()
            bodies[name] = body
        except Exception as exc:  # a broken implementation must not hide the rest
            errors[name] = _error_text(exc)
    return bodies, errors


def round_robin_timer(repeats: int, min_sample_s: float) -> Timer:
    """Calibrated samples of all implementations in turn (:func:`time_round_robin`): the pass
    and fused sections, whose speedups are ratios of medians taken in the same rounds."""
    def timer(makers):
        bodies, errors = _made(makers)  # each called once already: that is its warm-up
        return (time_round_robin(bodies, repeats=repeats, min_sample_s=min_sample_s, warmup=0)
                if bodies else {}), errors
    return timer


def interleaved_timer(calls: int, rounds: int) -> Timer:
    """Single calls of all implementations in alternating rounds (:func:`time_interleaved`)."""
    def timer(makers):
        bodies, errors = _made(makers)
        return (time_interleaved(bodies, calls=calls, rounds=rounds) if bodies else {}), errors
    return timer


# Implementations that run no fastbn kernel: the warm-up child skips them.
NOT_FASTBN = frozenset({"numpy", "numpy-layer", *registry.TORCH_IMPLEMENTATIONS})


def warm_timer() -> Timer:
    """Call each fastbn body once and time nothing: the warm-up child of ``python -m fastbn
    bench`` runs this, so every kernel the run uses is compiled and in Numba's cache before the
    measuring process loads it (see ``cli.warm_in_child``)."""
    def timer(makers):
        errors = {}
        for name, make in makers.items():
            if name in NOT_FASTBN:
                continue
            try:
                make()()
            except Exception as exc:
                errors[name] = _error_text(exc)
        return {}, errors
    return timer


# ----------------------------------------------------------------------------- running
def _say(message: str, stream: TextIO | None) -> None:
    if stream is not None:
        print(message, file=stream, flush=True)


def available(section: Section, requested: Iterable[str] | None = None,
              allow_simulator: bool = False, progress: TextIO | None = None
              ) -> tuple[list[str], list[dict]]:
    """Split the section's implementations (or ``requested`` of them) into those that run here
    and skip notes (``{"section", "implementation", "reason"}``) for the rest."""
    wanted = set(section.implementations if requested is None else requested)
    runnable, skipped = [], []
    for name in section.implementations:
        if name not in wanted:
            continue
        reason = section.unavailable(name, allow_simulator)
        if reason is None:
            runnable.append(name)
        else:
            skipped.append({"section": section.name, "implementation": name, "reason": reason})
            _say(f"skipping {section.name} {name}: {reason}", progress)
    return runnable, skipped


def run_section(section: Section, cases: list[Case], dtypes: list[str],
                implementations: list[str], operations: list[str], timer: Timer,
                schedule: BandwidthSchedule | None = None, cache_bytes: int | None = None,
                progress: TextIO | None = sys.stderr) -> tuple[list[Row], list[dict]]:
    """Time every (case, dtype, operation) group of ``section``; returns rows and failures.

    Inputs are built once per (case, dtype) and freed before the next, so the large shapes
    never share memory. With a ``schedule`` each group first enters it (a bandwidth probe
    between groups); host rows record the group's index for :func:`apply_roofline`.
    ``cache_bytes`` (the host's last-level cache) classifies rows by memory regime.
    """
    rows: list[Row] = []
    failures: list[dict] = []
    started = time.perf_counter()
    for case in cases:
        for dtype in dtypes:
            inputs = make_inputs(case, dtype)
            for operation in operations:
                setups = section.registry[operation]
                names = [i for i in implementations if i in setups]
                if not names:
                    continue
                group = (schedule.enter((section.name, case.name, dtype, operation))
                         if schedule is not None and section.roofline else None)
                makers = {name: (lambda s=setups[name]: s(inputs)) for name in names}
                if group is not None:  # the streams, timed in this group's rounds
                    makers.update({name: (lambda b=body: b) for name, body in
                                   schedule.stream_bodies().items()})
                timings, errors = timer(makers)
                if group is not None:
                    schedule.record(group, timings)
                for name, error in errors.items():
                    failures.append({"section": section.name, "implementation": name,
                                     "operation": operation, "case": case.name,
                                     "dtype": dtype, "error": error})
                    _say(f"{section.name:<5} {name:<11} {operation:<16} {case.label:<20} "
                         f"{dtype:<8} FAILED: {error}", progress)
                group_rows = [_row(section, name, operation, case, dtype, timings[name],
                                   inputs.tensor_bytes, group, cache_bytes)
                              for name in names if name in timings]
                add_speedups(section, group_rows)
                for row in group_rows:
                    _say(f"{section.name:<5} {row.implementation:<11} {operation:<16} "
                         f"{case.label:<20} {dtype:<8} {format_seconds(row.median_s):>10}   "
                         f"({time.perf_counter() - started:.0f} s)", progress)
                rows.extend(group_rows)
            del inputs
            gc.collect()
    return rows, failures


def _row(section: Section, implementation: str, operation: str, case: Case, dtype: str,
         timing: Timing, tensor_bytes: int, group: int | None,
         cache_bytes: int | None) -> Row:
    q1, q3 = timing.quartiles_s
    row = Row(section=section.name, implementation=implementation, operation=operation,
              case=case.name, shape=case.shape, axis=case.axis, layout=case.layout,
              dtype=dtype, median_s=timing.median_s, min_s=timing.min_s, q1_s=q1, q3_s=q3,
              samples=timing.repeats, calls_per_sample=timing.number, times_s=timing.samples)
    if section.roofline:
        row.bytes = bytes_moved(operation, tensor_bytes)
        row.gb_per_s = gb_per_s(row.bytes, row.median_s)
        if section.device(implementation) == "host":
            row.bandwidth_group = group
            row.memory = memory_regime(operation, tensor_bytes, cache_bytes)
    return row


def add_speedups(section: Section, group_rows: list[Row]) -> None:
    """Each row's speedups over the references of its group that were measured."""
    by_name = {r.implementation: r for r in group_rows}
    for row in group_rows:
        for key, reference in section.references(row.implementation).items():
            if reference in by_name:
                row.speedups[key] = speedup(by_name[reference].times_s, row.times_s)


def apply_roofline(rows: list[Row], host_by_group: list[Bandwidth],
                   gpu_bandwidth: Bandwidth | None = None,
                   gpu_cache_bytes: int | None = None,
                   host_peaks: list[Bandwidth] | None = None) -> None:
    """Set each roofline row's denominator, % of roofline and ceiling: a host row is judged
    against its group's entry of ``host_by_group`` (``BandwidthSchedule.roofline_denominators``)
    and keeps the % of its group's peak (``host_peaks``, default the same) as
    ``peak_roofline_*``; a GPU row is judged against the GPU's device memory."""
    for row in rows:
        if row.bytes is None:
            continue
        if row.bandwidth_group is not None:
            denominator = host_by_group[row.bandwidth_group]
            peak = (host_peaks or host_by_group)[row.bandwidth_group]
            row.peak_roofline_gb_s = peak.roofline_gb_s
            row.peak_roofline_percent = roofline_percent(row.bytes, row.median_s,
                                                         peak.roofline_gb_s)
        elif gpu_bandwidth is not None:
            denominator = gpu_bandwidth
            row.memory = memory_regime(row.operation, row.bytes // _streams(row), gpu_cache_bytes)
        else:
            continue
        row.roofline_gb_s = denominator.roofline_gb_s
        row.roofline_percent = roofline_percent(row.bytes, row.median_s, row.roofline_gb_s)
        row.ceiling_percent = denominator.attainable_percent(row.operation)


def _streams(row: Row) -> int:
    return bytes_moved(row.operation, 1)


def format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} us"
    if seconds < 1.0:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.3f} s"
