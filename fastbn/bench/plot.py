"""The PNG chart of a run (needs matplotlib: the ``plot`` extra).

Cache-resident rows and rows streamed from memory are plotted apart: per dtype, one row of
panels (one per pass) with the % of the memory roofline of the rows whose arrays do not fit
in twice the cache ("mixed" and "dram"), and one with the speedup over PyTorch, on a log axis,
of the cache-resident rows (their % of the DRAM roofline is not comparable and would dominate
the scale).
"""

from __future__ import annotations

from pathlib import Path

from .measure import SECTIONS
from .roofline import PASSES
from .rows import Row


def write_plot(results: dict, rows: list[Row], path: Path) -> bool:
    """Write the chart of the pass section's ``rows``; False when matplotlib is missing or
    there is nothing to plot."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [r for r in rows if r.section == "pass" and r.roofline_percent is not None]
    dtypes = list(dict.fromkeys(r.dtype for r in rows))
    passes = [p for p in PASSES if any(r.operation == p for r in rows)]
    impls = [i for i in SECTIONS["pass"].implementations if any(r.implementation == i
                                                                for r in rows)]
    if not (dtypes and passes and impls):
        return False
    fig, axes = plt.subplots(2 * len(dtypes), len(passes), squeeze=False,
                             figsize=(4.4 * len(passes), 3.4 * 2 * len(dtypes) + 1.2))
    width = 0.8 / len(impls)
    for i, dtype in enumerate(dtypes):
        for j, operation in enumerate(passes):
            streamed, cached = axes[2 * i][j], axes[2 * i + 1][j]
            for ax, in_cache, metric in ((streamed, False, "roofline"),
                                         (cached, True, "torch")):
                group = [r for r in rows if r.dtype == dtype and r.operation == operation
                         and (r.memory == "cache") == in_cache]
                cases = list(dict.fromkeys(r.case for r in group))
                # the cache panel shows speedups over PyTorch: PyTorch itself has no bar
                shown = [i for i in impls if metric == "roofline" or any(
                    r.implementation == i and "torch" in r.speedups for r in group)]
                for k, impl in enumerate(shown):
                    heights = []
                    for case in cases:
                        row = next((r for r in group if (r.implementation, r.case)
                                    == (impl, case)), None)
                        value = None if row is None else (
                            row.roofline_percent if metric == "roofline"
                            else getattr(row.speedups.get("torch"), "value", None))
                        heights.append(value or 0.0)
                    if cases and any(heights):
                        # one colour per implementation in every panel, whichever bars it has
                        ax.bar([c + (k - (len(shown) - 1) / 2) * width
                                for c in range(len(cases))], heights, width, label=impl,
                               color=f"C{impls.index(impl)}")
                labels = [next(r.label for r in group if r.case == c) for c in cases]
                ax.set_xticks(range(len(cases)))
                ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=7)
                if metric == "roofline":
                    ax.axhline(100.0, color="black", linewidth=0.8, linestyle="--")
                    ax.set_title(f"{operation}, {dtype}: not cache-resident", fontsize=9)
                    ax.set_ylabel("% of memory roofline" if j == 0 else "")
                else:
                    if any(r.speedups.get("torch") for r in group):
                        ax.set_yscale("log")
                    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
                    ax.set_title(f"{operation}, {dtype}: cache-resident", fontsize=9)
                    ax.set_ylabel("speedup over PyTorch (log)" if j == 0 else "")
                if not cases:
                    ax.set_yticks([])
                    ax.text(0.5, 0.5, "no such rows", ha="center", va="center",
                            transform=ax.transAxes, fontsize=8)
    m, b = results["machine"], results["bandwidth"]
    per_group = b.get("per_group_roofline_gb_s") or [b["roofline_gb_s"]]
    fig.suptitle(f"fastbn bench {results['created'][:10]}: {m['cpu']}, {m['usable_cpus']} "
                 f"cores; memory roofline {min(per_group):.0f} to {max(per_group):.0f} GB/s, "
                 "measured around each shape and pass", fontsize=10)
    handles, names = [], []
    for ax in axes.flat:
        for handle, name in zip(*ax.get_legend_handles_labels()):
            if name not in names:
                handles.append(handle)
                names.append(name)
    fig.legend(handles, names, loc="upper right", fontsize=8)
    # leave room for the title and legend so neither is clipped
    fig.tight_layout(rect=(0, 0, 0.93, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
