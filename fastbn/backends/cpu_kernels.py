"""Numba ``@njit`` kernels of the ``"cpu"`` backend.

======================================  ============================================================
kernel                                  job
======================================  ============================================================
``batch_moments_planar``                statistics pass: per-feature mean and biased variance
``batch_moments_channels_last``         the same on ``(rows, C)``
``update_running_stats``                per feature: running averages, all or nothing
``normalize_coefficients``              per feature: invstd, scale, shift
``scale_shift_planar``                  forward elementwise: y = act(x*scale + shift [+ residual])
``scale_shift_channels_last``           the same on ``(rows, C)``
``backward_reduce_planar``              backward reduction: dgamma, dbeta
``backward_reduce_channels_last``       the same on ``(rows, C)``
``backward_coefficients``               per feature: dy_scale, x_scale, dx_shift
``backward_elementwise_planar``         backward elementwise: dx = g*dy_scale + x*x_scale + dx_shift
``backward_elementwise_channels_last``  the same on ``(rows, C)``
``forward_train_planar``                whole pass, one call: statistics, checks, running
                                        update, forward elementwise pass (cpu only)
``forward_train_channels_last``         the same on ``(rows, C)``
``backward_planar``                     whole pass, one call: both backward passes (cpu only)
``backward_channels_last``              the same on ``(rows, C)``
======================================  ============================================================

Two layouts of the canonical ``(outer, C, inner)`` view, as named twins:

* ``*_planar``: ``inner > 1`` (NCHW, the course layout ``(C, m)``): each ``(o, c)`` row is a
  contiguous run of one feature, cut into cache-sized chunks (``PLANAR_CHUNK``).
* ``*_channels_last``: ``inner == 1`` (NC, NHWC): viewed as a 2-D ``(rows, C)`` array whose rows
  hold every feature, processed in blocks of rows so the vector loop runs along C.

Each pass kernel also does its per-feature step (coefficients from the statistics, the merge of
the per-thread partials), so one backend call is one compiled call: at training sizes the
Python around a kernel costs more than the kernel. Per-feature math comes from
``feature_math`` (shared with the CUDA kernels), compiled here with ``njit(inline="always")``.

Reductions give each thread its own slice of partial results (``prange`` over threads), then
``merge_thread_partials`` merges them serially in float64. Statistics are one pass: each chunk
of a planar row (``PLANAR_CHUNK``), or block of channels-last rows, is summed as ``x - pivot``
and ``(x - pivot)**2`` in float64 and merged into the thread's moments with Chan's formula. The
pivot is the feature's mean so far (the chunk's first value for its first chunk), so the sums
do not cancel: the error of ``M2 = S2 - S1**2/n`` is of the order of eps times the squared
distance of the chunk from that mean, which Chan's merge adds to M2 anyway. It converts each
element once (a two-pass chunk converts twice, and the conversions bound the loop) and
vectorizes; per-element Welford would need a divide per element and does not.

Elements are loaded with ``widen`` and stored with ``narrow`` (rounded once), which handle
float16 given as its uint16 bits (``half``: F16C's conversions, which vectorize, where the CPU
has them; exact software ones elsewhere). float32 and float64 elements are computed in
float64. float16 elements are computed in float32, as PyTorch's CPU kernels do: the
per-feature values are computed in float64 and rounded to float32
(``elementwise_coefficients``), and the sums are kept in float32 for at most
FLOAT32_SUM_TERMS terms, then added in float64; in float64 these passes were bound by their
arithmetic, not by memory. Kernels take ``max_threads`` as their last
argument: calling ``numba.get_num_threads()`` inside a kernel makes it uncacheable (a dynamic
global), and every process would recompile. It defaults to 1, and a serial call that omits it
compiles with the constant, which LLVM folds into the kernels it calls (0.3-0.8 us less per
call on small inputs, measured). Outputs are arguments, never return values: a
returned array costs about 0.6 us of boxing per call.
"""

from __future__ import annotations

import math
import types

import numpy as np
from numba import njit, prange
from numba import types as nb_types
from numba.extending import overload

from . import feature_math
from .contract import FORWARD_DONE, NONFINITE_STATISTICS, RUNNING_OVERFLOW
from .half import elementwise_coefficients, elementwise_float, narrow, widen, zero_of
from .prefetch import prefetch_element, prefetch_element_to_l2
from .stores import (line_span, stack_stage, store, store_streaming, stream_lines,
                     streams_by_lines)

# Reassociation lets LLVM vectorize the float64 reductions; no 'nnan'/'ninf', so NaN and Inf
# still propagate to the statistics, where the non-finite check looks for them. No 'contract'
# either: the backward recomputes the forward's ReLU mask from x, which must give bitwise the
# forward's y, and a multiply-add fused into an FMA in one kernel but not the other would not.
FASTMATH = {"reassoc", "nsz", "arcp"}
# error_model="numpy": a division by zero gives inf/nan instead of a Python exception, whose
# check would also keep the loops from vectorizing.
HELPER = dict(cache=True, fastmath=FASTMATH, error_model="numpy")
# Per-element helpers are inlined in Numba's IR (inline="always"): left to LLVM,
# a call taking array views can stay out of line, paying reference counting per element
# (measured: the ReLU backward reading y went from 1.4 ms to 86 ms when it did).
# The statistics pass may fuse multiply-adds (it has no bitwise twin to agree with).
STATISTICS_FASTMATH = FASTMATH | {"contract"}
# Finiteness checks without fast-math: under 'reassoc' LLVM may fold isfinite's x - x to 0.
# Explicitly False: a function that leaves fastmath unset inherits its caller's flags when a
# fast-math kernel compiles it first, and that compilation is then cached and reused by every
# direct call (a whole pass compiled before update_running_stats made it accept NaN).
CHECK = dict(cache=True, error_model="numpy", fastmath=False)
KERNEL = dict(HELPER, parallel=True, nogil=True)
SERIAL_KERNEL = dict(HELPER, nogil=True)

#: The single-threaded compilation of each parallel kernel, by kernel name.
SERIAL = {}


def threaded_and_serial(kernel):
    """Compile a kernel with ``parallel=True``, and once more without it into ``SERIAL``.

    Small inputs take the serial one: entering a ``parallel=True`` function synchronizes with
    Numba's thread pool even when it then runs one thread, and when BLAS threads still spin on
    the cores after a matmul that costs milliseconds (measured: 8 ms per call beside a 64x128
    matmul, against 6 us). The serial one called with ``max_threads = T`` splits the work into
    the same T partials as the threaded one, so it gives bitwise the same result (a forked
    child uses that). The copy gets its own name, so the two compilations cache apart.
    """
    SERIAL[kernel.__name__] = njit(**SERIAL_KERNEL)(_serial_copy(kernel, kernel.__globals__))
    return njit(**KERNEL)(kernel)


def _serial_copy(function, names):
    """``function`` named ``<name>_serial`` (so its compilation caches apart), reading its
    global names from ``names``."""
    serial = types.FunctionType(function.__code__, names, function.__name__ + "_serial",
                                function.__defaults__, function.__closure__)
    serial.__qualname__ = function.__qualname__ + "_serial"
    return serial


PLANAR_CHUNK = 4096        # elements of one row summed before a merge by batch_moments_planar
# float16 elements are summed in float32 (as PyTorch's CPU kernels do; float64 cost twice the
# time, the passes being compute-bound there), in sums of at most this many terms, which are
# then added in float64: each float32 sum is then within 256 * 2**-24 = 1.5e-5 of the sum of
# its terms' magnitudes, far below float16's own 2**-11.
FLOAT32_SUM_TERMS = 256
# Channels-last rows summed in one float32 block: 4-row trips (short rows) give each feature's
# sum FLOAT32_SUM_TERMS terms, 8-row trips (long rows) half as many.
FLOAT32_SUM_ROWS = 4 * FLOAT32_SUM_TERMS
BLOCK_ELEMENTS = 65536     # elements in a block of channels-last rows summed before a merge
MIN_BLOCK_ROWS = 8         # keeps the per-block merge cheap when C is very large

# ----------------------------------------------------------------------------- shared math
_inline = njit(inline="always", cache=True)
chan_merge = _inline(feature_math.chan_merge)
inverse_std = _inline(feature_math.inverse_std)
affine_scale = _inline(feature_math.affine_scale)
affine_shift = _inline(feature_math.affine_shift)
backward_dy_scale = _inline(feature_math.backward_dy_scale)
backward_x_scale = _inline(feature_math.backward_x_scale)
backward_dx_shift = _inline(feature_math.backward_dx_shift)
unbiased_variance = _inline(feature_math.unbiased_variance)
running_average = _inline(feature_math.running_average)


def feature_value(vector, c, default):
    """``vector[c]`` as float64, or ``default`` where the vector is None (gamma/beta)."""


@overload(feature_value, inline="always")
def _feature_value(vector, c, default):
    if isinstance(vector, nb_types.NoneType):
        return lambda vector, c, default: default
    return lambda vector, c, default: widen(vector[c])


def plus_residual(value, residual, at):
    """``value + residual[at]`` in float64, or ``value`` where there is no residual (None)."""


@overload(plus_residual, inline="always")
def _plus_residual(value, residual, at):
    if isinstance(residual, nb_types.NoneType):
        return lambda value, residual, at: value
    return lambda value, residual, at: value + widen(residual[at])


def relu_floor(like):
    """``feature_math.relu_floor`` of the element type of ``like`` (uint16 bits: float16)."""


@overload(relu_floor, inline="always")
def _relu_floor(like):
    if like.dtype == nb_types.uint16:
        # float16's elementwise arithmetic is float32 (half.elementwise_coefficients); its
        # floor, 2**-25, is exact there.
        half_floor = feature_math.relu_floor(np.float16)
        return lambda like: np.float32(half_floor)
    floor = feature_math.relu_floor(np.dtype(str(like.dtype)))
    return lambda like: floor


def relu_passes(x, y, at, scale, shift):
    """Whether the forward's ReLU let element ``at`` through (its stored output > 0): read
    from y, or, where y is None, recomputed as the forward computed it (``x*scale + shift``)
    and compared with ``relu_floor``, so it agrees bit for bit."""


@overload(relu_passes, inline="always")
def _relu_passes(x, y, at, scale, shift):
    if isinstance(y, nb_types.NoneType):
        return lambda x, y, at, scale, shift: widen(x[at]) * scale + shift > relu_floor(x)
    return lambda x, y, at, scale, shift: widen(y[at]) > zero_of(widen(y[at]))


def run_of(a, o, c, start, stop):
    """The run ``a[o, c, start:stop]`` of an optional array (None stays None)."""


@overload(run_of, inline="always")
def _run_of(a, o, c, start, stop):
    if isinstance(a, nb_types.NoneType):
        return lambda a, o, c, start, stop: None
    return lambda a, o, c, start, stop: a[o, c, start:stop]


def summed_in_float32(a):
    """Whether the elements of ``a`` are summed in float32 parts (float16's, see
    FLOAT32_SUM_TERMS): a constant of the compiled function, so the other branch of an
    ``if`` on it compiles away (``a.itemsize`` is read at run time)."""


@overload(summed_in_float32, inline="always")
def _summed_in_float32(a):
    if a.dtype == nb_types.uint16:
        return lambda a: True
    return lambda a: False


def part_of(a, start, stop):
    """``a[start:stop]`` of an optional 1-D array (None stays None)."""


@overload(part_of, inline="always")
def _part_of(a, start, stop):
    if isinstance(a, nb_types.NoneType):
        return lambda a, start, stop: None
    return lambda a, start, stop: a[start:stop]


def row_of(a, r):
    """Row ``a[r]`` of an optional array (None stays None)."""


@overload(row_of, inline="always")
def _row_of(a, r):
    if isinstance(a, nb_types.NoneType):
        return lambda a, r: None
    return lambda a, r: a[r]


def rows_of(a):
    """The ``(rows, C)`` view of a channels-last ``(rows, C, 1)`` array (None stays None)."""


@overload(rows_of, inline="always")
def _rows_of(a):
    if isinstance(a, nb_types.NoneType):
        return lambda a: None
    return lambda a: a.reshape(a.shape[0], a.shape[1])


@njit(inline="always", cache=True, fastmath=STATISTICS_FASTMATH)
def pivoted_part_sums(part, pivot):
    """``sum(part - pivot)`` and the sum of its squares, in the type of ``pivot``."""
    total = zero_of(pivot)
    total_sq = zero_of(pivot)
    for i in range(part.size):
        d = widen(part[i]) - pivot
        total += d
        total_sq += d * d
    return total, total_sq


@njit(inline="always", cache=True, fastmath=STATISTICS_FASTMATH)
def pivoted_run_sums(run, element_pivot):
    """float64 ``sum(run - element_pivot)`` and the sum of its squares. float16 runs are summed
    in float32 parts of at most FLOAT32_SUM_TERMS elements (``element_pivot`` is then a
    float32), which are added in float64."""
    if not summed_in_float32(run):
        return pivoted_part_sums(run, element_pivot)
    total = 0.0
    total_sq = 0.0
    for start in range(0, run.size, FLOAT32_SUM_TERMS):
        part_total, part_total_sq = pivoted_part_sums(run[start:start + FLOAT32_SUM_TERMS],
                                                      element_pivot)
        total += part_total
        total_sq += part_total_sq
    return total, total_sq


@njit(inline="always", cache=True, fastmath=STATISTICS_FASTMATH)
def pivoted_moments(count, pivot, total, total_sq):
    """Count, mean and sum of squared deviations of ``count`` elements from their pivoted sums
    (``pivot`` a value near their mean, so the two sums do not cancel)."""
    shifted_mean = total / count
    return count, pivot + shifted_mean, max(total_sq - total * shifted_mean, 0.0)


@njit(inline="always", cache=True, fastmath=STATISTICS_FASTMATH)
def pivoted_chunk_moments(run, pivot):
    """Count, mean and sum of squared deviations of a 1-D run, in one pass of sums shifted by
    ``pivot`` (rounded to float32 for float16 runs, see ``pivoted_run_sums``)."""
    element_pivot = elementwise_float(pivot, run)
    total, total_sq = pivoted_run_sums(run, element_pivot)
    return pivoted_moments(float(run.size), element_pivot, total, total_sq)


@njit(**HELPER)
def merge_thread_partials(count, mean, m2, out_mean, out_var):
    """Merge per-thread ``(T, C)`` partial moments into per-feature mean and biased variance."""
    threads, features = count.shape
    for c in range(features):
        n, mu, q = 0.0, 0.0, 0.0
        for t in range(threads):
            n, mu, q = chan_merge(n, mu, q, count[t, c], mean[t, c], m2[t, c])
        out_mean[c] = mu
        out_var[c] = q / n


@njit(inline="always", cache=True)
def thread_range(items, threads, t):
    return items * t // threads, items * (t + 1) // threads


@njit(inline="always", cache=True)
def planar_work(x, chunk):
    """Number of chunks per row and of work items (row chunks) in a planar view."""
    outer, features, inner = x.shape
    n_chunks = (inner + chunk - 1) // chunk
    return n_chunks, outer * features * n_chunks


@njit(inline="always", cache=True)
def planar_outer_span(lo, hi, features, n_chunks):
    """``[o0, o1)``: the outer indices whose rows hold work items ``[lo, hi)``. Items are
    ``(row, piece)`` with ``row = o * features + c``, numbered row by row."""
    per_outer = features * n_chunks
    return lo // per_outer, (hi + per_outer - 1) // per_outer


@njit(inline="always", cache=True)
def planar_feature_span(o, lo, hi, features, n_chunks):
    """``[c0, c1)``: the features of outer index ``o`` whose rows hold items of ``[lo, hi)``."""
    first = o * features * n_chunks
    return max(lo - first, 0) // n_chunks, min((hi - first + n_chunks - 1) // n_chunks, features)


@njit(inline="always", cache=True)
def planar_piece_span(o, c, lo, hi, features, n_chunks):
    """``[p0, p1)``: the pieces of row ``(o, c)`` among items ``[lo, hi)``."""
    first = (o * features + c) * n_chunks
    return max(lo - first, 0), min(hi - first, n_chunks)


@njit(inline="always", cache=True)
def thread_count(max_threads, items):
    return max(1, min(max_threads, items))


# Each parallel kernel is a prange over threads handing every thread a contiguous range of work
# items to a serial function (``*_items``): loops written directly inside a prange body are
# compiled as part of Numba's parfor and lose their vectorization; called functions keep it.
# Inner loops run over a slice from 0 (``run[i]``), not over ``range(start, stop)`` of the
# row: LLVM vectorizes the first and not the second (measured: 6x slower statistics).
# Planar items are walked as nested loops over o and c, with rows of one chunk (inner up to
# PLANAR_CHUNK) taken whole: a flat loop stepping (o, c, piece), or a piece loop around every
# row, cost 5-10 ns per row, which is most of the time on short rows (measured, serial:
# (128, 64, 16) float64 scale-shift 70 -> 32 us, (32, 16, 64) statistics 11 -> 9.5 us).

# ----------------------------------------------------------------------------- statistics
# Short planar rows are summed four at a time, one feature's rows at outer indices o..o+3 in
# one loop: each loop's vector sums end in a horizontal reduction, which on a row of a few
# dozen elements costs as much as the row (measured serially side by side against one row per
# loop, float32/float64/float16: statistics (32, 16, 64) 1.1-1.9x, (64, 16, 37) 1.3-1.45x,
# (16, 64, 256) 1.02-1.07x; backward reduction 1.3-1.6x, 1.5-1.9x, 1.06-1.15x, with ReLU as
# much; rows of 1024, which take no trips, level). Each trip body is compiled on its own, with
# trips (and in the backward relu) a constant: one body choosing at run time slowed float16
# rows of 256 to 0.8x.
PLANAR_TRIP_TERMS = 1024


@njit(inline="always", cache=True)
def takes_planar_trips(x):
    """Whether the planar view's rows are short enough for 4-row trips (float16's four rows
    at most FLOAT32_SUM_TERMS elements in all, its sums being float32)."""
    limit = FLOAT32_SUM_TERMS if summed_in_float32(x) else PLANAR_TRIP_TERMS
    return 4 * x.shape[2] <= limit


@njit(inline="always", cache=True)
def whole_planar_trip(o, o1, lo, hi, features):
    """Whether items ``[lo, hi)`` hold every row at outer indices ``o .. o + 3``."""
    return (o + 4 <= o1 and planar_feature_span(o, lo, hi, features, 1)[0] == 0
            and planar_feature_span(o + 3, lo, hi, features, 1)[1] == features)


@njit(inline="always", cache=True, fastmath=STATISTICS_FASTMATH, error_model="numpy")
def pivoted_four_run_sums(r0, r1, r2, r3, pivot):
    """``pivoted_part_sums`` of four runs of one length, summed in one loop."""
    total = zero_of(pivot)
    total_sq = zero_of(pivot)
    for i in range(r0.size):
        d0 = widen(r0[i]) - pivot
        d1 = widen(r1[i]) - pivot
        d2 = widen(r2[i]) - pivot
        d3 = widen(r3[i]) - pivot
        total += (d0 + d1) + (d2 + d3)
        total_sq += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)
    return total, total_sq


@njit(inline="always", cache=True)
def merge_planar_block(c, inner, pivot, total, total_sq, rows, count, mean, m2):
    """Merge feature ``c``'s open block of ``rows[c]`` rows into its moments; empty it."""
    n_b, mean_b, m2_b = pivoted_moments(float(rows[c] * inner), pivot[c], total[c], total_sq[c])
    count[c], mean[c], m2[c] = chan_merge(count[c], mean[c], m2[c], n_b, mean_b, m2_b)
    total[c], total_sq[c], rows[c] = 0.0, 0.0, 0


@njit(inline="always", cache=True, fastmath=STATISTICS_FASTMATH, error_model="numpy")
def moments_rows_planar_in_trips(x, lo, hi, count, mean, m2, trips):
    """``moments_rows_planar``, in 4-row trips where ``trips`` (a constant, so that each
    compilation keeps one loop body)."""
    features, inner = x.shape[1], x.shape[2]
    block_rows = max(1, PLANAR_CHUNK // inner)
    # per feature: the open block's pivot (as the elements are computed), sums and row count
    pivot = np.empty(features)
    total = np.zeros(features)
    total_sq = np.zeros(features)
    rows = np.zeros(features, np.int64)
    o0, o1 = planar_outer_span(lo, hi, features, 1)
    o = o0
    while o < o1:
        whole_trip = trips and whole_planar_trip(o, o1, lo, hi, features)
        c0, c1 = planar_feature_span(o, lo, hi, features, 1)
        for c in range(c0, c1):
            if rows[c] == 0:
                pivot[c] = elementwise_float(mean[c] if count[c] > 0.0 else widen(x[o, c, 0]),
                                             x)
            element_pivot = elementwise_float(pivot[c], x)
            if whole_trip:
                run_total, run_total_sq = pivoted_four_run_sums(
                    x[o, c, 0:inner], x[o + 1, c, 0:inner], x[o + 2, c, 0:inner],
                    x[o + 3, c, 0:inner], element_pivot)
                rows[c] += 4
            else:
                run_total, run_total_sq = pivoted_run_sums(x[o, c, 0:inner], element_pivot)
                rows[c] += 1
            total[c] += run_total
            total_sq[c] += run_total_sq
            if rows[c] >= block_rows:
                merge_planar_block(c, inner, pivot, total, total_sq, rows, count, mean, m2)
        o += 4 if whole_trip else 1
    for c in range(features):
        if rows[c] > 0:
            merge_planar_block(c, inner, pivot, total, total_sq, rows, count, mean, m2)


@njit(cache=True, fastmath=STATISTICS_FASTMATH, error_model="numpy")
def moments_rows_planar(x, lo, hi, count, mean, m2):
    """``moments_items_planar`` of rows of one chunk: each feature's rows are summed about one
    pivot into blocks of about PLANAR_CHUNK elements, each merged once; short rows four at
    a time (``takes_planar_trips``)."""
    if takes_planar_trips(x):
        moments_rows_planar_in_trips(x, lo, hi, count, mean, m2, True)
    else:
        moments_rows_planar_in_trips(x, lo, hi, count, mean, m2, False)


@njit(cache=True, fastmath=STATISTICS_FASTMATH, error_model="numpy")
def moments_items_planar(x, chunk, lo, hi, count, mean, m2):
    features, inner = x.shape[1], x.shape[2]
    n_chunks = planar_work(x, chunk)[0]
    if n_chunks == 1:
        moments_rows_planar(x, lo, hi, count, mean, m2)
        return
    o0, o1 = planar_outer_span(lo, hi, features, n_chunks)
    for o in range(o0, o1):
        c0, c1 = planar_feature_span(o, lo, hi, features, n_chunks)
        for c in range(c0, c1):
            p0, p1 = planar_piece_span(o, c, lo, hi, features, n_chunks)
            for piece in range(p0, p1):
                start = piece * chunk
                stop = min(start + chunk, inner)
                pivot = mean[c] if count[c] > 0.0 else widen(x[o, c, start])
                n_b, mean_b, m2_b = pivoted_chunk_moments(x[o, c, start:stop], pivot)
                count[c], mean[c], m2[c] = chan_merge(count[c], mean[c], m2[c], n_b, mean_b,
                                                      m2_b)


@threaded_and_serial
def batch_moments_planar(x, chunk, out_mean, out_var, max_threads=1):
    features = x.shape[1]
    items = planar_work(x, chunk)[1]
    threads = thread_count(max_threads, items)
    count = np.zeros((threads, features))
    mean = np.zeros((threads, features))
    m2 = np.zeros((threads, features))
    for t in prange(threads):
        lo, hi = thread_range(items, threads, t)
        moments_items_planar(x, chunk, lo, hi, count[t], mean[t], m2[t])
    merge_thread_partials(count, mean, m2, out_mean, out_var)


# Channels-last sweeps add several rows per trip along C: each row alone would load and store
# the float64 accumulators once per element, which bounds the loop below the DRAM rate.
# Rows of up to PREFETCH_ROW_BYTES (short rows) and longer rows take separate sweeps, each
# compiled on its own: a trip loop choosing among 2-, 4- and 8-row bodies at run time compiled
# the short-row bodies worse (measured on the 2-core Zen 4 EPYC, (4096, 64) float32 serial:
# 0.75x the speed of the same 4-row body in a sweep without the 8-row branch).
#
# Short rows: a trip adds 4 rows, or 2 of float64 rows: on (401408, 64) float64 four rows at
# once ran at 45-60 % of the read bandwidth where two ran at 65-80 % (eight rows of float32:
# 0.6-0.8x the speed of four, on 2 threads and on one). Short rows read side by side defeat
# the hardware prefetchers, so each trip hints lines ahead (at (401408, 64) float32 on 2
# threads: 47 -> 80 % of the read bandwidth with hints into every cache PREFETCH_AHEAD
# bytes ahead, which the backward reduction keeps). The statistics hint into L2 only, and
# MOMENTS_PREFETCH_AHEAD bytes ahead: on the Zen 4 EPYC that ran 1.3-1.5x faster than
# PREFETCH_AHEAD into every cache on 1 thread ((802816, 64) float32, (401408, 64) float64),
# and 1.2-1.8x and 1.7x on 2; into every cache 4-8 KiB ahead gained only 1.05-1.15x, into
# L2 2 KiB ahead lost, 8-32 KiB ahead did about equally well.
#
# Long rows: a trip adds 8 rows, which halves the accumulator loads and stores per element
# against 4 (measured on the Zen 4 EPYC, old/new time: (32768, 1024) float32 1.1-1.3x on 1
# thread and 1.1-1.2x on 2, (16384, 1024) float64 1.1-1.25x on both, (256, 1024) float64 in
# cache 1.1x). No hints: each 4-8 KiB row is one or two pages, and hinting the next trip's
# lines (32-64 KiB ahead) cost 20 % on 2 threads at (32768, 1024) float32 into every cache
# (as much as L1 holds) and 10 % on 1 thread into L2; hinting only the first lines of each
# next row did not help.
PREFETCH_ROW_BYTES = 512
PREFETCH_AHEAD = 2048
MOMENTS_PREFETCH_AHEAD = 16384
CACHE_LINE = 64


@njit(inline="always", cache=True, fastmath=STATISTICS_FASTMATH, error_model="numpy")
def add_two_rows(x0, x1, pivot, total, total_sq):
    for c in range(total.size):
        p = pivot[c]
        d0, d1 = widen(x0[c]) - p, widen(x1[c]) - p
        total[c] += d0 + d1
        total_sq[c] += d0 * d0 + d1 * d1


@njit(inline="always", cache=True, fastmath=STATISTICS_FASTMATH, error_model="numpy")
def add_four_rows(x0, x1, x2, x3, pivot, total, total_sq):
    for c in range(total.size):
        p = pivot[c]
        d0, d1 = widen(x0[c]) - p, widen(x1[c]) - p
        d2, d3 = widen(x2[c]) - p, widen(x3[c]) - p
        total[c] += (d0 + d1) + (d2 + d3)
        total_sq[c] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)


@njit(inline="always", cache=True, fastmath=STATISTICS_FASTMATH, error_model="numpy")
def add_eight_rows(x0, x1, x2, x3, x4, x5, x6, x7, pivot, total, total_sq):
    for c in range(total.size):
        p = pivot[c]
        d0, d1 = widen(x0[c]) - p, widen(x1[c]) - p
        d2, d3 = widen(x2[c]) - p, widen(x3[c]) - p
        d4, d5 = widen(x4[c]) - p, widen(x5[c]) - p
        d6, d7 = widen(x6[c]) - p, widen(x7[c]) - p
        total[c] += ((d0 + d1) + (d2 + d3)) + ((d4 + d5) + (d6 + d7))
        total_sq[c] += (((d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3))
                        + ((d4 * d4 + d5 * d5) + (d6 * d6 + d7 * d7)))


@njit(inline="always", cache=True, fastmath=STATISTICS_FASTMATH, error_model="numpy")
def add_rows_one_by_one(x, r0, r1, pivot, total, total_sq):
    """The rows ``[r0, r1)`` left over after the trips."""
    for r in range(r0, r1):
        xr = x[r]
        for c in range(total.size):
            d = widen(xr[c]) - pivot[c]
            total[c] += d
            total_sq[c] += d * d


@njit(inline="always", cache=True)
def is_short_row(x):
    """Whether the rows of the channels-last view ``x`` are short (see PREFETCH_ROW_BYTES)."""
    return x.shape[1] * x.itemsize <= PREFETCH_ROW_BYTES


@njit(inline="always", cache=True)
def trip_rows(x):
    """Rows of the channels-last view ``x`` that one trip along C adds up: 8 on long rows, 4 on
    short ones, 2 on short float64 rows (see PREFETCH_ROW_BYTES)."""
    if not is_short_row(x):
        return 8
    return 2 if x.itemsize == 8 else 4


# The trip hints index the flat view of the whole array (made once per sweep): indexing a row
# view per trip instead cost more than the sums in cache (one thread, (4096, 64) float32
# statistics sweep 17 GB/s with row views, 40 GB/s flat, the same hints; from DRAM both 34 GB/s).
@njit(inline="always", cache=True)
def prefetch_trip(flat, at, trip_elements):
    """Hint the lines of the ``trip_elements`` elements PREFETCH_AHEAD bytes past element
    ``at`` of the 1-D ``flat``."""
    ahead = at + PREFETCH_AHEAD // flat.itemsize
    for e in range(ahead, ahead + trip_elements, CACHE_LINE // flat.itemsize):
        prefetch_element(flat, e)


@njit(inline="always", cache=True)
def prefetch_trip_to_l2(flat, at, trip_elements):
    """``prefetch_trip`` MOMENTS_PREFETCH_AHEAD bytes ahead, into L2."""
    ahead = at + MOMENTS_PREFETCH_AHEAD // flat.itemsize
    for e in range(ahead, ahead + trip_elements, CACHE_LINE // flat.itemsize):
        prefetch_element_to_l2(flat, e)


@njit(cache=True, fastmath=STATISTICS_FASTMATH, error_model="numpy")
def sweep_short_rows(x, r0, r1, pivot, total, total_sq):
    """``sweep_pivoted_sums`` of short rows: trips of 4 rows (2 of float64), hinted ahead."""
    features = x.shape[1]
    flat = x.reshape(x.size)
    r = r0
    # one loop per trip size: choosing the size inside a single loop halved the sweep's speed
    # in cache (one thread, (4096, 64) float32: 15 GB/s against 36)
    if trip_rows(x) == 2:
        while r + 2 <= r1:
            prefetch_trip_to_l2(flat, r * features, 2 * features)
            add_two_rows(x[r], x[r + 1], pivot, total, total_sq)
            r += 2
    else:
        while r + 4 <= r1:
            prefetch_trip_to_l2(flat, r * features, 4 * features)
            add_four_rows(x[r], x[r + 1], x[r + 2], x[r + 3], pivot, total, total_sq)
            r += 4
    add_rows_one_by_one(x, r, r1, pivot, total, total_sq)


@njit(cache=True, fastmath=STATISTICS_FASTMATH, error_model="numpy")
def sweep_long_rows(x, r0, r1, pivot, total, total_sq):
    """``sweep_pivoted_sums`` of long rows: trips of 8 rows."""
    r = r0
    while r + 8 <= r1:
        add_eight_rows(x[r], x[r + 1], x[r + 2], x[r + 3], x[r + 4], x[r + 5], x[r + 6],
                       x[r + 7], pivot, total, total_sq)
        r += 8
    add_rows_one_by_one(x, r, r1, pivot, total, total_sq)


@njit(cache=True, fastmath=STATISTICS_FASTMATH, error_model="numpy")
def sweep_pivoted_sums(x, r0, r1, pivot, total, total_sq):
    """``total[c] += sum(x[r0:r1, c] - pivot[c])`` and ``total_sq[c]`` of their squares."""
    if is_short_row(x):
        sweep_short_rows(x, r0, r1, pivot, total, total_sq)
    else:
        sweep_long_rows(x, r0, r1, pivot, total, total_sq)


@njit(**HELPER)
def moments_items_channels_last(x, block_rows, lo, hi, count, mean, m2):
    rows, features = x.shape
    # float32 for float16 (see FLOAT32_SUM_TERMS; channels_last_block_rows bounds the terms)
    pivot = elementwise_coefficients(np.empty(features), x)
    total = elementwise_coefficients(np.empty(features), x)
    total_sq = elementwise_coefficients(np.empty(features), x)
    for b in range(lo, hi):
        r0 = b * block_rows
        r1 = min(r0 + block_rows, rows)
        n_b = float(r1 - r0)
        for c in range(features):
            pivot[c] = mean[c] if count[c] > 0.0 else widen(x[r0, c])
        total[:] = 0.0
        total_sq[:] = 0.0
        sweep_pivoted_sums(x, r0, r1, pivot, total, total_sq)
        for c in range(features):
            shifted_mean = total[c] / n_b
            block_m2 = max(total_sq[c] - total[c] * shifted_mean, 0.0)
            count[c], mean[c], m2[c] = chan_merge(count[c], mean[c], m2[c], n_b,
                                                  pivot[c] + shifted_mean, block_m2)


@threaded_and_serial
def batch_moments_channels_last(x3, block_rows, out_mean, out_var, max_threads=1):
    x = rows_of(x3)
    rows, features = x.shape
    blocks = (rows + block_rows - 1) // block_rows
    threads = thread_count(max_threads, blocks)
    count = np.zeros((threads, features))
    mean = np.zeros((threads, features))
    m2 = np.zeros((threads, features))
    for t in prange(threads):
        lo, hi = thread_range(blocks, threads, t)
        moments_items_channels_last(x, block_rows, lo, hi, count[t], mean[t], m2[t])
    merge_thread_partials(count, mean, m2, out_mean, out_var)


# ----------------------------------------------------------------------------- per feature
@njit(**CHECK)
def running_update_fits(running, batch, count, momentum, unbiased):
    """Whether every updated value of ``running`` is finite once rounded to its dtype."""
    if running is None:
        return True
    for c in range(running.shape[0]):
        value = unbiased_variance(batch[c], count) if unbiased else batch[c]
        new = running_average(widen(running[c]), value, momentum)
        if not math.isfinite(widen(narrow(new, running))):
            return False
    return True


@njit(**CHECK)
def running_update_write(running, batch, count, momentum, unbiased):
    if running is None:
        return
    for c in range(running.shape[0]):
        value = unbiased_variance(batch[c], count) if unbiased else batch[c]
        running[c] = narrow(running_average(widen(running[c]), value, momentum), running)


@njit(**CHECK)
def update_running_stats(running_mean, running_var, mean, var, count, momentum):
    """Running averages of the batch mean and unbiased variance, written only if all fit."""
    if not (running_update_fits(running_mean, mean, count, momentum, False)
            and running_update_fits(running_var, var, count, momentum, True)):
        return False
    running_update_write(running_mean, mean, count, momentum, False)
    running_update_write(running_var, var, count, momentum, True)
    return True


@njit(**HELPER)
def affine_coefficients(gamma, beta, mean, invstd, scale, shift):
    """The forward's per-feature ``scale`` and ``shift`` (gamma/beta None mean 1 and 0)."""
    for c in range(mean.shape[0]):
        scale[c] = affine_scale(feature_value(gamma, c, 1.0), invstd[c])
        shift[c] = affine_shift(feature_value(beta, c, 0.0), mean[c], scale[c])


@njit(**HELPER)
def normalize_coefficients(mean, var, gamma, beta, eps, invstd, scale, shift):
    """invstd (written to ``invstd``), scale and shift of the forward, per feature."""
    for c in range(mean.shape[0]):
        invstd[c] = inverse_std(var[c], eps)
    affine_coefficients(gamma, beta, mean, invstd, scale, shift)


@njit(**CHECK)
def nonfinite_count(mean, var):
    """Number of features whose mean or variance is NaN or infinite."""
    bad = 0
    for c in range(mean.shape[0]):
        if not (math.isfinite(mean[c]) and math.isfinite(var[c])):
            bad += 1
    return bad


# ----------------------------------------------------------------------------- forward
# Coefficients are float64: x*scale + shift cancels when |mean| >> std, and a float32 shift
# would carry an absolute error of |mean|/std * 6e-8. The pass is memory-bound, so the wider
# arithmetic is free; each element is loaded in its dtype and rounded once at the store.
@njit(inline="always", **HELPER)
def forward_value(x, residual, at, scale, shift, relu):
    """``act(x*scale + shift [+ residual])`` of element ``at``, in the type of ``scale`` (ReLU
    keeps NaN)."""
    value = plus_residual(widen(x[at]) * scale + shift, residual, at)
    if relu:
        zero = zero_of(value)
        value = zero if value < zero else value
    return value


@njit(inline="always", **HELPER)
def scale_shift_run(x_run, residual_run, scale, shift, relu, y_run):
    for i in range(x_run.size):
        y_run[i] = narrow(forward_value(x_run, residual_run, i, scale, shift, relu), y_run)


@njit(inline="always", **HELPER)
def scale_shift_run_by_lines(x_run, residual_run, scale, shift, relu, y_run):
    """``scale_shift_run`` writing y's whole cache lines with streaming stores: a stage of
    lines is computed into a stack buffer (vector code, as the ordinary loop), then stored."""
    stage = stack_stage(y_run)
    head, end = line_span(y_run)
    scale_shift_run(x_run[:head], part_of(residual_run, 0, head), scale, shift, relu,
                    y_run[:head])
    for start in range(head, end, stage.size):
        stop = min(start + stage.size, end)
        scale_shift_run(x_run[start:stop], part_of(residual_run, start, stop), scale, shift,
                        relu, stage[:stop - start])
        stream_lines(stage, stop - start, y_run, start)
    n = x_run.size
    scale_shift_run(x_run[end:], part_of(residual_run, end, n), scale, shift, relu,
                    y_run[end:])


@njit(inline="always", **HELPER)
def scale_shift_run_as(x_run, residual_run, scale, shift, relu, y_run, streaming):
    """``scale_shift_run`` with streaming stores where ``streaming``: float32 by whole lines,
    float64 element by element (each measured the faster for its dtype, ``stores``)."""
    if not streaming:
        scale_shift_run(x_run, residual_run, scale, shift, relu, y_run)
    elif streams_by_lines(y_run):
        scale_shift_run_by_lines(x_run, residual_run, scale, shift, relu, y_run)
    else:
        for i in range(x_run.size):
            store_streaming(y_run, i, narrow(forward_value(x_run, residual_run, i, scale, shift,
                                                           relu), y_run))


@njit(**HELPER)
def scale_shift_items_planar(x, residual, scale, shift, relu, chunk, lo, hi, y, streaming):
    features, inner = x.shape[1], x.shape[2]
    n_chunks = planar_work(x, chunk)[0]
    o0, o1 = planar_outer_span(lo, hi, features, n_chunks)
    for o in range(o0, o1):
        c0, c1 = planar_feature_span(o, lo, hi, features, n_chunks)
        for c in range(c0, c1):
            if n_chunks == 1:
                scale_shift_run_as(x[o, c, 0:inner], run_of(residual, o, c, 0, inner),
                                   scale[c], shift[c], relu, y[o, c, 0:inner], streaming)
            else:
                p0, p1 = planar_piece_span(o, c, lo, hi, features, n_chunks)
                for piece in range(p0, p1):
                    start = piece * chunk
                    stop = min(start + chunk, inner)
                    scale_shift_run_as(x[o, c, start:stop],
                                       run_of(residual, o, c, start, stop), scale[c], shift[c],
                                       relu, y[o, c, start:stop], streaming)


@threaded_and_serial
def scale_shift_planar(x, mean, var, gamma, beta, eps, residual, relu, chunk, y, invstd,
                       streaming=False, max_threads=1):
    features = x.shape[1]
    scale = np.empty(features)
    shift = np.empty(features)
    normalize_coefficients(mean, var, gamma, beta, eps, invstd, scale, shift)
    element_scale = elementwise_coefficients(scale, x)
    element_shift = elementwise_coefficients(shift, x)
    items = planar_work(x, chunk)[1]
    threads = thread_count(max_threads, items)
    for t in prange(threads):
        lo, hi = thread_range(items, threads, t)
        scale_shift_items_planar(x, residual, element_scale, element_shift, relu, chunk, lo, hi,
                                 y, streaming)


@njit(inline="always", **HELPER)
def scale_shift_piece(x_run, residual_run, scale_run, shift_run, relu, y_run):
    """``scale_shift_run`` of a piece of a channels-last row, with per-feature coefficients."""
    for i in range(x_run.size):
        y_run[i] = narrow(forward_value(x_run, residual_run, i, scale_run[i], shift_run[i], relu),
                          y_run)


@njit(inline="always", **HELPER)
def scale_shift_flat(x, residual, scale, shift, relu, r, c, out):
    """``out`` = the outputs of the ``out.size`` elements of the ``(rows, C)`` view that follow
    ``(r, c)`` in memory, row piece by row piece; returns the ``(r, c)`` after them."""
    features = x.shape[1]
    done = 0
    while done < out.size:
        n = min(features - c, out.size - done)
        scale_shift_piece(x[r, c:c + n], part_of(row_of(residual, r), c, c + n), scale[c:c + n],
                          shift[c:c + n], relu, out[done:done + n])
        done += n
        c += n
        if c == features:
            r, c = r + 1, 0
    return r, c


# Channels-last rows [lo, hi) are one contiguous run of y, so they stream by whole lines
# whatever C and y's alignment: a stage of CHANNELS_LAST_STAGE_BYTES is computed row piece by
# row piece, then stored line by line (``stores`` has the speed-ups; streaming each row's own
# lines instead left every row's unaligned ends to ordinary stores, and lost). A 1 KiB stage
# beat 2, 4 and 8 KiB ones (Zen 4, 2 threads, float32, over ordinary stores: (802816, 64)
# 1.43x against 1.37x for 8 KiB, (32768, 1024) 1.17x against 0.83x).
CHANNELS_LAST_STAGE_BYTES = 1024


@njit(**HELPER)
def scale_shift_rows_by_lines(x, residual, scale, shift, relu, lo, hi, y):
    """Rows ``[lo, hi)`` of the channels-last forward, y written with streaming line stores."""
    features = x.shape[1]
    stage = np.empty(CHANNELS_LAST_STAGE_BYTES // y.itemsize, y.dtype)
    y_run = y.reshape(y.size)[lo * features:hi * features]
    head, end = line_span(y_run)
    r, c = scale_shift_flat(x, residual, scale, shift, relu, lo, 0, y_run[:head])
    for start in range(head, end, stage.size):
        stop = min(start + stage.size, end)
        r, c = scale_shift_flat(x, residual, scale, shift, relu, r, c, stage[:stop - start])
        stream_lines(stage, stop - start, y_run, start)
    scale_shift_flat(x, residual, scale, shift, relu, r, c, y_run[end:])


@njit(**HELPER)
def scale_shift_items_channels_last(x, residual, scale, shift, relu, lo, hi, y, streaming):
    if streaming and streams_by_lines(y):
        scale_shift_rows_by_lines(x, residual, scale, shift, relu, lo, hi, y)
        return
    for r in range(lo, hi):
        for c in range(x.shape[1]):
            store(y, (r, c), narrow(forward_value(x, residual, (r, c), scale[c], shift[c], relu),
                                    y), streaming)


@threaded_and_serial
def scale_shift_channels_last(x3, mean, var, gamma, beta, eps, residual3, relu, y3, invstd,
                              streaming=False, max_threads=1):
    x, residual, y = rows_of(x3), rows_of(residual3), rows_of(y3)
    features = x.shape[1]
    scale = np.empty(features)
    shift = np.empty(features)
    normalize_coefficients(mean, var, gamma, beta, eps, invstd, scale, shift)
    element_scale = elementwise_coefficients(scale, x)
    element_shift = elementwise_coefficients(shift, x)
    rows = x.shape[0]
    threads = thread_count(max_threads, rows)
    for t in prange(threads):
        lo, hi = thread_range(rows, threads, t)
        scale_shift_items_channels_last(x, residual, element_scale, element_shift, relu, lo,
                                        hi, y, streaming)


# ----------------------------------------------------------------------------- backward
@njit(inline="always", **HELPER)
def masked_gradient(dy, x, y, at, relu, scale, shift):
    """``g = dy`` of element ``at``, zeroed where the forward's ReLU output was not > 0."""
    g = widen(dy[at])
    if relu:
        g = g if relu_passes(x, y, at, scale, shift) else zero_of(g)
    return g


@njit(inline="always", **HELPER)
def backward_reduce_part(dy_part, x_part, y_part, mu, relu, scale, shift):
    """``sum(g)`` and ``sum(g * (x - mu))`` of a run, in the type of ``mu``."""
    sum_g = zero_of(mu)
    sum_g_xmu = zero_of(mu)
    for i in range(x_part.size):
        g = masked_gradient(dy_part, x_part, y_part, i, relu, scale, shift)
        sum_g += g
        sum_g_xmu += g * (widen(x_part[i]) - mu)
    return sum_g, sum_g_xmu


@njit(inline="always", **HELPER)
def backward_reduce_run(dy_run, x_run, y_run, mu, relu, scale, shift):
    """The run's sums in float64 (float16's from float32 parts of FLOAT32_SUM_TERMS)."""
    if not summed_in_float32(x_run):
        return backward_reduce_part(dy_run, x_run, y_run, mu, relu, scale, shift)
    sum_g = 0.0
    sum_g_xmu = 0.0
    for start in range(0, x_run.size, FLOAT32_SUM_TERMS):
        stop = start + FLOAT32_SUM_TERMS
        part_g, part_g_xmu = backward_reduce_part(dy_run[start:stop], x_run[start:stop],
                                                  part_of(y_run, start, stop), mu, relu, scale,
                                                  shift)
        sum_g += part_g
        sum_g_xmu += part_g_xmu
    return sum_g, sum_g_xmu


@njit(inline="always", **HELPER)
def backward_reduce_four_runs(dy, x, y, o, c, mu, relu, scale, shift):
    """``backward_reduce_part`` of feature ``c``'s rows at outer indices ``o .. o + 3``, in
    one loop (``takes_planar_trips``)."""
    inner = x.shape[2]
    dy0, dy1, dy2, dy3 = (dy[o, c, 0:inner], dy[o + 1, c, 0:inner], dy[o + 2, c, 0:inner],
                          dy[o + 3, c, 0:inner])
    x0, x1, x2, x3 = (x[o, c, 0:inner], x[o + 1, c, 0:inner], x[o + 2, c, 0:inner],
                      x[o + 3, c, 0:inner])
    y0, y1, y2, y3 = (run_of(y, o, c, 0, inner), run_of(y, o + 1, c, 0, inner),
                      run_of(y, o + 2, c, 0, inner), run_of(y, o + 3, c, 0, inner))
    sum_g = zero_of(mu)
    sum_g_xmu = zero_of(mu)
    for i in range(inner):
        g0 = masked_gradient(dy0, x0, y0, i, relu, scale, shift)
        g1 = masked_gradient(dy1, x1, y1, i, relu, scale, shift)
        g2 = masked_gradient(dy2, x2, y2, i, relu, scale, shift)
        g3 = masked_gradient(dy3, x3, y3, i, relu, scale, shift)
        sum_g += (g0 + g1) + (g2 + g3)
        sum_g_xmu += ((g0 * (widen(x0[i]) - mu) + g1 * (widen(x1[i]) - mu))
                      + (g2 * (widen(x2[i]) - mu) + g3 * (widen(x3[i]) - mu)))
    return sum_g, sum_g_xmu


@njit(inline="always", **HELPER)
def backward_reduce_rows_planar_in_trips(dy, x, y, mean, relu, scale, shift, lo, hi, sum_g,
                                         sum_g_xmu, trips):
    """``backward_reduce_rows_planar``, in 4-row trips where ``trips`` (a constant, as
    ``relu`` is then: a runtime flag's branches kept the trip from vectorizing)."""
    features, inner = x.shape[1], x.shape[2]
    o0, o1 = planar_outer_span(lo, hi, features, 1)
    o = o0
    while o < o1:
        whole_trip = trips and whole_planar_trip(o, o1, lo, hi, features)
        c0, c1 = planar_feature_span(o, lo, hi, features, 1)
        for c in range(c0, c1):
            if whole_trip:
                s, p = backward_reduce_four_runs(dy, x, y, o, c, mean[c], relu, scale[c],
                                                 shift[c])
            else:
                s, p = backward_reduce_run(dy[o, c, 0:inner], x[o, c, 0:inner],
                                           run_of(y, o, c, 0, inner), mean[c], relu, scale[c],
                                           shift[c])
            sum_g[c] += s
            sum_g_xmu[c] += p
        o += 4 if whole_trip else 1


@njit(**HELPER)
def backward_reduce_rows_planar(dy, x, y, mean, relu, scale, shift, lo, hi, sum_g, sum_g_xmu):
    """``backward_reduce_items_planar`` of rows of one chunk; short rows four at a time."""
    if not takes_planar_trips(x):
        backward_reduce_rows_planar_in_trips(dy, x, y, mean, relu, scale, shift, lo, hi, sum_g,
                                             sum_g_xmu, False)
    elif relu:
        backward_reduce_rows_planar_in_trips(dy, x, y, mean, True, scale, shift, lo, hi, sum_g,
                                             sum_g_xmu, True)
    else:
        backward_reduce_rows_planar_in_trips(dy, x, y, mean, False, scale, shift, lo, hi,
                                             sum_g, sum_g_xmu, True)


@njit(**HELPER)
def backward_reduce_items_planar(dy, x, y, mean, relu, scale, shift, chunk, lo, hi,
                                 sum_g, sum_g_xmu):
    features, inner = x.shape[1], x.shape[2]
    n_chunks = planar_work(x, chunk)[0]
    if n_chunks == 1:
        backward_reduce_rows_planar(dy, x, y, mean, relu, scale, shift, lo, hi, sum_g,
                                    sum_g_xmu)
        return
    o0, o1 = planar_outer_span(lo, hi, features, n_chunks)
    for o in range(o0, o1):
        c0, c1 = planar_feature_span(o, lo, hi, features, n_chunks)
        for c in range(c0, c1):
            p0, p1 = planar_piece_span(o, c, lo, hi, features, n_chunks)
            for piece in range(p0, p1):
                start = piece * chunk
                stop = min(start + chunk, inner)
                s, p = backward_reduce_run(dy[o, c, start:stop], x[o, c, start:stop],
                                           run_of(y, o, c, start, stop), mean[c], relu,
                                           scale[c], shift[c])
                sum_g[c] += s
                sum_g_xmu[c] += p


@njit(**HELPER)
def merge_gradient_partials(sum_g, sum_g_xmu, pivot, mean, invstd, dgamma, dbeta):
    """``dbeta = sum(g)``, ``dgamma = sum(g * (x - mean)) * invstd`` from ``(T, C)`` partials of
    ``sum(g)`` and ``sum(g * (x - pivot))``. The pivot is the mean as the elements were
    computed with (float32 for float16), recentred here on the float64 mean."""
    threads, features = sum_g.shape
    for c in range(features):
        s, p = 0.0, 0.0
        for t in range(threads):
            s += sum_g[t, c]
            p += sum_g_xmu[t, c]
        if pivot[c] != mean[c]:
            p += (np.float64(pivot[c]) - mean[c]) * s
        dbeta[c] = s
        dgamma[c] = p * invstd[c]


@threaded_and_serial
def backward_reduce_planar(dy, x, gamma, beta, mean, invstd, relu, y, chunk, dgamma, dbeta,
                           max_threads=1):
    features = x.shape[1]
    scale = np.empty(features)
    shift = np.empty(features)
    affine_coefficients(gamma, beta, mean, invstd, scale, shift)
    element_scale = elementwise_coefficients(scale, x)
    element_shift = elementwise_coefficients(shift, x)
    element_mean = elementwise_coefficients(mean, x)
    items = planar_work(x, chunk)[1]
    threads = thread_count(max_threads, items)
    sum_g = np.zeros((threads, features))
    sum_g_xmu = np.zeros((threads, features))
    for t in prange(threads):
        lo, hi = thread_range(items, threads, t)
        backward_reduce_items_planar(dy, x, y, element_mean, relu, element_scale, element_shift,
                                     chunk, lo, hi, sum_g[t], sum_g_xmu[t])
    merge_gradient_partials(sum_g, sum_g_xmu, element_mean, mean, invstd, dgamma, dbeta)


# As in the statistics, a trip of 4 rows loads and stores the sums once per 4 elements.
# It pays on float16 rows and on long rows, and costs on the others (side by side against
# single rows, 2 threads: (256, 1024) float32 118 -> 84 us, (32768, 1024) float64 33 -> 27 ms
# and 45 -> 30 ms with ReLU, (200704, 64) float16 with ReLU 8.5 -> 6.0 ms; but (65536, 256)
# float32 7.1 -> 12 ms, (200704, 64) float32 6.1 -> 11 ms). relu enters the trip as a
# constant: as a runtime flag, its four branches kept the trip from vectorizing (10-15x
# slower). The elementwise passes stay one row at a time: 4-row trips storing 4 rows were
# slower on every shape tried (1.1-2x). Trips of short rows hint the lines ahead, as in the
# statistics (float16 (802816, 64) with ReLU, side by side: 24 -> 17 ms and 31 -> 19 ms).
REDUCE_TRIP_ROW_BYTES = 4096


@njit(inline="always", cache=True)
def reduce_trip_rows(x):
    """Rows of the channels-last view ``x`` one backward-reduce trip adds: 4 or 1."""
    return 4 if x.itemsize == 2 or x.shape[1] * x.itemsize >= REDUCE_TRIP_ROW_BYTES else 1


@njit(inline="always", **HELPER)
def reduce_four_rows(dy, x, y, r, mean, relu, scale, shift, sum_g, sum_g_xmu):
    dy0, dy1, dy2, dy3 = dy[r], dy[r + 1], dy[r + 2], dy[r + 3]
    x0, x1, x2, x3 = x[r], x[r + 1], x[r + 2], x[r + 3]
    y0, y1, y2, y3 = row_of(y, r), row_of(y, r + 1), row_of(y, r + 2), row_of(y, r + 3)
    for c in range(sum_g.size):
        mu, s, t = mean[c], scale[c], shift[c]
        g0 = masked_gradient(dy0, x0, y0, c, relu, s, t)
        g1 = masked_gradient(dy1, x1, y1, c, relu, s, t)
        g2 = masked_gradient(dy2, x2, y2, c, relu, s, t)
        g3 = masked_gradient(dy3, x3, y3, c, relu, s, t)
        sum_g[c] += (g0 + g1) + (g2 + g3)
        sum_g_xmu[c] += ((g0 * (widen(x0[c]) - mu) + g1 * (widen(x1[c]) - mu))
                         + (g2 * (widen(x2[c]) - mu) + g3 * (widen(x3[c]) - mu)))


@njit(inline="always", **HELPER)
def reduce_four_row_trips(dy, x, y, mean, relu, scale, shift, lo, hi, sum_g, sum_g_xmu):
    """The trips of rows ``[lo, hi)``; returns the first row left over."""
    features = x.shape[1]
    x_flat, dy_flat = x.reshape(x.size), dy.reshape(dy.size)
    r = lo
    # hinted and plain trips in separate loops, as in sweep_short_rows
    if features * x.itemsize <= PREFETCH_ROW_BYTES:
        while r + 4 <= hi:
            prefetch_trip(x_flat, r * features, 4 * features)
            prefetch_trip(dy_flat, r * features, 4 * features)
            reduce_four_rows(dy, x, y, r, mean, relu, scale, shift, sum_g, sum_g_xmu)
            r += 4
    else:
        while r + 4 <= hi:
            reduce_four_rows(dy, x, y, r, mean, relu, scale, shift, sum_g, sum_g_xmu)
            r += 4
    return r


@njit(**HELPER)
def backward_reduce_rows_channels_last(dy, x, y, mean, relu, scale, shift, lo, hi,
                                       sum_g, sum_g_xmu):
    r0 = lo
    if reduce_trip_rows(x) == 4:
        if relu:
            r0 = reduce_four_row_trips(dy, x, y, mean, True, scale, shift, lo, hi, sum_g,
                                       sum_g_xmu)
        else:
            r0 = reduce_four_row_trips(dy, x, y, mean, False, scale, shift, lo, hi, sum_g,
                                       sum_g_xmu)
    for r in range(r0, hi):
        for c in range(x.shape[1]):
            g = masked_gradient(dy, x, y, (r, c), relu, scale[c], shift[c])
            sum_g[c] += g
            sum_g_xmu[c] += g * (widen(x[r, c]) - mean[c])


@njit(**HELPER)
def backward_reduce_items_channels_last(dy, x, y, mean, relu, scale, shift, lo, hi,
                                        sum_g, sum_g_xmu):
    """Rows ``[lo, hi)`` added to the float64 sums, in blocks whose sums each feature keeps in
    the type of ``mean``: float16's float32 sums get at most FLOAT32_SUM_ROWS rows."""
    if not summed_in_float32(x):
        backward_reduce_rows_channels_last(dy, x, y, mean, relu, scale, shift, lo, hi, sum_g,
                                           sum_g_xmu)
        return
    block_rows = FLOAT32_SUM_ROWS
    block_g = elementwise_coefficients(np.empty(x.shape[1]), x)
    block_g_xmu = elementwise_coefficients(np.empty(x.shape[1]), x)
    for r0 in range(lo, hi, block_rows):
        block_g[:] = 0.0
        block_g_xmu[:] = 0.0
        backward_reduce_rows_channels_last(dy, x, y, mean, relu, scale, shift, r0,
                                           min(r0 + block_rows, hi), block_g, block_g_xmu)
        for c in range(x.shape[1]):
            sum_g[c] += block_g[c]
            sum_g_xmu[c] += block_g_xmu[c]


@threaded_and_serial
def backward_reduce_channels_last(dy3, x3, gamma, beta, mean, invstd, relu, y3, dgamma, dbeta,
                                  max_threads=1):
    dy, x, y = rows_of(dy3), rows_of(x3), rows_of(y3)
    rows, features = x.shape
    scale = np.empty(features)
    shift = np.empty(features)
    affine_coefficients(gamma, beta, mean, invstd, scale, shift)
    element_scale = elementwise_coefficients(scale, x)
    element_shift = elementwise_coefficients(shift, x)
    element_mean = elementwise_coefficients(mean, x)
    threads = thread_count(max_threads, rows)
    sum_g = np.zeros((threads, features))
    sum_g_xmu = np.zeros((threads, features))
    for t in prange(threads):
        lo, hi = thread_range(rows, threads, t)
        backward_reduce_items_channels_last(dy, x, y, element_mean, relu, element_scale,
                                            element_shift, lo, hi, sum_g[t], sum_g_xmu[t])
    merge_gradient_partials(sum_g, sum_g_xmu, element_mean, mean, invstd, dgamma, dbeta)


@njit(**HELPER)
def backward_coefficients(gamma, mean, invstd, dgamma, dbeta, count, batch_stats,
                          dy_scale, x_scale, dx_shift):
    """Per-feature ``dx = g*dy_scale + x*x_scale + dx_shift`` (see feature_math)."""
    for c in range(mean.shape[0]):
        dy_scale[c] = backward_dy_scale(feature_value(gamma, c, 1.0), invstd[c])
        x_scale[c] = backward_x_scale(dy_scale[c], invstd[c], dgamma[c], count, batch_stats)
        dx_shift[c] = backward_dx_shift(dy_scale[c], x_scale[c], mean[c], dbeta[c], count,
                                        batch_stats)


@njit(inline="always", cache=True)
def backward_scratch(gamma, beta, mean, invstd, dgamma, dbeta, count, batch_stats):
    """The per-feature arrays of the elementwise pass: ReLU mask's scale/shift and dx's."""
    features = mean.shape[0]
    coefficients = np.empty((5, features))
    affine_coefficients(gamma, beta, mean, invstd, coefficients[0], coefficients[1])
    backward_coefficients(gamma, mean, invstd, dgamma, dbeta, count, batch_stats,
                          coefficients[2], coefficients[3], coefficients[4])
    return coefficients


@njit(inline="always", **HELPER)
def backward_element(dy, x, y, at, relu, mask_scale, mask_shift, dy_scale, x_scale, dx_shift,
                     dx):
    g = masked_gradient(dy, x, y, at, relu, mask_scale, mask_shift)
    dx[at] = narrow(g * dy_scale + widen(x[at]) * x_scale + dx_shift, dx)


@njit(inline="always", **HELPER)
def residual_gradient_element(dy, x, y, at, relu, mask_scale, mask_shift, dresidual):
    dresidual[at] = narrow(masked_gradient(dy, x, y, at, relu, mask_scale, mask_shift),
                           dresidual)


def residual_gradient_run(dy_run, x_run, y_run, relu, mask_scale, mask_shift, dresidual_run):
    """``dresidual_run = g`` (nothing where there is no residual, None)."""


@overload(residual_gradient_run, inline="always")
def _residual_gradient_run(dy_run, x_run, y_run, relu, mask_scale, mask_shift, dresidual_run):
    if isinstance(dresidual_run, nb_types.NoneType):
        return lambda dy_run, x_run, y_run, relu, mask_scale, mask_shift, dresidual_run: None
    return lambda dy_run, x_run, y_run, relu, mask_scale, mask_shift, dresidual_run: \
        write_residual_gradient_run(dy_run, x_run, y_run, relu, mask_scale, mask_shift,
                                    dresidual_run)


# Out of line: inlined beside the dx loop, this loop ran 15x slower (measured at
# (64, 64, 3136) float32, 180 ms against 12).
@njit(**HELPER)
def write_residual_gradient_run(dy_run, x_run, y_run, relu, mask_scale, mask_shift,
                                dresidual_run):
    for i in range(x_run.size):
        residual_gradient_element(dy_run, x_run, y_run, i, relu, mask_scale, mask_shift,
                                  dresidual_run)


# The residual's gradient gets a loop of its own over the same (cache-resident) run or row,
# before dx (which may overwrite dy): one loop storing both did not vectorize for float16
# (measured: 17 ns per element, against 0.9 for dx alone).
@njit(inline="always", **HELPER)
def backward_elementwise_run(dy_run, x_run, y_run, relu, mask_scale, mask_shift, dy_scale,
                             x_scale, dx_shift, dx_run, dresidual_run):
    residual_gradient_run(dy_run, x_run, y_run, relu, mask_scale, mask_shift, dresidual_run)
    for i in range(x_run.size):
        backward_element(dy_run, x_run, y_run, i, relu, mask_scale, mask_shift, dy_scale,
                         x_scale, dx_shift, dx_run)


def dresidual_absent(dresidual):
    """Whether there is no residual gradient to write (a constant of the compiled function)."""


@overload(dresidual_absent, inline="always")
def _dresidual_absent(dresidual):
    if isinstance(dresidual, nb_types.NoneType):
        return lambda dresidual: True
    return lambda dresidual: False


# With a residual gradient, every row goes through the piece loop: with the whole-row call
# beside it, the pass ran 12x slower (measured at (64, 64, 3136) float32: 177 ms, against
# 14-17 ms before the nested loops and with this), most likely because the out-of-line
# residual-gradient loop then had two call sites.
@njit(**HELPER)
def backward_elementwise_items_planar(dy, x, y, relu, coefficients, chunk, lo, hi, dx,
                                      dresidual):
    features, inner = x.shape[1], x.shape[2]
    n_chunks = planar_work(x, chunk)[0]
    o0, o1 = planar_outer_span(lo, hi, features, n_chunks)
    for o in range(o0, o1):
        c0, c1 = planar_feature_span(o, lo, hi, features, n_chunks)
        for c in range(c0, c1):
            if n_chunks == 1 and dresidual_absent(dresidual):
                backward_elementwise_run(dy[o, c, 0:inner], x[o, c, 0:inner],
                                         run_of(y, o, c, 0, inner), relu,
                                         coefficients[0, c], coefficients[1, c],
                                         coefficients[2, c], coefficients[3, c],
                                         coefficients[4, c], dx[o, c, 0:inner],
                                         run_of(dresidual, o, c, 0, inner))
            else:
                p0, p1 = planar_piece_span(o, c, lo, hi, features, n_chunks)
                for piece in range(p0, p1):
                    start = piece * chunk
                    stop = min(start + chunk, inner)
                    backward_elementwise_run(dy[o, c, start:stop], x[o, c, start:stop],
                                             run_of(y, o, c, start, stop), relu,
                                             coefficients[0, c], coefficients[1, c],
                                             coefficients[2, c], coefficients[3, c],
                                             coefficients[4, c], dx[o, c, start:stop],
                                             run_of(dresidual, o, c, start, stop))


@threaded_and_serial
def backward_elementwise_planar(dy, x, gamma, beta, mean, invstd, dgamma, dbeta, count,
                                batch_stats, relu, y, chunk, dx, dresidual, max_threads=1):
    coefficients = elementwise_coefficients(
        backward_scratch(gamma, beta, mean, invstd, dgamma, dbeta, count, batch_stats), x)
    items = planar_work(x, chunk)[1]
    threads = thread_count(max_threads, items)
    for t in prange(threads):
        lo, hi = thread_range(items, threads, t)
        backward_elementwise_items_planar(dy, x, y, relu, coefficients, chunk, lo, hi, dx,
                                          dresidual)


@njit(**HELPER)
def residual_gradient_rows(dy, x, y, relu, coefficients, lo, hi, dresidual):
    """``dresidual = g`` on rows ``[lo, hi)``. With y (always, from the pipeline) the mask needs
    no per-feature value, so the rows are one contiguous run: a 2-D loop storing it beside
    reading y did not vectorize (measured 10x slower than the whole rest of the pass)."""
    if y is not None:
        features = x.shape[1]
        start, stop = lo * features, hi * features
        dy_run = dy.reshape(dy.size)[start:stop]
        y_run = y.reshape(y.size)[start:stop]
        dresidual_run = dresidual.reshape(dresidual.size)[start:stop]
        for i in range(dy_run.size):
            residual_gradient_element(dy_run, dy_run, y_run, i, relu, 0.0, 0.0, dresidual_run)
    else:
        for r in range(lo, hi):
            for c in range(x.shape[1]):
                residual_gradient_element(dy, x, y, (r, c), relu, coefficients[0, c],
                                          coefficients[1, c], dresidual)


@njit(inline="always", **HELPER)
def backward_dx_rows(dy, x, y, relu, coefficients, lo, hi, dx):
    """``dx`` of rows ``[lo, hi)``."""
    for r in range(lo, hi):
        for c in range(x.shape[1]):
            backward_element(dy, x, y, (r, c), relu, coefficients[0, c], coefficients[1, c],
                             coefficients[2, c], coefficients[3, c], coefficients[4, c], dx)


# The same loop compiled out of line, for the blocks below: inlined beside the residual loop
# it lost the blocks' gain (measured side by side at (802816, 64): 1.08x and 0.99x against
# 1.25x and 1.13x), and called out of line without a residual the pass was 4-10 % slower at
# training sizes ((256, 64) float32, (64, 128) float64).
backward_dx_block = njit(**HELPER)(backward_dx_rows.py_func)

# With a residual gradient, a thread's rows go in blocks of about RESIDUAL_BLOCK_BYTES of each
# array: the block's residual gradient, then its dx, so that the dx loop finds dy and y in
# cache. Over the thread's whole range at once, a DRAM-sized tensor's dy and y were read from
# memory twice (side by side, 2 threads, ReLU and y: the elementwise pass 1.16x at (802816,
# 64) float32, 1.17x float64, 1.24x at (32768, 1024) float32; the whole backward 1.17x and
# 1.15x at the last two).
RESIDUAL_BLOCK_BYTES = 32768


@njit(**HELPER)
def backward_elementwise_rows_with_residual(dy, x, y, relu, coefficients, lo, hi, dx,
                                            dresidual):
    block = max(1, RESIDUAL_BLOCK_BYTES // (x.shape[1] * x.itemsize))
    for r0 in range(lo, hi, block):
        r1 = min(r0 + block, hi)
        residual_gradient_rows(dy, x, y, relu, coefficients, r0, r1, dresidual)
        backward_dx_block(dy, x, y, relu, coefficients, r0, r1, dx)


@njit(**HELPER)
def backward_elementwise_items_channels_last(dy, x, y, relu, coefficients, lo, hi, dx,
                                             dresidual):
    if dresidual is None:
        backward_dx_rows(dy, x, y, relu, coefficients, lo, hi, dx)
    else:
        backward_elementwise_rows_with_residual(dy, x, y, relu, coefficients, lo, hi, dx,
                                                dresidual)


@threaded_and_serial
def backward_elementwise_channels_last(dy3, x3, gamma, beta, mean, invstd, dgamma, dbeta, count,
                                       batch_stats, relu, y3, dx3, dresidual3, max_threads=1):
    dy, x, y, dx, dresidual = (rows_of(dy3), rows_of(x3), rows_of(y3), rows_of(dx3),
                               rows_of(dresidual3))
    coefficients = elementwise_coefficients(
        backward_scratch(gamma, beta, mean, invstd, dgamma, dbeta, count, batch_stats), x)
    rows = x.shape[0]
    threads = thread_count(max_threads, rows)
    for t in prange(threads):
        lo, hi = thread_range(rows, threads, t)
        backward_elementwise_items_channels_last(dy, x, y, relu, coefficients, lo, hi, dx,
                                                 dresidual)


# ----------------------------------------------------------------------------- whole passes
# Forward-train is four steps and backward two. Each whole pass is one compiled call that runs
# the step kernels above: at training sizes the Python between separate calls cost as much as
# the work (measured at (256, 1024) float32 on 2 threads, forward-train 144 -> 110 us; serially
# on small inputs, four calls cost more than the pass). The threaded whole pass calls the
# threaded kernels; its serial twin in SERIAL calls their serial compilations, so both give
# the results of the separate calls to rounding. Not bitwise: LLVM inlines the steps into the
# pass and may vectorize their fast-math sums in another order there (data-dependent last-bit
# differences in about one case in six, measured). Each is deterministic from run to run.
# Outputs go into ``stats`` ((3, C): mean, var, invstd) and ``grads`` ((2, C): dgamma, dbeta).
@njit(**CHECK)
def checked_running_update(mean, var, running_mean, running_var, count, momentum):
    """The forward's checks, then the running update: a ``contract`` status."""
    if nonfinite_count(mean, var):
        return NONFINITE_STATISTICS
    if not update_running_stats(running_mean, running_var, mean, var, count, momentum):
        return RUNNING_OVERFLOW
    return FORWARD_DONE


def whole_pass(steps):
    """Compile a whole pass, once as written (calling the threaded kernels) and once into
    ``SERIAL`` with every threaded kernel it names replaced by that kernel's serial compilation.
    It is a plain call sequence with no prange of its own. The serial twin sees the module's
    names as they are when it is decorated, so whole passes come after everything they call."""
    serial = _serial_copy(steps, {**steps.__globals__, **SERIAL})
    SERIAL[steps.__name__] = njit(**SERIAL_KERNEL)(serial)
    return njit(**SERIAL_KERNEL)(steps)


@whole_pass
def forward_train_planar(x, gamma, beta, eps, running_mean, running_var, momentum, residual,
                         relu, chunk, y, stats, streaming=False, max_threads=1):
    batch_moments_planar(x, chunk, stats[0], stats[1], max_threads)
    status = checked_running_update(stats[0], stats[1], running_mean, running_var,
                                    x.shape[0] * x.shape[2], momentum)
    if status == FORWARD_DONE:
        scale_shift_planar(x, stats[0], stats[1], gamma, beta, eps, residual, relu, chunk, y,
                           stats[2], streaming, max_threads)
    return status


@whole_pass
def forward_train_channels_last(x, gamma, beta, eps, running_mean, running_var, momentum,
                                residual, relu, block_rows, y, stats, streaming=False,
                                max_threads=1):
    batch_moments_channels_last(x, block_rows, stats[0], stats[1], max_threads)
    status = checked_running_update(stats[0], stats[1], running_mean, running_var,
                                    x.shape[0] * x.shape[2], momentum)
    if status == FORWARD_DONE:
        scale_shift_channels_last(x, stats[0], stats[1], gamma, beta, eps, residual, relu, y,
                                  stats[2], streaming, max_threads)
    return status


@whole_pass
def backward_planar(dy, x, gamma, beta, mean, invstd, count, batch_stats, relu, y, chunk, dx,
                    dresidual, grads, max_threads=1):
    backward_reduce_planar(dy, x, gamma, beta, mean, invstd, relu, y, chunk, grads[0],
                           grads[1], max_threads)
    backward_elementwise_planar(dy, x, gamma, beta, mean, invstd, grads[0], grads[1], count,
                                batch_stats, relu, y, chunk, dx, dresidual, max_threads)


@whole_pass
def backward_channels_last(dy, x, gamma, beta, mean, invstd, count, batch_stats, relu, y, dx,
                           dresidual, grads, max_threads=1):
    backward_reduce_channels_last(dy, x, gamma, beta, mean, invstd, relu, y, grads[0],
                                  grads[1], max_threads)
    backward_elementwise_channels_last(dy, x, gamma, beta, mean, invstd, grads[0], grads[1],
                                       count, batch_stats, relu, y, dx, dresidual, max_threads)


def planar_chunk(inner: int) -> int:
    """Equal chunks of at most PLANAR_CHUNK elements, so no chunk is a sliver."""
    n_chunks = -(-inner // PLANAR_CHUNK)
    return -(-inner // n_chunks)


def channels_last_block_rows(features: int, itemsize: int) -> int:
    """Rows of a channels-last statistics block (float16's at most FLOAT32_SUM_ROWS)."""
    rows = max(MIN_BLOCK_ROWS, BLOCK_ELEMENTS // features)
    return min(rows, FLOAT32_SUM_ROWS) if itemsize == 2 else rows
