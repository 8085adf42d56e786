"""Numba ``@njit`` kernels of the ``"cpu"`` backend.

Two layouts of the canonical ``(outer, C, inner)`` view, as named twins:

* ``*_planar``: ``inner > 1`` (NCHW, the course layout ``(C, m)``): each ``(o, c)`` row is a
  contiguous run of one feature, cut into cache-sized chunks.
* ``*_channels_last``: ``inner == 1`` (NC, NHWC): a 2-D ``(rows, C)`` array whose rows hold every
  feature, processed in blocks of rows so the vector loop runs along C.

Four steps, each one pass over memory, with the same names as the CUDA kernels:
``batch_moments_*`` (statistics), ``scale_shift_*`` (fused normalize, y = x*scale + shift),
``backward_reduce_*`` (sum dy, sum dy*(x-mean)), ``backward_elementwise_*`` (dx = k1*dy + k2*x + k3).

Reductions give each thread its own slice of partial results (``prange`` over threads), then merge
the partials serially in float64. Statistics are single-pass over memory: a chunk small enough to
stay in cache is summed twice (mean, then squared deviations, both plain vectorizable loops) and
the chunk's moments are merged with Chan's formula. Per-element Welford would need a divide per
element and does not vectorize.

Kernels take ``max_threads`` as their last argument: calling ``numba.get_num_threads()`` inside a
kernel makes it uncacheable (a dynamic global), and every process would recompile.
"""

from __future__ import annotations

import types

import numpy as np
from numba import njit, prange

# Reassociation lets LLVM vectorize the float64 reductions; no 'nnan'/'ninf', so NaN and Inf
# still propagate to the statistics, where the non-finite check looks for them.
FASTMATH = {"reassoc", "contract", "nsz", "arcp"}
KERNEL = dict(parallel=True, cache=True, fastmath=FASTMATH, nogil=True)
SERIAL_KERNEL = dict(cache=True, fastmath=FASTMATH, nogil=True)

#: The single-threaded compilation of each parallel kernel, by kernel name.
SERIAL = {}


def threaded_and_serial(kernel):
    """Compile a kernel with ``parallel=True``, and once more without it into ``SERIAL``.

    Small inputs take the serial one: entering a ``parallel=True`` function synchronizes with
    Numba's thread pool even when it then runs one thread, and when BLAS threads still spin on
    the cores after a matmul that costs milliseconds (measured: 8 ms per call beside a 64x128
    matmul, against 6 us). The copy gets its own name, so the two compilations cache apart.
    """
    serial = types.FunctionType(kernel.__code__, kernel.__globals__, kernel.__name__ + "_serial",
                                kernel.__defaults__, kernel.__closure__)
    serial.__qualname__ = kernel.__qualname__ + "_serial"
    SERIAL[kernel.__name__] = njit(**SERIAL_KERNEL)(serial)
    return njit(**KERNEL)(kernel)

PLANAR_CHUNK = 4096        # elements of one row read twice from L1/L2 by batch_moments_planar
BLOCK_ELEMENTS = 65536     # elements in a block of channels-last rows (256 KiB of float32: L2)
MIN_BLOCK_ROWS = 8         # keeps the per-block merge cheap when C is very large


# ----------------------------------------------------------------------------- shared math
@njit(inline="always", cache=True)
def chan_merge(count_a, mean_a, m2_a, count_b, mean_b, m2_b):
    """Chan et al.'s parallel update: moments of the union of two disjoint sets."""
    count = count_a + count_b
    if count_b == 0.0:
        return count_a, mean_a, m2_a
    delta = mean_b - mean_a
    ratio = count_b / count
    return count, mean_a + delta * ratio, m2_a + m2_b + delta * delta * count_a * ratio


@njit(inline="always", cache=True, fastmath=FASTMATH)
def chunk_moments(run):
    """Count, mean and sum of squared deviations of a cache-resident 1-D run of values."""
    total = 0.0
    for i in range(run.size):
        total += run[i]
    count = float(run.size)
    mean = total / count
    m2 = 0.0
    for i in range(run.size):
        d = run[i] - mean
        m2 += d * d
    return count, mean, m2


@njit(cache=True)
def merge_thread_partials(count, mean, m2):
    """Merge per-thread ``(T, C)`` partial moments into per-feature mean and biased variance."""
    threads, features = count.shape
    out_mean = np.empty(features)
    out_var = np.empty(features)
    for c in range(features):
        n, mu, q = 0.0, 0.0, 0.0
        for t in range(threads):
            n, mu, q = chan_merge(n, mu, q, count[t, c], mean[t, c], m2[t, c])
        out_mean[c] = mu
        out_var[c] = q / n
    return out_mean, out_var


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
def planar_item(item, features, n_chunks, chunk, inner):
    """Which row ``(o, c)`` and which ``[start, stop)`` of it a planar work item covers."""
    row = item // n_chunks
    start = (item - row * n_chunks) * chunk
    return row // features, row % features, start, min(start + chunk, inner)


# Each parallel kernel is a prange over threads handing every thread a contiguous range of work
# items to a serial function (``*_items``): loops written directly inside a prange body are
# compiled as part of Numba's parfor and lose their vectorization; called functions keep it.
# Inner loops run over a slice from 0 (``run[i]``), not over ``range(start, stop)`` of the
# row: LLVM vectorizes the first and not the second (measured: 6x slower statistics).

# ----------------------------------------------------------------------------- statistics
@njit(cache=True, fastmath=FASTMATH)
def moments_items_planar(x, chunk, lo, hi, count, mean, m2):
    features, inner = x.shape[1], x.shape[2]
    n_chunks = planar_work(x, chunk)[0]
    for item in range(lo, hi):
        o, c, start, stop = planar_item(item, features, n_chunks, chunk, inner)
        n_b, mean_b, m2_b = chunk_moments(x[o, c, start:stop])
        count[c], mean[c], m2[c] = chan_merge(count[c], mean[c], m2[c], n_b, mean_b, m2_b)


@threaded_and_serial
def batch_moments_planar(x, chunk, max_threads):
    outer, features, inner = x.shape
    items = planar_work(x, chunk)[1]
    threads = max(1, min(max_threads, items))
    count = np.zeros((threads, features))
    mean = np.zeros((threads, features))
    m2 = np.zeros((threads, features))
    for t in prange(threads):
        lo, hi = thread_range(items, threads, t)
        moments_items_planar(x, chunk, lo, hi, count[t], mean[t], m2[t])
    return merge_thread_partials(count, mean, m2)


@njit(cache=True, fastmath=FASTMATH)
def moments_items_channels_last(x, block_rows, lo, hi, count, mean, m2):
    rows, features = x.shape
    block_mean = np.empty(features)
    block_m2 = np.empty(features)
    for b in range(lo, hi):
        r0 = b * block_rows
        r1 = min(r0 + block_rows, rows)
        n_b = float(r1 - r0)
        block_mean[:] = 0.0
        for r in range(r0, r1):
            for c in range(features):
                block_mean[c] += x[r, c]
        for c in range(features):
            block_mean[c] /= n_b
        block_m2[:] = 0.0
        for r in range(r0, r1):
            for c in range(features):
                d = x[r, c] - block_mean[c]
                block_m2[c] += d * d
        for c in range(features):
            count[c], mean[c], m2[c] = chan_merge(count[c], mean[c], m2[c],
                                                  n_b, block_mean[c], block_m2[c])


@threaded_and_serial
def batch_moments_channels_last(x, block_rows, max_threads):
    rows, features = x.shape
    blocks = (rows + block_rows - 1) // block_rows
    threads = max(1, min(max_threads, blocks))
    count = np.zeros((threads, features))
    mean = np.zeros((threads, features))
    m2 = np.zeros((threads, features))
    for t in prange(threads):
        lo, hi = thread_range(blocks, threads, t)
        moments_items_channels_last(x, block_rows, lo, hi, count[t], mean[t], m2[t])
    return merge_thread_partials(count, mean, m2)


# ----------------------------------------------------------------------------- forward
# Coefficients are float64: x*scale + shift cancels when |mean| >> std, and a float32 shift
# would carry an absolute error of |mean|/std * 6e-8. The pass is memory-bound, so the wider
# arithmetic is free; each element is loaded in its dtype and rounded once at the store.
@njit(cache=True, fastmath=FASTMATH)
def scale_shift_items_planar(x, scale, shift, chunk, lo, hi, y):
    features, inner = x.shape[1], x.shape[2]
    n_chunks = planar_work(x, chunk)[0]
    for item in range(lo, hi):
        o, c, start, stop = planar_item(item, features, n_chunks, chunk, inner)
        a = scale[c]
        b = shift[c]
        xr = x[o, c, start:stop]
        yr = y[o, c, start:stop]
        for i in range(xr.size):
            yr[i] = xr[i] * a + b


@threaded_and_serial
def scale_shift_planar(x, scale, shift, chunk, y, max_threads):
    outer, features, inner = x.shape
    items = planar_work(x, chunk)[1]
    threads = max(1, min(max_threads, items))
    for t in prange(threads):
        lo, hi = thread_range(items, threads, t)
        scale_shift_items_planar(x, scale, shift, chunk, lo, hi, y)


@njit(cache=True, fastmath=FASTMATH)
def scale_shift_items_channels_last(x, scale, shift, lo, hi, y):
    features = x.shape[1]
    for r in range(lo, hi):
        for c in range(features):
            y[r, c] = x[r, c] * scale[c] + shift[c]


@threaded_and_serial
def scale_shift_channels_last(x, scale, shift, y, max_threads):
    rows = x.shape[0]
    threads = max(1, min(max_threads, rows))
    for t in prange(threads):
        lo, hi = thread_range(rows, threads, t)
        scale_shift_items_channels_last(x, scale, shift, lo, hi, y)


# ----------------------------------------------------------------------------- backward
@njit(cache=True, fastmath=FASTMATH)
def backward_reduce_items_planar(dy, x, mean, chunk, lo, hi, sum_dy, sum_dy_xmu):
    features, inner = x.shape[1], x.shape[2]
    n_chunks = planar_work(x, chunk)[0]
    for item in range(lo, hi):
        o, c, start, stop = planar_item(item, features, n_chunks, chunk, inner)
        mu = mean[c]
        dyr = dy[o, c, start:stop]
        xr = x[o, c, start:stop]
        s = 0.0
        p = 0.0
        for i in range(xr.size):
            g = dyr[i]
            s += g
            p += g * (xr[i] - mu)
        sum_dy[c] += s
        sum_dy_xmu[c] += p


@threaded_and_serial
def backward_reduce_planar(dy, x, mean, chunk, max_threads):
    outer, features, inner = x.shape
    items = planar_work(x, chunk)[1]
    threads = max(1, min(max_threads, items))
    sum_dy = np.zeros((threads, features))
    sum_dy_xmu = np.zeros((threads, features))
    for t in prange(threads):
        lo, hi = thread_range(items, threads, t)
        backward_reduce_items_planar(dy, x, mean, chunk, lo, hi, sum_dy[t], sum_dy_xmu[t])
    return sum_dy.sum(axis=0), sum_dy_xmu.sum(axis=0)


@njit(cache=True, fastmath=FASTMATH)
def backward_reduce_items_channels_last(dy, x, mean, lo, hi, sum_dy, sum_dy_xmu):
    features = x.shape[1]
    for r in range(lo, hi):
        for c in range(features):
            g = dy[r, c]
            sum_dy[c] += g
            sum_dy_xmu[c] += g * (x[r, c] - mean[c])


@threaded_and_serial
def backward_reduce_channels_last(dy, x, mean, max_threads):
    rows, features = x.shape
    threads = max(1, min(max_threads, rows))
    sum_dy = np.zeros((threads, features))
    sum_dy_xmu = np.zeros((threads, features))
    for t in prange(threads):
        lo, hi = thread_range(rows, threads, t)
        backward_reduce_items_channels_last(dy, x, mean, lo, hi, sum_dy[t], sum_dy_xmu[t])
    return sum_dy.sum(axis=0), sum_dy_xmu.sum(axis=0)


@njit(cache=True, fastmath=FASTMATH)
def backward_elementwise_items_planar(dy, x, k1, k2, k3, chunk, lo, hi, dx):
    features, inner = x.shape[1], x.shape[2]
    n_chunks = planar_work(x, chunk)[0]
    for item in range(lo, hi):
        o, c, start, stop = planar_item(item, features, n_chunks, chunk, inner)
        a = k1[c]
        b = k2[c]
        d = k3[c]
        dyr = dy[o, c, start:stop]
        xr = x[o, c, start:stop]
        dxr = dx[o, c, start:stop]
        for i in range(xr.size):
            dxr[i] = dyr[i] * a + xr[i] * b + d


@threaded_and_serial
def backward_elementwise_planar(dy, x, k1, k2, k3, chunk, dx, max_threads):
    outer, features, inner = x.shape
    items = planar_work(x, chunk)[1]
    threads = max(1, min(max_threads, items))
    for t in prange(threads):
        lo, hi = thread_range(items, threads, t)
        backward_elementwise_items_planar(dy, x, k1, k2, k3, chunk, lo, hi, dx)


@njit(cache=True, fastmath=FASTMATH)
def backward_elementwise_items_channels_last(dy, x, k1, k2, k3, lo, hi, dx):
    features = x.shape[1]
    for r in range(lo, hi):
        for c in range(features):
            dx[r, c] = dy[r, c] * k1[c] + x[r, c] * k2[c] + k3[c]


@threaded_and_serial
def backward_elementwise_channels_last(dy, x, k1, k2, k3, dx, max_threads):
    rows = x.shape[0]
    threads = max(1, min(max_threads, rows))
    for t in prange(threads):
        lo, hi = thread_range(rows, threads, t)
        backward_elementwise_items_channels_last(dy, x, k1, k2, k3, lo, hi, dx)


def planar_chunk(inner: int) -> int:
    """Equal chunks of at most PLANAR_CHUNK elements, so no chunk is a sliver."""
    n_chunks = -(-inner // PLANAR_CHUNK)
    return -(-inner // n_chunks)


def channels_last_block_rows(features: int) -> int:
    return max(MIN_BLOCK_ROWS, BLOCK_ELEMENTS // features)
