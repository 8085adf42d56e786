"""``python -m fastbn bench``: measure, report, check the targets, save JSON and a chart.

A run has up to three sections (``--sections``): ``pass`` (every pass of the functional API
against naive NumPy, PyTorch and the memory roofline), ``layer`` (the layer API at small
training shapes against PyTorch and a CS231n-style NumPy layer) and ``fused`` (BN+ReLU(+add),
skipped with the reason while fastbn has no fused API). Files go to ``--out`` (default
``bench/results/`` under the current directory); the run prints where.
``--markdown RESULTS.json`` renders a saved run for the README.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, NamedTuple, TextIO

from . import fused, machine, measure, registry
from .cases import ALL_DTYPES, CASES, DEFAULT_CASES, DTYPES, LAYER_CASES, parse_case
from .compile_time import measure_compile_time
from .measure import SECTIONS
from .render import format_run, to_markdown
from .roofline import BandwidthSchedule, PASSES, measure_gpu_bandwidth
from .rows import SCHEMA, SECTIONS as SECTION_NAMES, Row
from .targets import evaluate

QUICK_REPEATS, FULL_REPEATS = 3, 5
QUICK_MIN_SAMPLE_S, FULL_MIN_SAMPLE_S = 0.02, 0.1
LAYER_CALLS, LAYER_ROUNDS = 1000, 10
DEFAULT_OUT = Path("bench") / "results"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fastbn bench",
        description="Time fastbn against naive NumPy, PyTorch (CPU, and cuDNN when the cuda "
                    "backend is measured) and a CS231n-style NumPy layer, and against this "
                    "machine's memory bandwidth.")
    parser.add_argument("--quick", action="store_true",
                        help="float32 only, 3 repeats, no compile-time run (a minute or two)")
    parser.add_argument("--sections", nargs="+", choices=SECTION_NAMES,
                        help="parts of the run (default: all)")
    parser.add_argument("--shapes", nargs="+", metavar="SHAPE",
                        help=f"pass/fused section shapes: case names ({', '.join(CASES)}) or "
                             "shapes like 128x64x28x28 (features on axis 1) or 32x28x28x64:-1")
    parser.add_argument("--layer-shapes", nargs="+", metavar="SHAPE",
                        help="layer section shapes (default: "
                             + ", ".join("x".join(map(str, c.shape)) for c in LAYER_CASES) + ")")
    parser.add_argument("--dtypes", nargs="+", choices=ALL_DTYPES,
                        help="default float32 float64, and float16 in the fused section "
                             "(float32 with --quick)")
    parser.add_argument("--backends", nargs="+", choices=registry.IMPLEMENTATION_ORDER,
                        metavar="IMPL", help="pass-section implementations: "
                        + " ".join(registry.IMPLEMENTATION_ORDER) + " (default: all; "
                        "unavailable ones are skipped with the reason)")
    parser.add_argument("--passes", nargs="+", choices=PASSES)
    parser.add_argument("--repeats", type=int, help="timed samples per pass row (median)")
    parser.add_argument("--min-sample-time", type=float, metavar="SECONDS",
                        help="a pass-row sample repeats the call until it lasts this long")
    parser.add_argument("--layer-calls", type=int, default=LAYER_CALLS, metavar="N",
                        help=f"single calls timed per layer row (default {LAYER_CALLS})")
    parser.add_argument("--bandwidth-mib", type=int, metavar="MIB",
                        help="stream array size for the bandwidth measurement "
                             "(default: 8x the last-level cache, at least 256 MiB)")
    parser.add_argument("--compile-time", action=argparse.BooleanOptionalAction, default=None,
                        help="also time JIT compilation in fresh processes "
                             "(default: on, off with --quick)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, metavar="DIR",
                        help=f"directory of the JSON and PNG (default: {DEFAULT_OUT}/ under "
                             "the current directory)")
    parser.add_argument("--json", type=Path, metavar="PATH",
                        help="the JSON's path (default: DIR/fastbn-bench-DATE-CPU-CORES.json)")
    parser.add_argument("--png", type=Path, metavar="PATH",
                        help="the chart's path (default: the JSON path with .png)")
    parser.add_argument("--no-plot", action="store_true", help="do not write the PNG chart")
    parser.add_argument("--warm-child", action=argparse.BooleanOptionalAction, default=True,
                        help="first call every fastbn pass once in a child process, so this "
                             "process loads the kernels from Numba's cache (default: on; "
                             "freshly compiled kernels can run slower than cached ones)")
    parser.add_argument("--warm-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--markdown", type=Path, metavar="RESULTS_JSON",
                        help="print a saved run as Markdown (for the README) and exit; "
                             "--sections/--shapes/--dtypes/--backends/--passes filter it")
    return parser


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40]


def default_json_path(out_dir: Path, created: dt.datetime, machine_info: dict) -> Path:
    return out_dir / (f"fastbn-bench-{created:%Y-%m-%dT%H%M%SZ}-{_slug(machine_info['cpu'])}-"
                      f"{machine_info['usable_cpus']}cores.json")


def _say(message: str, stream: TextIO | None) -> None:
    if stream is not None:
        print(message, file=stream, flush=True)


def warm_in_child(argv: list[str], progress: TextIO | None) -> None:
    """Run this bench's fastbn calls once in a child process (``--warm-only``).

    Numba's code for a kernel compiled in this process can be slower than the same kernel
    loaded from its cache in the next one (measured here: the residual backward at
    (64, 64, 3136) float32 took 53 ms freshly compiled against 13 ms loaded, whose loop was
    vectorized; numba/numba#10617 reports the same). The child compiles and caches, so the
    measuring process times what every later process of a user runs.
    """
    _say("compiling the kernels in a child process (--no-warm-child to skip) ...", progress)
    child = subprocess.run([sys.executable, "-m", "fastbn", "bench", *argv, "--warm-only"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if child.returncode != 0:
        _say(f"warm-up child failed ({child.returncode}); measuring anyway:\n"
             f"{child.stderr[-2000:]}", progress)


class Selection(NamedTuple):
    """What ``args`` asks each section to run: its cases, dtypes and operations."""

    cases: dict[str, list]
    dtypes: dict[str, list[str]]
    operations: dict[str, list[str]]


def select(args: argparse.Namespace) -> Selection:
    """The cases, dtypes and operations of every section, from ``args`` and the defaults."""
    cases = [parse_case(s) for s in (args.shapes or DEFAULT_CASES)]
    layer_cases = ([parse_case(s) for s in args.layer_shapes] if args.layer_shapes
                   else list(LAYER_CASES))
    dtypes = args.dtypes or (["float32"] if args.quick else list(DTYPES))
    # issue 13 asks for float16 rows of the fused passes (half the bytes)
    fused_dtypes = args.dtypes or (["float32"] if args.quick else list(fused.DTYPES))
    return Selection(
        cases={"pass": cases, "layer": layer_cases,
               "fused": cases if args.shapes else list(fused.DEFAULT_CASES)},
        dtypes={"pass": dtypes, "layer": dtypes, "fused": fused_dtypes},
        operations={"pass": args.passes or list(PASSES),
                    "layer": list(SECTIONS["layer"].operations),
                    "fused": list(SECTIONS["fused"].operations)})


def warm_only(args: argparse.Namespace) -> int:
    """The child of :func:`warm_in_child`: every section's fastbn bodies, once each."""
    chosen = select(args)
    failed = False
    for name in args.sections or list(SECTION_NAMES):
        impls, _ = measure.available(SECTIONS[name], args.backends if name == "pass" else None)
        _, failures = measure.run_section(
            SECTIONS[name], chosen.cases[name], chosen.dtypes[name], impls,
            chosen.operations[name], measure.warm_timer(), progress=None)
        failed = failed or bool(failures)
    return 1 if failed else 0


def run(args: argparse.Namespace, argv: list[str], out: TextIO = sys.stdout,
        progress: TextIO | None = sys.stderr) -> dict:
    """Run the benchmark described by parsed ``args``; returns the results record."""
    sections = args.sections or list(SECTION_NAMES)
    chosen = select(args)
    cases, layer_cases, fused_cases = (chosen.cases[name] for name in ("pass", "layer", "fused"))
    dtypes, fused_dtypes = chosen.dtypes["pass"], chosen.dtypes["fused"]
    passes = chosen.operations["pass"]
    repeats = args.repeats or (QUICK_REPEATS if args.quick else FULL_REPEATS)
    min_sample_s = args.min_sample_time or (QUICK_MIN_SAMPLE_S if args.quick
                                            else FULL_MIN_SAMPLE_S)
    with_compile_time = (not args.quick) if args.compile_time is None else args.compile_time
    created = dt.datetime.now(dt.timezone.utc)
    load_at_start = machine.load_average()

    plan: dict[str, tuple[list, list[str], list[str], measure.Timer]] = {}
    section_dtypes = chosen.dtypes
    skipped: list[dict] = []
    round_robin = measure.round_robin_timer(repeats, min_sample_s)
    requested = {"pass": args.backends, "layer": None, "fused": None}
    section_cases, operations = chosen.cases, chosen.operations
    for name in sections:
        impls, notes = measure.available(SECTIONS[name], requested[name], progress=progress)
        skipped += notes
        if name == "fused" and "fused" not in impls:
            # without the fused API the section would only time its references
            continue
        timer = (measure.interleaved_timer(args.layer_calls, LAYER_ROUNDS) if name == "layer"
                 else round_robin)
        if impls:
            plan[name] = (section_cases[name], impls, operations[name], timer)
    if any(i in registry.TORCH_IMPLEMENTATIONS for _, impls, _, _ in plan.values()
           for i in impls):
        import torch
        torch.set_num_threads(registry.torch_threads())

    bandwidth_bytes = args.bandwidth_mib * 2**20 if args.bandwidth_mib else None
    schedule = BandwidthSchedule(bandwidth_bytes, side_by_side=True)
    cache_bytes = machine.l3_cache_bytes()
    gpu_measured = any(SECTIONS[name].device(i) == "gpu"
                       for name, (_, impls, _, _) in plan.items() for i in impls)
    results: dict[str, Any] = {
        "schema": SCHEMA,
        "created": created.isoformat(timespec="seconds"),
        "command": " ".join(["python -m fastbn bench", *argv]),
        "settings": {"sections": list(plan), "cases": [c.name for c in cases],
                     "layer_cases": [c.name for c in layer_cases],
                     "fused_cases": [c.name for c in fused_cases], "dtypes": dtypes,
                     "fused_dtypes": fused_dtypes,
                     "passes": passes, "repeats": repeats, "min_sample_s": min_sample_s,
                     "warmup_calls": 1, "layer_calls": args.layer_calls,
                     "layer_rounds": LAYER_ROUNDS, "statistic": "median",
                     "implementations": {name: impls for name, (_, impls, _, _) in plan.items()}},
        "skipped": skipped,
    }
    rows: list[Row] = []
    failures: list[dict] = []
    for name, (section_cases_, impls, ops, timer) in plan.items():
        _say(f"== section {name}: {len(section_cases_)} shapes x {len(section_dtypes[name])} "
             "dtypes", progress)
        section_rows, section_failures = measure.run_section(
            SECTIONS[name], section_cases_, section_dtypes[name], impls, ops, timer, schedule,
            cache_bytes, progress)
        rows += section_rows
        failures += section_failures
    host_peaks = schedule.finish()
    host_by_group = schedule.roofline_denominators()
    results["bandwidth"] = None
    if schedule.probes:
        results["bandwidth"] = schedule.best().to_dict()
        results["bandwidth"]["per_group_peak_gb_s"] = [b.roofline_gb_s for b in host_peaks]
        results["bandwidth"]["per_group_roofline_gb_s"] = [b.roofline_gb_s
                                                           for b in host_by_group]
    results["bandwidth_probes"] = [b.to_dict() for b in schedule.probes]
    results["bandwidth_side_by_side"] = [None if b is None else b.to_dict()
                                         for b in schedule.side_by_side_denominators()]
    gpu_bandwidth = None
    if gpu_measured:
        _say("measuring GPU memory bandwidth (copy kernel) ...", progress)
        gpu_bandwidth = measure_gpu_bandwidth()
    results["gpu_bandwidth"] = gpu_bandwidth.to_dict() if gpu_bandwidth else None
    measure.apply_roofline(rows, host_by_group, gpu_bandwidth,
                           machine.gpu_l2_bytes() if gpu_measured else None, host_peaks)
    # machine info last: the thread pools (OpenMP, torch's) are loaded by now
    results["machine"] = machine.machine_info()
    results["load_average"] = {"start": load_at_start, "end": machine.load_average()}
    results["versions"] = machine.versions()
    results["rows"] = [r.to_dict() for r in rows]
    results["failures"] = failures
    results["compile_time"] = None
    if with_compile_time:
        _say("timing JIT compilation in fresh processes ...", progress)
        results["compile_time"] = measure_compile_time()
    results["targets"] = evaluate(rows, results["compile_time"])

    print(format_run(results, rows), file=out)
    json_path = args.json or default_json_path(args.out, created, results["machine"])
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(results, indent=1) + "\n")
    print(f"\nresults written to {json_path.resolve()}", file=out)
    if not args.no_plot:
        from .plot import write_plot
        png_path = args.png or json_path.with_suffix(".png")
        if write_plot(results, rows, png_path):
            print(f"chart written to {png_path.resolve()}", file=out)
        else:
            print("no chart: matplotlib is not installed (pip install 'fastbn[plot]') or no "
                  "pass rows", file=out)
    return results


def load_results(path: Path) -> tuple[dict, list[Row]]:
    """A saved run and its rows; ValueError when it is not a :data:`SCHEMA` file."""
    results = json.loads(path.read_text())
    if results.get("schema") != SCHEMA:
        raise ValueError(f"{path} is not a {SCHEMA} results file "
                         f"(schema {results.get('schema')!r})")
    return results, [Row.from_dict(r) for r in results["rows"]]


def main(argv: list[str] | None = None, out: TextIO = sys.stdout,
         progress: TextIO | None = sys.stderr) -> int:
    """Entry point of ``python -m fastbn bench``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.markdown is not None:
        try:
            results, rows = load_results(args.markdown)
        except ValueError as exc:
            parser.error(str(exc))
        cases = {parse_case(s).name for s in args.shapes} if args.shapes else None
        rows = [r for r in rows
                if (args.sections is None or r.section in args.sections)
                and (args.backends is None or r.section != "pass"
                     or r.implementation in args.backends)
                and (args.passes is None or r.section != "pass" or r.operation in args.passes)
                and (args.dtypes is None or r.dtype in args.dtypes)
                and (cases is None or r.section == "layer" or r.case in cases)]
        print(to_markdown(results, rows), file=out)
        return 0
    for shape in (args.shapes or []) + (args.layer_shapes or []):
        try:
            parse_case(shape)
        except ValueError as exc:  # report it now, not after minutes of benchmarking
            parser.error(str(exc))
    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.layer_calls < 1:
        parser.error("--layer-calls must be at least 1")
    if args.warm_only:
        return warm_only(args)
    if args.warm_child:
        warm_in_child(argv, progress)
    results = run(args, argv, out, progress)
    return 1 if results["failures"] else 0
