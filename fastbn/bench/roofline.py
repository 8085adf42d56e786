"""Memory roofline: how many bytes each pass must move, and how fast this machine moves them.

Batch normalization does almost no arithmetic per byte, so its speed limit is memory bandwidth.
The roofline time of a pass is ``streams x tensor bytes / bandwidth``: the time the pass would
take if every unavoidable read and write of the tensor ran at the measured streaming rate.
This module is the one place that arithmetic, the bandwidth measurement and the rule for which
measurement a row is judged against (:class:`BandwidthSchedule`) live; the CLI report and the
pytest-benchmark suite both use it.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import numba
import numpy as np
from numba import njit, prange

from ..backends.stores import (STAGE_BYTES, l3_cache_bytes, line_span, stack_stage, store_streaming,
                               stream_lines)
from .timing import Body, Timing

# Full passes of the tensor each operation cannot avoid (minimum traffic, whatever the kernel):
# forward-train reads x for the statistics, then reads x and writes y; eval reads x and writes y;
# backward reads dy and x to reduce, then reads dy and x and writes dx; moments reads x once.
PASS_STREAMS: dict[str, int] = {
    "forward-train": 3,
    "forward-eval": 2,
    "backward": 5,
    "moments": 1,
}
PASSES: tuple[str, ...] = tuple(PASS_STREAMS)

# The fused operations of issue 13 (the fused section), counted the same way for fastbn's
# design (docs/api.md): without a residual the ReLU adds no stream, its mask is recomputed from
# x and the per-feature coefficients. The residual adds one read to the forward; its backward
# reads the mask from the forward's y in both of its passes (reduce: dy, x, y; elementwise:
# dy, x, y read, dx and d(residual) written).
FUSED_STREAMS: dict[str, int] = {
    "bn-relu-step": 3 + 5,       # forward-train + backward
    "bn-relu-eval": 2,
    "bn-add-relu-step": 4 + 8,
    "bn-add-relu-eval": 3,
}
STREAMS: dict[str, int] = {**PASS_STREAMS, **FUSED_STREAMS}

# Tensors each operation touches (x, dy, y/dx, residual, d(residual)): its working set, to tell
# DRAM-bound rows from rows whose arrays partly stay in the last-level cache between calls.
WORKING_SET_TENSORS: dict[str, int] = {
    "forward-train": 2,
    "forward-eval": 2,
    "backward": 3,
    "moments": 1,
    "bn-relu-step": 4,           # x, y, dy, dx
    "bn-relu-eval": 2,
    "bn-add-relu-step": 6,       # x, residual, y, dy, dx, d(residual)
    "bn-add-relu-eval": 3,
}
# A working set up to 2x the cache is still served partly from it ("cache"); from 8x on the
# cache cannot help ("dram", issue 10's DRAM-sized tensors); in between, "mixed".
CACHE_RESIDENT_FACTOR = 2
DRAM_FACTOR = 8
MEMORY_REGIMES: tuple[str, ...] = ("cache", "mixed", "dram")

# The same streams as (read-only streams, read+write pairs), to say how close to the roofline
# each operation can get on this machine: the roofline is the faster of the two streams, and
# the other one bounds the operation's share of that kind of traffic (on the 2-core VM reads
# alone streamed at 0.7x the read+write rate on 2026-12-07, so a read-only pass could reach
# about 70 % of the roofline at best).
STREAM_MIX: dict[str, tuple[int, int]] = {
    "forward-train": (1, 1),
    "forward-eval": (0, 1),
    "backward": (3, 1),
    "moments": (1, 0),
    "bn-relu-step": (1 + 3, 1 + 1),
    "bn-relu-eval": (0, 1),
    "bn-add-relu-step": (2 + 4, 1 + 2),     # + the residual's read; + d(residual)'s write
    "bn-add-relu-eval": (1, 1),
}

DEFAULT_BANDWIDTH_RUNS = 15
MIN_BANDWIDTH_BYTES = 256 * 2**20
L3_MULTIPLE = 8  # the stream array is this many times the L3 size, so the cache cannot help


def bytes_moved(operation: str, tensor_bytes: int) -> int:
    """Minimum bytes an ``operation`` moves over a tensor of ``tensor_bytes`` bytes."""
    try:
        return STREAMS[operation] * int(tensor_bytes)
    except KeyError:
        raise ValueError(f"unknown pass {operation!r}; choose one of {tuple(STREAMS)}") from None


def memory_regime(operation: str, tensor_bytes: int, cache_bytes: int | None) -> str | None:
    """Where the arrays of one call of ``operation`` live between calls: ``"cache"`` (working
    set at most 2x the last-level cache: part stays cached, so the % of the DRAM roofline is
    not comparable and can exceed 100), ``"dram"`` (at least 8x: streamed from memory every
    call), ``"mixed"`` in between; None when the cache size is unknown."""
    if not cache_bytes:
        return None
    working_set = WORKING_SET_TENSORS[operation] * tensor_bytes
    if working_set <= CACHE_RESIDENT_FACTOR * cache_bytes:
        return "cache"
    return "dram" if working_set >= DRAM_FACTOR * cache_bytes else "mixed"


def gb_per_s(n_bytes: float, seconds: float) -> float:
    """Effective bandwidth in GB/s (10**9 bytes per second)."""
    return n_bytes / seconds / 1e9


def roofline_percent(n_bytes: float, seconds: float, bandwidth_gb_s: float) -> float:
    """Roofline time over measured time, in percent (100 means running at the bandwidth limit)."""
    return 100.0 * (n_bytes / (bandwidth_gb_s * 1e9)) / seconds


# ----------------------------------------------------------------------------- measurement
@njit(parallel=True, fastmath=True, cache=True, nogil=True)
def _stream_read(a):
    total = 0.0
    for i in prange(a.size):
        total += a[i]
    return total


@njit(parallel=True, fastmath=True, cache=True, nogil=True)
def _stream_read_write(a, out, factor):
    for i in prange(a.size):
        out[i] = a[i] * factor


@njit(parallel=True, fastmath=True, cache=True, nogil=True)
def _stream_read_write_streaming(a, out, factor):
    # with streaming stores, as the cpu backend writes its largest outputs (backends/stores.py)
    for i in prange(a.size):
        store_streaming(out, i, a[i] * factor)


@njit(parallel=True, fastmath=True, cache=True, nogil=True)
def _stream_read_write_lines(a, out, factor):
    # streaming stores by whole lines, as the cpu backend writes its largest float32 outputs:
    # each stage of lines is computed into a stack buffer, then stored line by line
    head, end = line_span(out)
    out[:head] = a[:head] * factor
    out[end:] = a[end:] * factor
    step = STAGE_BYTES // out.itemsize
    for block in prange((end - head + step - 1) // step):
        stage = stack_stage(out)
        start = head + block * step
        stop = min(start + step, end)
        piece = a[start:stop]
        for i in range(piece.size):
            stage[i] = piece[i] * factor
        stream_lines(stage, stop - start, out, start)


@dataclass(frozen=True)
class Bandwidth:
    """Best-of-N streaming rates of this machine, in GB/s.

    ``read_gb_s`` counts the bytes read by a parallel sum; ``read_write_gb_s`` counts the bytes
    read plus the bytes written by a parallel scale (``out = a * k``), not the extra
    read-for-ownership traffic the hardware adds for ordinary stores: the fastest of the scale
    with ordinary stores and with streaming (non-temporal) ones, element by element and by
    whole cache lines, which skip that traffic and which the cpu backend uses for its largest
    outputs, so a pass using them is judged against a stream that uses them too.
    """

    read_gb_s: float
    read_write_gb_s: float
    array_bytes: int
    runs: int
    threads: int

    @property
    def roofline_gb_s(self) -> float:
        """The roofline denominator: the faster of the two streams.

        It is the fastest rate this machine was seen to move bytes, so a percentage of it is
        never flattering: a pass that writes pays for its writes and cannot reach 100 %.
        """
        return max(self.read_gb_s, self.read_write_gb_s)

    @property
    def roofline_source(self) -> str:
        return "read" if self.read_gb_s >= self.read_write_gb_s else "read+write"

    def attainable_percent(self, operation: str) -> float:
        """% of roofline an operation would reach streaming its reads at the read rate and its
        read+write pairs at the read+write rate: its ceiling at these rates."""
        reads, pairs = STREAM_MIX[operation]
        best_time = reads / self.read_gb_s + 2 * pairs / self.read_write_gb_s
        return 100.0 * (STREAMS[operation] / self.roofline_gb_s) / best_time

    def best_with(self, other: "Bandwidth") -> "Bandwidth":
        """The faster of two measurements of each stream (noise only ever slows one down)."""
        return Bandwidth(read_gb_s=max(self.read_gb_s, other.read_gb_s),
                         read_write_gb_s=max(self.read_write_gb_s, other.read_write_gb_s),
                         array_bytes=self.array_bytes, runs=self.runs + other.runs,
                         threads=self.threads)

    def to_dict(self) -> dict:
        return {**asdict(self), "roofline_gb_s": self.roofline_gb_s,
                "roofline_source": self.roofline_source,
                "attainable_percent": {op: self.attainable_percent(op) for op in STREAMS}}


def default_bandwidth_bytes() -> int:
    """Stream array size: 8x the last-level cache, at least 256 MiB."""
    cache = l3_cache_bytes() or 0
    return max(MIN_BANDWIDTH_BYTES, L3_MULTIPLE * cache)


# The read+write scale with ordinary stores, streaming ones, and streaming whole lines.
READ_WRITE_STREAMS = (_stream_read_write, _stream_read_write_streaming, _stream_read_write_lines)


def _stream_arrays(array_bytes: int | None) -> tuple[np.ndarray, np.ndarray]:
    """The float64 array the streams read (of ``array_bytes``, default
    :func:`default_bandwidth_bytes`) and the one they write."""
    array_bytes = int(array_bytes or default_bandwidth_bytes())
    # Distinct values on every page: pages of identical content (np.ones) may be merged by
    # the hypervisor's same-page sharing, and reads of one shared page would hit in cache.
    a = np.arange(max(1, array_bytes // 8), dtype=np.float64)
    return a, np.empty_like(a)


def _best_seconds(run, runs: int) -> float:
    run()  # compile (or load from cache) and fault in the pages, untimed
    best = math.inf
    for _ in range(runs):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


GPU_MIN_BANDWIDTH_BYTES = 1 << 30  # far beyond any GPU's L2 (50 MiB on an H100)


def measure_gpu_bandwidth(array_bytes: int | None = None,
                          runs: int = DEFAULT_BANDWIDTH_RUNS) -> Bandwidth:
    """Device-memory bandwidth of the current CUDA GPU, measured like :func:`measure_bandwidth`
    with Numba CUDA grid-stride kernels (the denominator of the cuda rows' roofline)."""
    from numba import cuda

    from .gpu_streams import stream_read as read, stream_read_write as read_write
    free_bytes = cuda.current_context().get_memory_info()[0]
    array_bytes = int(array_bytes or min(GPU_MIN_BANDWIDTH_BYTES, free_bytes // 4))
    a = cuda.to_device(np.arange(max(1, array_bytes // 8), dtype=np.float64))
    out = cuda.device_array_like(a)
    total = cuda.to_device(np.zeros(1))
    multiprocessors = getattr(cuda.get_current_device(), "MULTIPROCESSOR_COUNT", None)
    # 8 blocks of 256 per multiprocessor keeps every SM streaming; the simulator (which has no
    # multiprocessors and runs a Python thread per CUDA thread) gets a single small block
    blocks, threads = (8 * multiprocessors, 256) if multiprocessors else (1, 32)

    def synchronized(kernel, *args):
        def run():
            kernel[blocks, threads](*args)
            cuda.synchronize()
        return run

    read_s = _best_seconds(synchronized(read, a, total), runs)
    read_write_s = _best_seconds(synchronized(read_write, a, out, 0.5), runs)
    return Bandwidth(read_gb_s=gb_per_s(a.nbytes, read_s),
                     read_write_gb_s=gb_per_s(2 * a.nbytes, read_write_s),
                     array_bytes=int(a.nbytes), runs=runs, threads=blocks * threads)


def measure_bandwidth(array_bytes: int | None = None,
                      runs: int = DEFAULT_BANDWIDTH_RUNS) -> Bandwidth:
    """Measure streaming read and read+write bandwidth with Numba parallel kernels.

    Parameters
    ----------
    array_bytes : int, optional
        Size of the streamed array (default: :func:`default_bandwidth_bytes`). Smaller than the
        cache measures the cache, not memory; tests use that to stay fast.
    runs : int
        Timed runs after one warm-up; the best is kept (noise only ever slows a run down).
    """
    a, out = _stream_arrays(array_bytes)
    read_s = _best_seconds(lambda: _stream_read(a), runs)
    read_write_s = min(_best_seconds(lambda: stream(a, out, 0.5), runs)
                       for stream in READ_WRITE_STREAMS)
    return Bandwidth(read_gb_s=gb_per_s(a.nbytes, read_s),
                     read_write_gb_s=gb_per_s(2 * a.nbytes, read_write_s),
                     array_bytes=int(a.nbytes), runs=runs, threads=numba.get_num_threads())


# Names of the two streams when they are timed as bodies among a group's implementations.
STREAM_READ = "stream-read"
STREAM_READ_WRITE = "stream-read-write"
STREAM_BODIES = (STREAM_READ, STREAM_READ_WRITE)


class StreamBodies:
    """The two bandwidth streams as zero-argument bodies over one array pair, so a group's
    rounds can time them beside its implementations (:class:`BandwidthSchedule`, side by side).

    The read+write body is whichever scale (ordinary, streaming, or streaming-line stores) was
    fastest in three runs at construction, as :func:`measure_bandwidth` keeps the fastest.
    """

    def __init__(self, array_bytes: int | None = None) -> None:
        a, out = _stream_arrays(array_bytes)
        scale = min(READ_WRITE_STREAMS,
                    key=lambda stream: _best_seconds(lambda: stream(a, out, 0.5), 3))
        self.array_bytes = int(a.nbytes)
        self.bodies = {STREAM_READ: lambda: _stream_read(a),
                       STREAM_READ_WRITE: lambda: scale(a, out, 0.5)}

    def bandwidth(self, read: Timing, read_write: Timing) -> Bandwidth:
        """The rates of the median samples of the two bodies (the rows' own statistic)."""
        return Bandwidth(read_gb_s=gb_per_s(self.array_bytes, read.median_s),
                         read_write_gb_s=gb_per_s(2 * self.array_bytes, read_write.median_s),
                         array_bytes=self.array_bytes,
                         runs=min(read.repeats, read_write.repeats),
                         threads=numba.get_num_threads())


BETWEEN_GROUPS_RUNS = 5


class BandwidthSchedule:
    """The one bandwidth rule of both drivers (``python -m fastbn bench`` and ``pytest bench/``).

    On a shared machine the rate a core can pull from memory follows the load on the host (on
    the 2-core development VM it swung between about 35 and 60 GB/s within minutes), so one
    measurement at the start would misjudge rows timed later. The host bandwidth is probed
    before the first *group* of rows (one shape, dtype and pass: the rows compared with each
    other), between consecutive groups and after the last (:meth:`finish`); a group's roofline
    denominator is the best of the probes just before and just after it: its *peak*.

    The VM's speed also flips between two states about 1.5x apart every few seconds, and a
    best-of probe catches the fast one while a row's median may not. So where a driver can
    time the streams in a group's own rounds (``side_by_side``: the report's round robin, not
    pytest-benchmark, which times one benchmark at a time), :meth:`stream_bodies` gives them as
    bodies and :meth:`record` keeps their medians: that group's denominator is then the
    *side-by-side* bandwidth, the same statistic over the same seconds as its rows.
    """

    def __init__(self, array_bytes: int | None = None,
                 runs_at_ends: int = DEFAULT_BANDWIDTH_RUNS,
                 runs_between: int = BETWEEN_GROUPS_RUNS,
                 measure=None, side_by_side: bool = False) -> None:
        self.array_bytes = array_bytes
        self.runs_at_ends, self.runs_between = runs_at_ends, runs_between
        self._measure = measure or measure_bandwidth
        self.probes: list[Bandwidth] = []
        self.groups: list[object] = []
        self.finished = False
        self.side_by_side = side_by_side
        self._streams: StreamBodies | None = None
        self.side_by_side_bandwidth: dict[int, Bandwidth] = {}

    def stream_bodies(self) -> dict[str, Body]:
        """``{STREAM_READ: body, STREAM_READ_WRITE: body}`` to time among a group's
        implementations (empty unless ``side_by_side``)."""
        if not self.side_by_side:
            return {}
        if self._streams is None:
            self._streams = StreamBodies(self.array_bytes)
        return self._streams.bodies

    def record(self, group: int, timings: dict[str, Timing]) -> None:
        """Take the stream bodies' timings out of ``timings`` and keep group ``group``'s
        side-by-side bandwidth (a group whose streams did not run keeps only its peak)."""
        read, read_write = (timings.pop(name, None) for name in STREAM_BODIES)
        if self._streams is not None and read is not None and read_write is not None:
            self.side_by_side_bandwidth[group] = self._streams.bandwidth(read, read_write)

    def enter(self, key: object) -> int:
        """Start the group ``key`` (probing first) unless it is the current one; its index."""
        if self.groups and self.groups[-1] == key:
            return len(self.groups) - 1
        runs = self.runs_between if self.groups else self.runs_at_ends
        self.probes.append(self._measure(self.array_bytes, runs=runs))
        self.groups.append(key)
        return len(self.groups) - 1

    def finish(self) -> list[Bandwidth]:
        """Probe after the last group; returns :meth:`denominators`."""
        if not self.finished and self.groups:
            self.probes.append(self._measure(self.array_bytes, runs=self.runs_at_ends))
        self.finished = True
        return self.denominators()

    def denominators(self) -> list[Bandwidth]:
        """Per group, the best of the probes around it (after :meth:`finish`)."""
        return [before.best_with(after) for before, after in zip(self.probes, self.probes[1:])]

    def side_by_side_denominators(self) -> list[Bandwidth | None]:
        """Per group, the bandwidth timed in its own rounds, or None where none was."""
        return [self.side_by_side_bandwidth.get(g) for g in range(len(self.groups))]

    def roofline_denominators(self) -> list[Bandwidth]:
        """Per group, what its rows are judged against: the side-by-side bandwidth where it
        was timed, else the peak (after :meth:`finish`)."""
        return [timed or peak for timed, peak in zip(self.side_by_side_denominators(),
                                                     self.denominators())]

    def best(self) -> Bandwidth:
        """The fastest rates seen in the whole run."""
        best = self.probes[0]
        for probe in self.probes[1:]:
            best = best.best_with(probe)
        return best
