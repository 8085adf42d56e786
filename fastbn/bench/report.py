"""``python -m fastbn bench``: measure bandwidth, time every implementation, report and save.

The run measures this machine's streaming bandwidth, then for each shape, dtype and pass times
every available implementation (warm-up, then the median of several repeats), prints a table
with the speedup over naive NumPy and the percentage of the memory roofline, checks the
performance targets from the run's own numbers, and writes a JSON record (and a PNG chart when
matplotlib is installed). ``--markdown RESULTS.json`` renders a saved run for the README.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import gc
import json
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable, TextIO

from . import machine, registry
from .compile_time import WARM_FIRST_RESULT_TARGET_S, measure_compile_time
from .registry import BASELINE, CASES, DEFAULT_CASES, DTYPES, IMPLEMENTATIONS, Case
from .roofline import (PASS_STREAMS, PASSES, Bandwidth, bytes_moved, gb_per_s,
                       measure_bandwidth, measure_gpu_bandwidth, partly_cache_resident,
                       roofline_percent)
from .timing import time_body

SCHEMA = "fastbn-bench/1"
IMPLEMENTATION_ORDER = ("numpy", "cpu", "cpu-out", "cuda", "torch")
QUICK_REPEATS = 3
FULL_REPEATS = 5
QUICK_MIN_SAMPLE_S = 0.02
FULL_MIN_SAMPLE_S = 0.1
BETWEEN_CASES_RUNS = 5  # bandwidth runs before each (shape, dtype, pass); 15 at start and end


# ----------------------------------------------------------------------------- targets
@dataclass(frozen=True)
class Target:
    """A performance target of the cpu backend, checked against a run's own numbers."""

    case: str
    operation: str
    metric: str          # "speedup" (over naive NumPy) or "roofline" (percent)
    threshold: float
    dtype: str = "float32"
    implementation: str = "cpu"

    @property
    def description(self) -> str:
        shape = CASES[self.case].label if self.case in CASES else self.case
        goal = (f">= {self.threshold:g}x naive NumPy" if self.metric == "speedup"
                else f">= {self.threshold:g} % of roofline")
        return f"{self.implementation} {self.operation} {shape} {self.dtype} {goal}"


TARGETS: tuple[Target, ...] = (
    Target("nchw-256x64x56x56", "forward-train", "speedup", 6.0),
    Target("nchw-256x64x56x56", "backward", "speedup", 4.0),
    Target("nchw-256x64x56x56", "forward-train", "roofline", 75.0),
    Target("nc-8192x1024", "forward-train", "speedup", 4.0),
    Target("nc-8192x1024", "backward", "speedup", 4.0),
    Target("nhwc-64x56x56x64", "forward-train", "speedup", 4.0),
    Target("nhwc-64x56x56x64", "backward", "speedup", 4.0),
)


def evaluate_targets(results: dict) -> list[dict]:
    """PASS/FAIL (or SKIP when the run did not measure it) for each target, from ``results``.

    The targets are the cpu backend's as users call it (allocating its output); when the run
    measured the ``cpu-out`` variant, its verdicts follow, to show what allocation costs.
    """
    verdicts = []
    targets = list(TARGETS)
    if any(r["implementation"] == "cpu-out" for r in results["rows"]):
        targets += [replace(t, implementation="cpu-out") for t in TARGETS]
    for target in targets:
        row = next((r for r in results["rows"] if r["case"] == target.case
                    and r["pass"] == target.operation and r["dtype"] == target.dtype
                    and r["implementation"] == target.implementation), None)
        key = "speedup_vs_numpy" if target.metric == "speedup" else "roofline_percent"
        value = None if row is None else row.get(key)
        verdicts.append({
            "target": target.description,
            "value": value,
            "threshold": target.threshold,
            "metric": target.metric,
            "status": "SKIP" if value is None else
                      ("PASS" if value >= target.threshold else "FAIL"),
        })
    compile_time = results.get("compile_time")
    value = None if compile_time is None else compile_time["warm_first_result_s"]
    verdicts.append({
        "target": f"cpu warm-cache new process, start to first result < "
                  f"{WARM_FIRST_RESULT_TARGET_S:g} s",
        "value": value,
        "threshold": WARM_FIRST_RESULT_TARGET_S,
        "metric": "seconds",
        "status": "SKIP" if value is None else
                  ("PASS" if value < WARM_FIRST_RESULT_TARGET_S else "FAIL"),
    })
    return verdicts


# ----------------------------------------------------------------------------- running
def _format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} us"
    if seconds < 1.0:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.3f} s"


def _stderr(message: str, stream: TextIO | None) -> None:
    if stream is not None:
        print(message, file=stream, flush=True)


def available_implementations(requested: Iterable[str],
                              progress: TextIO | None = None) -> tuple[list[str], list[dict]]:
    """Split ``requested`` into those that run here and skip notes for the rest."""
    runnable, skipped = [], []
    for name in sorted(set(requested), key=IMPLEMENTATION_ORDER.index):
        reason = registry.unavailable_reason(name)
        if reason is None:
            runnable.append(name)
        else:
            skipped.append({"implementation": name, "reason": reason})
            _stderr(f"skipping {name}: {reason}", progress)
    return runnable, skipped


def add_roofline(rows: list[dict], host_by_segment: list[Bandwidth],
                 gpu_bandwidth: Bandwidth | None = None) -> None:
    """Set each row's roofline denominator and % of roofline.

    A host row is compared with ``host_by_segment[row["segment"]]``, the bandwidth measured
    around its (shape, dtype, pass); a cuda row with the GPU's device-memory bandwidth.
    """
    for row in rows:
        denominator = (gpu_bandwidth if row["implementation"] == "cuda"
                       else host_by_segment[row["segment"]])
        row["roofline_gb_s"] = denominator.roofline_gb_s
        row["roofline_percent"] = roofline_percent(row["bytes"], row["median_s"],
                                                   denominator.roofline_gb_s)


def run_benchmarks(cases: list[Case], dtypes: list[str], implementations: list[str],
                   passes: list[str], repeats: int, min_sample_s: float,
                   progress: TextIO | None = sys.stderr,
                   between_cases: Callable[[], None] | None = None
                   ) -> tuple[list[dict], list[dict]]:
    """Time every (case, dtype, pass, implementation); returns result rows and failures.

    Rows carry bytes, GB/s and ``segment``, the index of their (case, dtype, pass) in run order;
    :func:`add_roofline` adds the % of roofline once the bandwidth is known.
    ``between_cases`` runs between consecutive segments (the report measures bandwidth there,
    so each pass is judged against the bandwidth of the seconds around it). Inputs are built once
    per (case, dtype) and freed before the next, so the large shapes never share memory.
    """
    rows, failures = [], []
    total = len(cases) * len(dtypes) * sum(impl in registry.REGISTRY[op]
                                           for op in passes for impl in implementations)
    done = 0
    started = time.perf_counter()
    segment = -1
    for case, dtype in ((case, dtype) for case in cases for dtype in dtypes):
        inputs = registry.make_inputs(case, dtype)
        tensor_bytes = inputs.tensor_bytes
        for operation in passes:
            segment += 1
            if between_cases is not None and segment > 0:
                between_cases()
            group = []
            for impl in implementations:
                if impl not in registry.REGISTRY[operation]:
                    continue  # e.g. no out= variant of moments
                done += 1
                prefix = (f"[{done:>3}/{total}] {impl:<7} {operation:<13} "
                          f"{case.label:<19} {dtype:<8}")
                try:
                    body = registry.REGISTRY[operation][impl](inputs)
                    timing = time_body(body, repeats=repeats, min_sample_s=min_sample_s)
                except Exception as exc:  # a broken implementation must not hide the rest
                    failures.append({"implementation": impl, "pass": operation,
                                     "case": case.name, "dtype": dtype,
                                     "error": f"{type(exc).__name__}: {exc}"})
                    _stderr(f"{prefix} FAILED: {type(exc).__name__}: {exc}", progress)
                    continue
                finally:
                    body = None
                moved = bytes_moved(operation, tensor_bytes)
                group.append({
                    "segment": segment,
                    "implementation": impl,
                    "pass": operation,
                    "case": case.name,
                    "shape": list(case.shape),
                    "axis": case.axis,
                    "layout": case.layout,
                    "dtype": dtype,
                    "median_s": timing.median_s,
                    "min_s": timing.min_s,
                    "repeats": timing.repeats,
                    "calls_per_sample": timing.number,
                    "bytes": moved,
                    "gb_per_s": gb_per_s(moved, timing.median_s),
                })
                _stderr(f"{prefix} {_format_seconds(timing.median_s):>10}   "
                        f"({time.perf_counter() - started:.0f} s elapsed)", progress)
            baseline = next((r for r in group if r["implementation"] == BASELINE), None)
            for row in group:
                row["speedup_vs_numpy"] = (baseline["median_s"] / row["median_s"]
                                           if baseline else None)
            rows.extend(group)
        del inputs
        gc.collect()
    return rows, failures


# ----------------------------------------------------------------------------- output
def _row_cells(row: dict) -> list[str]:
    speedup = row.get("speedup_vs_numpy")
    return [
        row["implementation"], row["pass"], _case_of(row).label, row["dtype"],
        _format_seconds(row["median_s"]),
        "-" if speedup is None else f"{speedup:.2f}x",
        f"{row['gb_per_s']:.1f}", f"{row['roofline_percent']:.0f} %",
    ]


TABLE_HEADER = ["implementation", "pass", "shape", "dtype", "median", "vs numpy", "GB/s",
                "% roofline"]


def _case_of(row: dict) -> Case:
    return Case(row["case"], tuple(row["shape"]), row["axis"])


def format_table(rows: list[dict]) -> str:
    """Plain-text table of result rows, columns aligned."""
    cells = [TABLE_HEADER] + [_row_cells(r) for r in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(TABLE_HEADER))]
    right = {4, 5, 6, 7}
    lines = []
    for n, line in enumerate(cells):
        lines.append("  ".join(c.rjust(w) if i in right else c.ljust(w)
                               for i, (c, w) in enumerate(zip(line, widths))))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _cpu_text(m: dict) -> str:
    identity = m.get("cpu_identity")
    return f"{m['cpu']} [{identity}]" if identity else m["cpu"]


def format_header(results: dict) -> str:
    """Machine, versions and bandwidth: what a reader needs to reproduce or compare a run."""
    m, v, b = results["machine"], results["versions"], results["bandwidth"]
    torch_text = f"torch {v['torch']} ({m['torch_threads']} threads)" if v.get("torch") \
        else "torch not installed"
    lines = [
        f"machine   {_cpu_text(m)}, {m['usable_cpus']} cores, "
        f"Numba {m['numba_threads']} threads ({m['numba_threading_layer']} layer)"
        + (f", GPU {m['gpu']}" if m.get("gpu") else ""),
        f"versions  Python {v['python']}, fastbn {v['fastbn']}, NumPy {v['numpy']}, "
        f"Numba {v['numba']}, {torch_text}",
        f"bandwidth read {b['read_gb_s']:.1f} GB/s, read+write {b['read_write_gb_s']:.1f} GB/s "
        f"over {b['array_bytes'] / 2**20:.0f} MiB, best of {b['runs']} runs"
        + _roofline_range_text(b),
    ]
    g = results.get("gpu_bandwidth")
    if g:
        lines.append(f"GPU       read {g['read_gb_s']:.0f} GB/s, read+write "
                     f"{g['read_write_gb_s']:.0f} GB/s over {g['array_bytes'] / 2**20:.0f} MiB; "
                     f"the cuda rows' roofline uses {g['roofline_gb_s']:.0f} GB/s")
    lines += [
        "ceiling   % of roofline reachable with reads at the read rate and writes at the "
        "read+write rate: " + ", ".join(f"{op} {pct:.0f} %"
                                        for op, pct in b["attainable_percent"].items()),
    ]
    return "\n".join(lines)


def _roofline_range_text(b: dict) -> str:
    per_group = b.get("per_group_roofline_gb_s")
    if not per_group:
        return f"; roofline uses {b['roofline_gb_s']:.1f} GB/s"
    return (f"; each (shape, dtype, pass) is compared with the faster stream measured just "
            f"before and after it: {min(per_group):.1f} to {max(per_group):.1f} GB/s")


def format_targets(verdicts: list[dict]) -> str:
    lines = []
    for v in verdicts:
        if v["value"] is None:
            measured = "not measured in this run"
        elif v["metric"] == "speedup":
            measured = f"measured {v['value']:.2f}x"
        elif v["metric"] == "roofline":
            measured = f"measured {v['value']:.0f} %"
        else:
            measured = f"measured {v['value']:.2f} s"
        lines.append(f"{v['status']:<4}  {v['target']}: {measured}")
    return "\n".join(lines)


def format_compile_time(compile_time: dict) -> str:
    cold, warm = compile_time["cold"], compile_time["warm"]
    return (f"compile   cold (empty Numba cache): first result {cold['first_result_s']:.2f} s, "
            f"all cpu kernels {cold['all_kernels_s']:.1f} s; warm cache: first result "
            f"{warm['first_result_s']:.2f} s after import, new process start to first result "
            f"{compile_time['warm_first_result_s']:.2f} s")


def to_markdown(results: dict, implementations: list[str] | None = None,
                passes: list[str] | None = None, dtypes: list[str] | None = None,
                cases: list[str] | None = None) -> str:
    """README table from a saved run: one line per (pass, shape, dtype), one column per
    implementation with its median time, speedup over naive NumPy and % of roofline."""
    rows = [r for r in results["rows"]
            if (implementations is None or r["implementation"] in implementations)
            and (passes is None or r["pass"] in passes)
            and (dtypes is None or r["dtype"] in dtypes)
            and (cases is None or r["case"] in cases)]
    impls = [i for i in IMPLEMENTATION_ORDER if any(r["implementation"] == i for r in rows)]
    m, v, b = results["machine"], results["versions"], results["bandwidth"]
    date = results["created"][:10]
    torch_text = f", PyTorch {v['torch']}" if v.get("torch") else ""
    out = [
        f"Measured {date} on {_cpu_text(m)} ({m['usable_cpus']} cores, Numba "
        f"{m['numba_threads']} threads, {m['numba_threading_layer']} layer"
        + (f", GPU {m['gpu']}" if m.get("gpu") else "") + f"); Python {v['python']}, "
        f"fastbn {v['fastbn']}, NumPy {v['numpy']}, Numba {v['numba']}{torch_text}. "
        f"Best measured bandwidth: read {b['read_gb_s']:.1f} GB/s, read+write "
        f"{b['read_write_gb_s']:.1f} GB/s; roofline = passes x tensor bytes / bandwidth"
        + _roofline_range_text(b).replace("; each", ", each", 1).replace("; roofline uses",
                                                                          " of", 1)
        + (f" (cuda rows: / {results['gpu_bandwidth']['roofline_gb_s']:.0f} GB/s of device "
           "memory)" if results.get("gpu_bandwidth") else "") + ".",
        "",
        "Each cell: median time, speedup over naive NumPy, % of the memory roofline. "
        + "; ".join(f"{IMPLEMENTATIONS[i].short}: {IMPLEMENTATIONS[i].description}"
                    for i in impls) + ".",
        "",
        "| pass | shape | dtype | " + " | ".join(IMPLEMENTATIONS[i].short for i in impls) + " |",
        "|---|---|---|" + "---:|" * len(impls),
    ]
    keys = []
    for r in rows:
        key = (r["pass"], r["case"], r["dtype"])
        if key not in keys:
            keys.append(key)
    keys.sort(key=lambda k: PASSES.index(k[0]))
    cache_bytes = m.get("last_level_cache_bytes") or 0
    any_cache_resident = False
    for operation, case_name, dtype in keys:
        cells = []
        shape = None
        for impl in impls:
            row = next((r for r in rows if (r["pass"], r["case"], r["dtype"],
                                            r["implementation"]) ==
                        (operation, case_name, dtype, impl)), None)
            if row is None:
                cells.append("-")
                continue
            shape = _case_of(row).label
            if partly_cache_resident(operation, row["bytes"] // PASS_STREAMS[operation],
                                     cache_bytes):
                shape += " *"
                any_cache_resident = True
            speedup = row.get("speedup_vs_numpy")
            cells.append(f"{_format_seconds(row['median_s'])}, "
                         + ("" if speedup is None else f"{speedup:.1f}x, ")
                         + f"{row['roofline_percent']:.0f} %")
        out.append(f"| {operation} | {shape} | {dtype} | " + " | ".join(cells) + " |")
    if any_cache_resident:
        out += ["", f"\\* The arrays this pass touches total at most twice the "
                f"{cache_bytes / 2**20:.0f} MiB last-level cache: part of them stays in cache "
                "between calls, so the % of the memory roofline can exceed 100."]
    skipped = results.get("skipped", [])
    if skipped:
        out += ["", "Not measured: " + "; ".join(f"{s['implementation']} ({s['reason']})"
                                                 for s in skipped) + "."]
    if results.get("compile_time"):
        out += ["", format_compile_time(results["compile_time"]).replace("compile   ",
                                                                         "Compile time: ")]
    out += ["", "Targets (from this run's numbers):", ""]
    out += [f"- {line}" for line in format_targets(results["targets"]).splitlines()]
    out += ["", f"Reproduce: `{results['command']}`"]
    return "\n".join(out)


def write_plot(results: dict, path: Path) -> bool:
    """PNG of % of roofline per implementation and shape; False when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = results["rows"]
    dtypes = [d for d in DTYPES if any(r["dtype"] == d for r in rows)]
    passes = [p for p in PASSES if any(r["pass"] == p for r in rows)]
    impls = [i for i in IMPLEMENTATION_ORDER if any(r["implementation"] == i for r in rows)]
    cases = list(dict.fromkeys(r["case"] for r in rows))
    if not (dtypes and passes and impls):
        return False
    fig, axes = plt.subplots(len(dtypes), len(passes), squeeze=False, sharey=True,
                             figsize=(4.2 * len(passes), 3.6 * len(dtypes) + 0.8))
    width = 0.8 / len(impls)
    for i, dtype in enumerate(dtypes):
        for j, operation in enumerate(passes):
            ax = axes[i][j]
            for k, impl in enumerate(impls):
                heights = []
                for case_name in cases:
                    row = next((r for r in rows if (r["dtype"], r["pass"], r["implementation"],
                                                    r["case"]) ==
                                (dtype, operation, impl, case_name)), None)
                    heights.append(0.0 if row is None else row["roofline_percent"])
                ax.bar([c + (k - (len(impls) - 1) / 2) * width for c in range(len(cases))],
                       heights, width, label=impl)
            ax.axhline(100.0, color="black", linewidth=0.8, linestyle="--")
            ax.set_title(f"{operation}, {dtype}", fontsize=10)
            ax.set_xticks(range(len(cases)))
            labels = [CASES[c].label if c in CASES else c for c in cases]
            ax.set_xticklabels(labels, rotation=35, ha="right", fontsize=7)
            if j == 0:
                ax.set_ylabel("% of memory roofline")
    m, b = results["machine"], results["bandwidth"]
    per_group = b.get("per_group_roofline_gb_s") or [b["roofline_gb_s"]]
    fig.suptitle(f"fastbn, {m['cpu']}, {m['usable_cpus']} cores, {results['created'][:10]}; "
                 f"memory roofline {min(per_group):.0f} to {max(per_group):.0f} GB/s "
                 "(measured around each shape and pass)", fontsize=10)
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# ----------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fastbn bench",
        description="Time fastbn against naive NumPy (and PyTorch, and the GPU when present) "
                    "and against this machine's memory bandwidth.")
    parser.add_argument("--quick", action="store_true",
                        help="float32 only, 3 repeats, no compile-time run (under a minute)")
    parser.add_argument("--shapes", nargs="+", metavar="SHAPE",
                        help=f"case names ({', '.join(CASES)}) or shapes like "
                             "128x64x28x28 (features on axis 1) or 32x28x28x64:-1")
    parser.add_argument("--dtypes", nargs="+", choices=DTYPES)
    parser.add_argument("--backends", nargs="+", choices=IMPLEMENTATION_ORDER,
                        metavar="IMPL", help="implementations: numpy cpu cpu-out cuda torch "
                                             "(default: all; unavailable ones are skipped; "
                                             "cpu-out is cpu writing into a preallocated "
                                             "out= array)")
    parser.add_argument("--passes", nargs="+", choices=PASSES)
    parser.add_argument("--repeats", type=int, help="timed samples per row (median reported)")
    parser.add_argument("--min-sample-time", type=float, metavar="SECONDS",
                        help="a sample repeats the call until it lasts this long")
    parser.add_argument("--bandwidth-mib", type=int, metavar="MIB",
                        help="stream array size for the bandwidth measurement "
                             "(default: 8x the last-level cache, at least 256 MiB)")
    parser.add_argument("--compile-time", action=argparse.BooleanOptionalAction, default=None,
                        help="also time JIT compilation in fresh processes "
                             "(default: on, off with --quick)")
    parser.add_argument("--json", type=Path, metavar="PATH",
                        help="where to write the results (default: fastbn-bench-DATE.json)")
    parser.add_argument("--png", type=Path, metavar="PATH",
                        help="where to write the chart (default: the JSON path with .png)")
    parser.add_argument("--no-plot", action="store_true", help="do not write the PNG chart")
    parser.add_argument("--markdown", type=Path, metavar="RESULTS_JSON",
                        help="print a saved run as a Markdown table (for the README) and exit; "
                             "--shapes/--dtypes/--backends/--passes filter it")
    return parser


def _command_line(argv: list[str]) -> str:
    return " ".join(["python -m fastbn bench", *argv])


def run(args: argparse.Namespace, argv: list[str], out: TextIO = sys.stdout,
        progress: TextIO | None = sys.stderr) -> dict:
    """Run the benchmark report described by parsed ``args``; returns the results record."""
    cases = [registry.parse_case(s) for s in (args.shapes or DEFAULT_CASES)]
    dtypes = args.dtypes or (["float32"] if args.quick else list(DTYPES))
    passes = args.passes or list(PASSES)
    repeats = args.repeats or (QUICK_REPEATS if args.quick else FULL_REPEATS)
    min_sample_s = args.min_sample_time or (QUICK_MIN_SAMPLE_S if args.quick
                                            else FULL_MIN_SAMPLE_S)
    with_compile_time = (not args.quick) if args.compile_time is None else args.compile_time
    created = dt.datetime.now(dt.timezone.utc)

    implementations, skipped = available_implementations(
        args.backends or IMPLEMENTATION_ORDER, progress)
    if "torch" in implementations:
        import torch
        torch.set_num_threads(registry.torch_threads())

    # On a shared machine the rate a core can pull from memory follows the load on the host
    # (here it swung between about 35 and 60 GB/s within minutes), so one measurement at the
    # start would misjudge rows timed later. Bandwidth is measured at the start, between
    # consecutive (shape, dtype, pass) groups and at the end; each row is compared with the
    # best of the measurements just before and just after its group.
    bandwidth_bytes = args.bandwidth_mib * 2**20 if args.bandwidth_mib else None
    _stderr("measuring memory bandwidth ...", progress)
    bandwidth = measure_bandwidth(bandwidth_bytes)
    probes = [bandwidth]

    def measure_between_cases() -> None:
        probes.append(measure_bandwidth(bandwidth_bytes, runs=BETWEEN_CASES_RUNS))

    gpu_bandwidth = None
    if "cuda" in implementations:
        _stderr("measuring GPU memory bandwidth ...", progress)
        gpu_bandwidth = measure_gpu_bandwidth()
    results: dict[str, Any] = {
        "schema": SCHEMA,
        "created": created.isoformat(timespec="seconds"),
        "command": _command_line(argv),
        "machine": machine.machine_info(),
        "versions": machine.versions(),
        "bandwidth": bandwidth.to_dict(),
        "gpu_bandwidth": gpu_bandwidth.to_dict() if gpu_bandwidth else None,
        "settings": {"cases": [c.name for c in cases], "dtypes": dtypes, "passes": passes,
                     "implementations": implementations, "repeats": repeats,
                     "min_sample_s": min_sample_s, "warmup_calls": 1,
                     "statistic": "median"},
        "skipped": skipped,
    }
    _stderr(format_header(results), progress)

    rows, failures = run_benchmarks(cases, dtypes, implementations, passes, repeats,
                                    min_sample_s, progress, measure_between_cases)
    _stderr("measuring memory bandwidth again ...", progress)
    probes.append(measure_bandwidth(bandwidth_bytes))
    around_segment = [before.best_with(after) for before, after in zip(probes, probes[1:])]
    results["bandwidth"] = functools.reduce(Bandwidth.best_with, probes).to_dict()
    results["bandwidth"]["per_group_roofline_gb_s"] = [b.roofline_gb_s for b in around_segment]
    results["bandwidth_probes"] = [b.to_dict() for b in probes]
    if gpu_bandwidth is not None:
        gpu_bandwidth = gpu_bandwidth.best_with(measure_gpu_bandwidth())
        results["gpu_bandwidth"] = gpu_bandwidth.to_dict()
    add_roofline(rows, around_segment, gpu_bandwidth)
    results["rows"] = rows
    results["failures"] = failures
    if with_compile_time:
        _stderr("timing JIT compilation in fresh processes ...", progress)
        results["compile_time"] = measure_compile_time()
    results["targets"] = evaluate_targets(results)

    print(format_header(results), file=out)
    print("", file=out)
    print(format_table(rows), file=out)
    for s in skipped:
        print(f"note: {s['implementation']} rows skipped: {s['reason']}", file=out)
    for f in failures:
        print(f"FAILED: {f['implementation']} {f['pass']} {f['case']} {f['dtype']}: "
              f"{f['error']}", file=out)
    if "compile_time" in results:
        print(format_compile_time(results["compile_time"]), file=out)
    print("", file=out)
    print(format_targets(results["targets"]), file=out)

    json_path = args.json or Path(f"fastbn-bench-{created:%Y%m%dT%H%M%SZ}.json")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(results, indent=1) + "\n")
    print(f"\nresults written to {json_path}", file=out)
    if not args.no_plot:
        png_path = args.png or json_path.with_suffix(".png")
        if write_plot(results, png_path):
            print(f"chart written to {png_path}", file=out)
        else:
            print("no chart: matplotlib is not installed (pip install 'fastbn[plot]')", file=out)
    return results


def main(argv: list[str] | None = None, out: TextIO = sys.stdout,
         progress: TextIO | None = sys.stderr) -> int:
    """Entry point of ``python -m fastbn bench``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.markdown is not None:
        results = json.loads(args.markdown.read_text())
        if results.get("schema") != SCHEMA:
            parser.error(f"{args.markdown} is not a {SCHEMA} results file")
        cases = [registry.parse_case(s).name for s in args.shapes] if args.shapes else None
        print(to_markdown(results, args.backends, args.passes, args.dtypes, cases), file=out)
        return 0
    for shape in args.shapes or []:
        try:
            registry.parse_case(shape)
        except ValueError as exc:  # report it now, not after minutes of benchmarking
            parser.error(str(exc))
    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats must be at least 1")
    results = run(args, argv, out, progress)
    return 1 if results["failures"] else 0
