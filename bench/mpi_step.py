"""Cost of synchronizing batch norm over MPI: one training step with and without SyncBatchNorm.

    mpiexec -n 2 python -m mpi4py bench/mpi_step.py            # writes bench/results/*.json
    mpiexec -n 2 python -m mpi4py bench/mpi_step.py --quick    # tiny shapes, a few repeats

A global batch is split evenly over the ranks. Each rank times a training step on its shard,
``forward`` then ``backward`` of a float32 layer, with

* ``BatchNorm``: local statistics, nothing communicated (what a data-parallel job without
  synchronized batch norm does);
* ``SyncBatchNorm``: the statistics of the whole batch (one Allgather in the forward, one
  Allreduce in the backward);
* the two collectives alone (``merge_moments`` + ``allreduce_sums`` on vectors of C), i.e. the
  latency synchronization adds.

Every sample starts at a barrier; a step's time is the slowest rank's (a step ends for the job
when its last rank is done). Reported: the median and the best of the samples (on a shared
machine a rank descheduled for a time slice delays the other at the next collective, so the
medians there measure the load as much as fastbn), and the bytes each rank sends and receives
per step, counted from the buffers the collectives were given.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numba
import numpy as np
from mpi4py import MPI

import fastbn
from fastbn.bench.machine import machine_info, versions
from fastbn.distributed import SyncBatchNorm, allreduce_sums, merge_moments

SHAPES = {"(256, 1024) NC": ((256, 1024), 1), "(32, 64, 56, 56) NCHW": ((32, 64, 56, 56), 1)}
QUICK_SHAPES = {"(16, 8) NC": ((16, 8), 1), "(4, 3, 5, 5) NCHW": ((4, 3, 5, 5), 1)}
RESULTS = Path(__file__).resolve().parent / "results"


class ByteCountingComm:
    """A communicator that adds up the bytes handed to Allgather and Allreduce."""

    def __init__(self, comm: MPI.Comm) -> None:
        self._comm = comm
        self.sent = self.received = 0

    def __getattr__(self, name: str):
        return getattr(self._comm, name)

    def Allgather(self, send, receive):
        self.sent += send[0].nbytes
        self.received += receive[0].nbytes
        return self._comm.Allgather(send, receive)

    def Allreduce(self, send, receive, op=MPI.SUM):
        self.sent += send[0].nbytes
        self.received += receive[0].nbytes
        return self._comm.Allreduce(send, receive, op=op)


def job_seconds(comm: MPI.Comm, step, repeats: int) -> list[float]:
    """Per sample, the slowest rank's time of ``step()``, each sample started at a barrier."""
    step()  # warm-up: compilation caches, buffer pool
    samples = []
    for _ in range(repeats):
        comm.Barrier()
        start = time.perf_counter()
        step()
        samples.append(comm.allreduce(time.perf_counter() - start, op=MPI.MAX))
    return samples


def measure(comm: MPI.Comm, label: str, shape: tuple[int, ...], axis: int, backend: str,
            repeats: int) -> dict:
    size, rank = comm.Get_size(), comm.Get_rank()
    C = shape[axis]
    local_shape = (shape[0] // size,) + shape[1:]
    rng = np.random.default_rng(rank)
    x = rng.standard_normal(local_shape, dtype=np.float32)
    dy = rng.standard_normal(local_shape, dtype=np.float32)
    counting = ByteCountingComm(comm)
    layers = {"BatchNorm": fastbn.BatchNorm(C, axis=axis, backend=backend),
              "SyncBatchNorm": SyncBatchNorm(C, axis=axis, backend=backend, comm=counting)}

    def train_step(layer):
        def step():
            layer.forward(x)
            layer.backward(dy)
        return step

    count = x.size // C
    mean, var = fastbn.moments(x.astype(np.float64), axis=axis, backend=backend)

    def collectives():
        merge_moments(comm, count, mean, var)
        allreduce_sums(comm, count, mean, var)  # any two vectors of C: the cost is the same

    row = {"shape": label, "global_shape": list(shape), "local_shape": list(local_shape),
           "dtype": "float32", "backend": backend, "ranks": size, "repeats": repeats}
    for name, step in (("BatchNorm", train_step(layers["BatchNorm"])),
                       ("SyncBatchNorm", train_step(layers["SyncBatchNorm"])),
                       ("collectives", collectives)):
        samples = job_seconds(comm, step, repeats)
        row[f"{name}_median_s"] = statistics.median(samples)
        row[f"{name}_samples_s"] = samples
    steps = repeats + 1
    row["bytes_sent_per_rank_per_step"] = counting.sent // steps
    row["bytes_received_per_rank_per_step"] = counting.received // steps
    row["sync_overhead"] = row["SyncBatchNorm_median_s"] / row["BatchNorm_median_s"] - 1.0
    return row


def format_seconds(seconds: float) -> str:
    return f"{seconds * 1e6:.1f} us" if seconds < 1e-3 else f"{seconds * 1e3:.2f} ms"


def format_table(rows: list[dict]) -> str:
    """Markdown table; each time is "median (best)" of the samples."""
    def cell(row: dict, name: str) -> str:
        return (f"{format_seconds(row[f'{name}_median_s'])} "
                f"({format_seconds(min(row[f'{name}_samples_s']))})")

    lines = ["| global shape (float32) | ranks | BatchNorm step | SyncBatchNorm step | overhead "
             "(of medians) | collectives alone | bytes sent / received per rank per step |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['ranks']} | {cell(r, 'BatchNorm')} "
                     f"| {cell(r, 'SyncBatchNorm')} | {100 * r['sync_overhead']:+.0f} % "
                     f"| {cell(r, 'collectives')} | {r['bytes_sent_per_rank_per_step']} / "
                     f"{r['bytes_received_per_rank_per_step']} |")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, 3 repeats")
    parser.add_argument("--repeats", type=int, default=None, help="samples per measurement")
    parser.add_argument("--backend", default="cpu", choices=("numpy", "cpu"))
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON path (default bench/results/fastbn-mpi-step-DATE-Nranks.json)")
    args = parser.parse_args(argv)
    comm = MPI.COMM_WORLD
    size, rank = comm.Get_size(), comm.Get_rank()
    # the ranks share the machine's cores: one Numba thread pool per rank of cores / ranks
    numba.set_num_threads(max(1, numba.config.NUMBA_NUM_THREADS // size))
    load_before = os.getloadavg()[0]  # a shared machine's load moves collective latencies
    repeats = args.repeats or (3 if args.quick else 20)
    shapes = QUICK_SHAPES if args.quick else SHAPES
    rows = [measure(comm, label, shape, axis, args.backend, repeats)
            for label, (shape, axis) in shapes.items()]
    if rank != 0:
        return
    created = datetime.now(timezone.utc)
    results = {"created": created.isoformat(), "mpi_library": MPI.Get_library_version().strip(),
               "numba_threads_per_rank": numba.get_num_threads(), "machine": machine_info(),
               "versions": versions(), "load_average_1min": [load_before, os.getloadavg()[0]],
               "rows": rows}
    out = args.out or RESULTS / f"fastbn-mpi-step-{created:%Y-%m-%d}-{size}ranks.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(f"{size} ranks on {results['machine']['cpu']} ({results['machine']['logical_cpus']} "
          f"logical CPUs), Numba {numba.get_num_threads()} thread(s) per rank, "
          f"{results['mpi_library'].splitlines()[0]}; 1-minute load average "
          f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after")
    print(format_table(rows))
    print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
