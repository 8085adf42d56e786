"""Rendering rows: the console table, the run header, target verdicts, Markdown for the README.

Everything here reads :class:`~fastbn.bench.rows.Row` objects and the results record; nothing
measures. Rows of cache-resident passes show "cache" instead of a % of the DRAM roofline (they
are judged against PyTorch), and a fastbn row slower than PyTorch is flagged.
"""

from __future__ import annotations

from .compile_time import floor_of
from .measure import SECTIONS, format_seconds
from .roofline import PASSES, STREAMS
from .rows import Row
from .stats import Ratio

SLOWER_FLAG = "<< slower than PyTorch"
REFERENCE_LABELS = {"numpy": "naive NumPy", "torch": "PyTorch", "numpy-layer": "NumPy layer",
                    "unfused": "fastbn+NumPy"}


def _is_candidate(row: Row) -> bool:
    """A fastbn row (not a reference implementation): one that must beat PyTorch."""
    return row.implementation in ("cpu", "cpu-out", "cuda", "fastbn", "fused")


def slower_than_torch(row: Row) -> bool:
    ratio = row.speedups.get("torch")
    return _is_candidate(row) and ratio is not None and ratio.value < 1.0


def roofline_text(row: Row, peak: bool = False) -> str:
    """The row's % of roofline (of its peak with ``peak``), or "cache" for cache-resident rows."""
    percent = row.peak_roofline_percent if peak else row.roofline_percent
    if percent is None:
        return "-"
    if row.memory == "cache":
        return "cache"
    return f"{percent:.0f} %"


def ceiling_text(row: Row) -> str:
    """The % of roofline the row's operation could reach at its streams' rates ("-" for
    cache-resident rows, which are not judged against the DRAM roofline)."""
    if row.ceiling_percent is None or row.memory == "cache":
        return "-"
    return f"{row.ceiling_percent:.0f} %"


def _ratio_text(ratio: Ratio | None) -> str:
    return "-" if ratio is None else ratio.text()


def format_table(rows: list[Row]) -> str:
    """Plain-text table of one section's rows, columns aligned, slower-than-PyTorch flagged."""
    present = {k for r in rows for k in r.speedups}
    keys = [k for k in REFERENCE_LABELS if k in present] + sorted(present - set(REFERENCE_LABELS))
    header = (["implementation", "operation", "shape", "dtype", "median"]
              + [f"vs {REFERENCE_LABELS.get(k, k)}" for k in keys])
    has_roofline = any(r.bytes is not None for r in rows)
    has_peak = any(r.peak_roofline_percent is not None for r in rows)
    has_ceiling = any(r.ceiling_percent is not None for r in rows)
    if has_roofline:
        header += (["GB/s", "% roofline"] + (["% ceiling"] if has_ceiling else [])
                   + (["% peak"] if has_peak else []))
    cells = [header]
    for r in rows:
        line = [r.implementation, r.operation, r.label, r.dtype, format_seconds(r.median_s)]
        line += [_ratio_text(r.speedups.get(k)) for k in keys]
        if has_roofline:
            line += ["-" if r.gb_per_s is None else f"{r.gb_per_s:.1f}", roofline_text(r)]
            line += [ceiling_text(r)] if has_ceiling else []
            line += [roofline_text(r, peak=True)] if has_peak else []
        line.append(SLOWER_FLAG if slower_than_torch(r) else "")
        cells.append(line)
    header.append("")
    widths = [max(len(line[i]) for line in cells) for i in range(len(header))]
    lines = []
    for n, line in enumerate(cells):
        lines.append("  ".join(c.rjust(w) if 4 <= i < len(header) - 1 else c.ljust(w)
                               for i, (c, w) in enumerate(zip(line, widths))).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths[:-1]))
    return "\n".join(lines)


def _cpu_text(m: dict) -> str:
    identity = m.get("cpu_identity")
    return f"{m['cpu']} [{identity}]" if identity else m["cpu"]


def _pools_text(pools) -> str:
    if isinstance(pools, str):
        return pools
    return ", ".join(f"{p.get('internal_api')} {p.get('version')} ({p.get('num_threads')} "
                     "threads)" for p in pools) or "none loaded"


def format_header(results: dict) -> str:
    """Machine, versions and bandwidth: what a reader needs to reproduce or compare a run."""
    m, v, b = results["machine"], results["versions"], results["bandwidth"]
    torch_text = (f"torch {v['torch']} ({m['torch_threads']} threads)" if v.get("torch")
                  else "torch not installed")
    lines = [
        f"machine   {_cpu_text(m)}, {m['usable_cpus']} cores, "
        f"Numba {m['numba_threads']} threads ({m['numba_threading_layer']} layer)"
        + (f", GPU {m['gpu']}" if m.get("gpu") else ""),
        f"pools     {_pools_text(m.get('thread_pools', []))}",
        f"versions  Python {v['python']}, fastbn {v['fastbn']}, NumPy {v['numpy']}, "
        f"Numba {v['numba']}, SciPy {v.get('scipy')}, {torch_text}",
    ]
    load = results.get("load_average")
    if load and load.get("start") and load.get("end"):
        lines.append(f"load      1-minute load average {load['start'][0]:g} at the start, "
                     f"{load['end'][0]:g} at the end ({m['usable_cpus']} cores)")
    if b:
        lines.append(f"bandwidth read {b['read_gb_s']:.1f} GB/s, read+write "
                     f"{b['read_write_gb_s']:.1f} GB/s over {b['array_bytes'] / 2**20:.0f} MiB, "
                     f"best of {b['runs']} runs" + _roofline_range_text(b))
        lines.append("ceiling   % of roofline reachable with reads at the read rate and writes "
                     "at the read+write rate: " + ", ".join(
                         f"{op} {pct:.0f} %" for op, pct in b["attainable_percent"].items()))
    g = results.get("gpu_bandwidth")
    if g:
        lines.append(f"GPU       read {g['read_gb_s']:.0f} GB/s, read+write "
                     f"{g['read_write_gb_s']:.0f} GB/s over {g['array_bytes'] / 2**20:.0f} MiB "
                     f"(copy kernel); the GPU rows' roofline uses {g['roofline_gb_s']:.0f} GB/s")
    return "\n".join(lines)


def _roofline_range_text(b: dict) -> str:
    per_group = b.get("per_group_roofline_gb_s")
    if not per_group:
        return f"; roofline uses {b['roofline_gb_s']:.1f} GB/s"
    peaks = b.get("per_group_peak_gb_s")
    if peaks is None:  # records before the side-by-side streams
        return (f"; each (shape, dtype, pass) is compared with the faster stream measured just "
                f"before and after it: {min(per_group):.1f} to {max(per_group):.1f} GB/s")
    return (f"; each (shape, dtype, pass) is compared with the faster stream's median timed in "
            f"its own rounds: {min(per_group):.1f} to {max(per_group):.1f} GB/s (% peak: with "
            f"the best probe just before and after it, {min(peaks):.1f} to {max(peaks):.1f})")


def format_targets(verdicts: list[dict]) -> str:
    return "\n".join(f"{v['status']:<4}  {v['target']}: {v['detail']}" for v in verdicts)


def format_compile_time(compile_time: dict) -> str:
    cold, warm = compile_time["cold"], compile_time["warm"]
    floor = floor_of(compile_time)
    return (f"compile   cold (empty Numba cache): first result {cold['first_result_s']:.2f} s, "
            f"all cpu kernels {cold['all_kernels_s']:.1f} s; warm cache: import "
            f"{warm['import_s']:.2f} s, first forward+backward {warm['first_result_s']:.2f} s "
            f"after import, new process start to first result "
            f"{compile_time['warm_first_result_s']:.2f} s"
            + ("" if floor is None else f" ({floor[1]}: {floor[0]:.2f} s)"))


def format_run(results: dict, rows: list[Row]) -> str:
    """The whole console report of a run."""
    out = [format_header(results)]
    for name, section in SECTIONS.items():
        section_rows = [r for r in rows if r.section == name]
        if section_rows:
            out += ["", f"== {section.title}", format_table(section_rows)]
    for s in results.get("skipped", []):
        out.append(f"note: {s['section']} {s['implementation']} rows skipped: {s['reason']}")
    for f in results.get("failures", []):
        out.append(f"FAILED: {f['section']} {f['implementation']} {f['operation']} {f['case']} "
                   f"{f['dtype']}: {f['error']}")
    slower = [r for r in rows if slower_than_torch(r)]
    if slower:
        out.append(f"{len(slower)} fastbn rows are slower than PyTorch (flagged {SLOWER_FLAG!r})")
    if results.get("compile_time"):
        out.append(format_compile_time(results["compile_time"]))
    out += ["", "Targets (from this run's numbers):", format_targets(results["targets"])]
    return "\n".join(out)


# ----------------------------------------------------------------------------- Markdown
def _machine_sentence(results: dict) -> str:
    m, v = results["machine"], results["versions"]
    torch_text = f", PyTorch {v['torch']}" if v.get("torch") else ""
    return (f"Measured {results['created'][:10]} on {_cpu_text(m)} ({m['usable_cpus']} cores, "
            f"Numba {m['numba_threads']} threads, {m['numba_threading_layer']} layer"
            + (f", GPU {m['gpu']}" if m.get("gpu") else "") + f"); Python {v['python']}, "
            f"fastbn {v['fastbn']}, NumPy {v['numpy']}, Numba {v['numba']}{torch_text}; "
            f"thread pools: {_pools_text(m.get('thread_pools', []))}" + _load_text(results)
            + ".")


def _load_text(results: dict) -> str:
    load = results.get("load_average") or {}
    if not (load.get("start") and load.get("end")):
        return ""
    return (f"; 1-minute load average {load['start'][0]:g} at the start, {load['end'][0]:g} "
            "at the end")


def pass_markdown(results: dict, rows: list[Row]) -> str:
    """README table of the pass section: one line per (pass, shape, dtype), a column per
    implementation (median, speedup over naive NumPy, % of roofline or "cache"), and PyTorch's
    time over fastbn cpu's."""
    rows = [r for r in rows if r.section == "pass"]
    if not rows:
        return ""
    impls = [i for i in SECTIONS["pass"].implementations if any(r.implementation == i
                                                                 for r in rows)]
    labels = SECTIONS["pass"].labels
    b = results["bandwidth"]
    out = [f"Best measured bandwidth: read {b['read_gb_s']:.1f} GB/s, read+write "
           f"{b['read_write_gb_s']:.1f} GB/s; roofline = passes x tensor bytes / bandwidth"
           + _roofline_range_text(b).replace("; each", ", each", 1)
           .replace("; roofline uses", " of", 1) + ".",
           "",
           "Each cell: median time, speedup over naive NumPy, % of the memory roofline "
           "(\"cache\": the pass's arrays fit in twice the last-level cache, so it is judged "
           "against PyTorch, not the DRAM roofline). " + "; ".join(
               f"{labels[i][0]}: {labels[i][1]}" for i in impls) + ".",
           "",
           "| pass | shape | dtype | " + " | ".join(labels[i][0] for i in impls)
           + " | PyTorch / fastbn cpu |",
           "|---|---|---|" + "---:|" * (len(impls) + 1)]
    keys = sorted(dict.fromkeys((r.operation, r.case, r.dtype) for r in rows),
                  key=lambda k: PASSES.index(k[0]))
    for operation, case, dtype in keys:
        group = {r.implementation: r for r in rows
                 if (r.operation, r.case, r.dtype) == (operation, case, dtype)}
        any_row = next(iter(group.values()))
        cells = []
        for impl in impls:
            row = group.get(impl)
            if row is None:
                cells.append("-")
                continue
            ratio = row.speedups.get("numpy")
            cells.append(f"{format_seconds(row.median_s)}, "
                         + ("" if ratio is None else f"{ratio.value:.1f}x, ")
                         + roofline_text(row))
        cpu = group.get("cpu")
        vs_torch = cpu.speedups.get("torch") if cpu else None
        flag = " **slower**" if cpu is not None and slower_than_torch(cpu) else ""
        cells.append("-" if vs_torch is None else f"{vs_torch.value:.2f}x{flag}")
        out.append(f"| {operation} | {any_row.label} | {dtype} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def layer_markdown(rows: list[Row]) -> str:
    """README small-shape table of the layer section: per (shape, dtype), the median of each
    implementation and fastbn's speedups, for the train step, eval forward and functional eval."""
    rows = [r for r in rows if r.section == "layer"]
    if not rows:
        return ""
    out = ["| shape | dtype | operation | fastbn | PyTorch | NumPy layer | fastbn vs PyTorch "
           "| fastbn vs NumPy layer |", "|---|---|---|---:|---:|---:|---:|---:|"]
    for case, dtype in dict.fromkeys((r.case, r.dtype) for r in rows):
        for operation in SECTIONS["layer"].operations:
            group = {r.implementation: r for r in rows
                     if (r.case, r.dtype, r.operation) == (case, dtype, operation)}
            if not group:
                continue
            fast = group.get("fastbn")
            label = next(iter(group.values())).label.rsplit(" ", 1)[0]
            times = [format_seconds(group[i].median_s) if i in group else "-"
                     for i in ("fastbn", "torch", "numpy-layer")]
            ratios = [_ratio_text(fast.speedups.get(k)) if fast else "-"
                      for k in ("torch", "numpy-layer")]
            out.append(f"| {label} | {dtype} | {operation} | " + " | ".join(times + ratios)
                       + " |")
    return "\n".join(out)


def fused_markdown(rows: list[Row]) -> str:
    rows = [r for r in rows if r.section == "fused"]
    if not rows:
        return ""
    out = ["| operation | shape | dtype | fastbn fused | fastbn + NumPy | PyTorch | fused vs "
           "fastbn+NumPy | fused vs PyTorch | % of fused roofline |",
           "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for operation, case, dtype in dict.fromkeys((r.operation, r.case, r.dtype) for r in rows):
        group = {r.implementation: r for r in rows
                 if (r.operation, r.case, r.dtype) == (operation, case, dtype)}
        fast = group.get("fused")
        label = next(iter(group.values())).label
        times = [format_seconds(group[i].median_s) if i in group else "-"
                 for i in ("fused", "unfused", "torch")]
        extra = ([_ratio_text(fast.speedups.get(k)) for k in ("unfused", "torch")]
                 + [roofline_text(fast)]) if fast else ["-", "-", "-"]
        out.append(f"| {operation} ({STREAMS[operation]} streams) | {label} | {dtype} | "
                   + " | ".join(times + extra) + " |")
    return "\n".join(out)


def to_markdown(results: dict, rows: list[Row]) -> str:
    """The README's performance section body for a saved run (filtered ``rows``)."""
    out = [_machine_sentence(results)]
    for title, table in (("Passes of the functional API", pass_markdown(results, rows)),
                         ("Layer API at small training shapes (median of single calls, "
                          "95 % bootstrap intervals of the speedups)", layer_markdown(rows)),
                         ("Fused batch norm + ReLU (+ add)", fused_markdown(rows))):
        if table:
            out += ["", f"**{title}**", "", table]
    skipped = results.get("skipped", [])
    if skipped:
        out += ["", "Not measured: " + "; ".join(
            f"{s['section']} {s['implementation']} ({s['reason']})" for s in skipped) + "."]
    if results.get("compile_time"):
        out += ["", format_compile_time(results["compile_time"]).replace("compile   ",
                                                                         "Compile time: ")]
    out += ["", "Targets (from this run's numbers):", ""]
    out += [f"- {line}" for line in format_targets(results["targets"]).splitlines()]
    out += ["", f"Reproduce: `{results['command']}`"]
    return "\n".join(out)
