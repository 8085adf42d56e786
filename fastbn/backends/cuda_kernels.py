"""Numba ``@cuda.jit`` kernels of the ``"cuda"`` backend.

The twin of ``cpu_kernels``: the same layouts, the same step names in the same order, so the two
files diff side by side. The canonical ``(outer, C, inner)`` view comes in two layouts:

* ``*_planar``: ``inner > 1`` (NCHW). A feature's values are ``outer`` contiguous runs of
  ``inner``; consecutive threads take consecutive elements of a run, so loads coalesce.
* ``*_channels_last``: ``inner == 1`` (NC, NHWC), a 2-D ``(rows, C)`` array. Blocks are 2-D with
  ``threadIdx.x`` along C (a warp reads consecutive features of a row, as in PyTorch's and apex's
  ``*_channels_last`` kernels) and ``threadIdx.y`` along rows.

Reductions run in two stages. Stage 1 (``batch_moments_*``, ``backward_reduce_*``): every thread
folds a grid-stride range, the block merges its threads' partials in shared memory (a tree: the
simulator has no warp shuffles) and writes one partial per ``(feature, block)``, so one feature
can spread over many blocks when ``outer * inner`` is large and C small. Stage 2
(``finalize_moments``, ``backward_coefficients``): one block per feature merges those partials.
All accumulation and merging is float64; the two-stage split keeps results deterministic (no
atomics, so the merge order does not depend on which block finishes first).

Statistics are chunked Welford: a thread sums ``CHUNK`` of its values, shifted by the chunk's
first value, turns the two sums into the chunk's mean and squared deviations (one divide), and
merges the chunk into its running moments with Chan's formula, like ``cpu_kernels`` does per
cache-sized chunk. Per-element Welford would cost a divide per element. The CPU reads a chunk
twice (mean, then deviations) from cache; a GPU thread's chunk is strided across memory, so
rereading it would be a second trip to L2, and buffering it needs a local-memory array (a
dynamically indexed array is not kept in registers). The shift keeps the one-pass sums free of
cancellation: deviations from a value of the chunk are of the order of the spread, not of the
mean.

Every load of x or dy is widened with ``float()`` before arithmetic: on the GPU that is what
mixing float32 and float64 does anyway, but the simulator computes with NumPy scalars, where
``float32 - python_float`` stays float32 (NEP 50) and would hide precision bugs.

Shared memory is dynamic (``cuda.shared.array(0, ...)``, sized at launch) so the block shape is a
launch-time choice of ``cuda.py``, not a compile-time constant.
"""

from __future__ import annotations

import math

from numba import cuda, float64

CHUNK = 8  # values a thread sums before merging them into its running moments
# Kernels are cached on disk, like cpu_kernels, so a new process skips the NVVM compile of each
# signature it has seen before (the cache is keyed by compute capability).
KERNEL = dict(cache=True)


# ----------------------------------------------------------------------------- shared math
@cuda.jit(device=True)
def chan_merge(count_a, mean_a, m2_a, count_b, mean_b, m2_b):
    """Chan et al.'s parallel update: moments of the union of two disjoint sets."""
    count = count_a + count_b
    if count_b == 0.0:
        return count_a, mean_a, m2_a
    delta = mean_b - mean_a
    ratio = count_b / count
    return count, mean_a + delta * ratio, m2_a + m2_b + delta * delta * count_a * ratio


@cuda.jit(device=True)
def chunk_moments(n, shift, total, total_sq):
    """Count, mean and sum of squared deviations of n values from their shifted sums
    ``total = sum(x - shift)`` and ``total_sq = sum((x - shift)**2)``."""
    count = float(n)
    mean_shifted = total / count
    return count, shift + mean_shifted, total_sq - total * mean_shifted


@cuda.jit(device=True)
def merge_thread_partials(count, mean, m2, rank, ranks, column, columns):
    """Tree-merge the block's partial moments along ``rank``; slot ``(0, column)`` ends with the
    total of its column. Shared slot of ``(rank, column)`` is ``rank * columns + column``.
    Every thread of the block must call it (it synchronizes)."""
    active = ranks
    while active > 1:
        half = (active + 1) // 2
        if rank < active - half:
            mine = rank * columns + column
            other = (rank + half) * columns + column
            n, mu, q = chan_merge(count[mine], mean[mine], m2[mine],
                                  count[other], mean[other], m2[other])
            count[mine] = n
            mean[mine] = mu
            m2[mine] = q
        cuda.syncthreads()
        active = half


@cuda.jit(device=True)
def sum_thread_partials(first, second, rank, ranks, column, columns):
    """:func:`merge_thread_partials` for two plain sums."""
    active = ranks
    while active > 1:
        half = (active + 1) // 2
        if rank < active - half:
            mine = rank * columns + column
            other = (rank + half) * columns + column
            first[mine] += first[other]
            second[mine] += second[other]
        cuda.syncthreads()
        active = half


@cuda.jit(device=True)
def planar_item(j, inner):
    """Row ``o`` and position ``i`` of element ``j`` of one feature's ``outer * inner`` values."""
    o = j // inner
    return o, j - o * inner


@cuda.jit(device=True)
def planar_grid_stride(inner):
    """This thread's block size, rank in the block, first element, grid stride, and the stride
    as (o, i).

    The stride is walked as a fixed (o, i) step instead of dividing j by inner at every element.
    """
    threads = cuda.blockDim.x
    rank = cuda.threadIdx.x
    stride = cuda.gridDim.x * threads
    stride_o, stride_i = planar_item(stride, inner)
    return threads, rank, cuda.blockIdx.x * threads + rank, stride, stride_o, stride_i


# ----------------------------------------------------------------------------- statistics
@cuda.jit(**KERNEL)
def batch_moments_planar(x, part_count, part_mean, part_m2):
    outer, features, inner = x.shape
    n = outer * inner
    threads, rank, first, stride, stride_o, stride_i = planar_grid_stride(inner)
    shared = cuda.shared.array(0, float64)
    s_count = shared[:threads]
    s_mean = shared[threads:2 * threads]
    s_m2 = shared[2 * threads:3 * threads]
    for c in range(cuda.blockIdx.y, features, cuda.gridDim.y):
        count = 0.0
        mean = 0.0
        m2 = 0.0
        o, i = planar_item(first, inner)
        j = first
        while j < n:
            shift = float(x[o, c, i])
            total = 0.0
            total_sq = 0.0
            k = 0
            while k < CHUNK and j < n:
                d = float(x[o, c, i]) - shift
                total += d
                total_sq += d * d
                k += 1
                j += stride
                o += stride_o
                i += stride_i
                if i >= inner:
                    i -= inner
                    o += 1
            n_b, mean_b, m2_b = chunk_moments(k, shift, total, total_sq)
            count, mean, m2 = chan_merge(count, mean, m2, n_b, mean_b, m2_b)
        s_count[rank] = count
        s_mean[rank] = mean
        s_m2[rank] = m2
        cuda.syncthreads()
        merge_thread_partials(s_count, s_mean, s_m2, rank, threads, 0, 1)
        if rank == 0:
            part_count[c, cuda.blockIdx.x] = s_count[0]
            part_mean[c, cuda.blockIdx.x] = s_mean[0]
            part_m2[c, cuda.blockIdx.x] = s_m2[0]
        cuda.syncthreads()  # the next feature reuses the shared slots


@cuda.jit(**KERNEL)
def batch_moments_channels_last(x, part_count, part_mean, part_m2):
    rows, features = x.shape
    columns = cuda.blockDim.x
    ranks = cuda.blockDim.y
    column = cuda.threadIdx.x
    rank = cuda.threadIdx.y
    slot = rank * columns + column
    row_stride = cuda.gridDim.y * ranks
    shared = cuda.shared.array(0, float64)
    size = columns * ranks
    s_count = shared[:size]
    s_mean = shared[size:2 * size]
    s_m2 = shared[2 * size:3 * size]
    for c0 in range(cuda.blockIdx.x * columns, features, cuda.gridDim.x * columns):
        c = c0 + column
        count = 0.0
        mean = 0.0
        m2 = 0.0
        if c < features:
            r = cuda.blockIdx.y * ranks + rank
            while r < rows:
                shift = float(x[r, c])
                total = 0.0
                total_sq = 0.0
                k = 0
                while k < CHUNK and r < rows:
                    d = float(x[r, c]) - shift
                    total += d
                    total_sq += d * d
                    k += 1
                    r += row_stride
                n_b, mean_b, m2_b = chunk_moments(k, shift, total, total_sq)
                count, mean, m2 = chan_merge(count, mean, m2, n_b, mean_b, m2_b)
        s_count[slot] = count
        s_mean[slot] = mean
        s_m2[slot] = m2
        cuda.syncthreads()
        merge_thread_partials(s_count, s_mean, s_m2, rank, ranks, column, columns)
        if rank == 0 and c < features:
            part_count[c, cuda.blockIdx.y] = s_count[column]
            part_mean[c, cuda.blockIdx.y] = s_mean[column]
            part_m2[c, cuda.blockIdx.y] = s_m2[column]
        cuda.syncthreads()


@cuda.jit(**KERNEL)
def finalize_moments(part_count, part_mean, part_m2, mean, var):
    """Stage 2: merge the ``(C, blocks)`` partials into mean and biased variance."""
    features, blocks = part_count.shape
    threads = cuda.blockDim.x
    rank = cuda.threadIdx.x
    shared = cuda.shared.array(0, float64)
    s_count = shared[:threads]
    s_mean = shared[threads:2 * threads]
    s_m2 = shared[2 * threads:3 * threads]
    for c in range(cuda.blockIdx.x, features, cuda.gridDim.x):
        count = 0.0
        mu = 0.0
        m2 = 0.0
        for b in range(rank, blocks, threads):
            count, mu, m2 = chan_merge(count, mu, m2,
                                       part_count[c, b], part_mean[c, b], part_m2[c, b])
        s_count[rank] = count
        s_mean[rank] = mu
        s_m2[rank] = m2
        cuda.syncthreads()
        merge_thread_partials(s_count, s_mean, s_m2, rank, threads, 0, 1)
        if rank == 0:
            mean[c] = s_mean[0]
            var[c] = s_m2[0] / s_count[0]
        cuda.syncthreads()


@cuda.jit(**KERNEL)
def update_running_stats(running_mean, running_var, mean, var, correction, momentum):
    """``(1 - momentum) * old + momentum * batch`` with the unbiased variance
    (``correction = n / (n - 1)``). A zero-length running array means "not tracked"."""
    for c in range(cuda.grid(1), mean.shape[0], cuda.gridsize(1)):
        if running_mean.shape[0] > 0:
            running_mean[c] = (1.0 - momentum) * float(running_mean[c]) + momentum * mean[c]
        if running_var.shape[0] > 0:
            running_var[c] = ((1.0 - momentum) * float(running_var[c])
                              + momentum * (var[c] * correction))


# ----------------------------------------------------------------------------- forward
@cuda.jit(**KERNEL)
def normalize_coefficients(mean, var, gamma, beta, eps, invstd, scale, shift):
    """Per feature: ``invstd = 1/sqrt(var + eps)``, ``scale = gamma*invstd``,
    ``shift = beta - mean*scale``. A zero-length gamma (beta) stands for ones (zeros)."""
    for c in range(cuda.grid(1), mean.shape[0], cuda.gridsize(1)):
        inv = 1.0 / math.sqrt(float(var[c]) + eps)
        g = float(gamma[c]) if gamma.shape[0] > 0 else 1.0
        b = float(beta[c]) if beta.shape[0] > 0 else 0.0
        a = g * inv
        invstd[c] = inv
        scale[c] = a
        shift[c] = b - float(mean[c]) * a


# Coefficients are float64: x*scale + shift cancels when |mean| >> std, and a float32 shift
# would carry an absolute error of |mean|/std * 6e-8. The pass is memory-bound, so the wider
# arithmetic is free on data-centre GPUs; each element is loaded in its dtype and rounded once
# at the store.
@cuda.jit(**KERNEL)
def scale_shift_planar(x, scale, shift, y):
    outer, features, inner = x.shape
    first_i = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    stride_i = cuda.gridDim.x * cuda.blockDim.x
    first_row = cuda.blockIdx.y * cuda.blockDim.y + cuda.threadIdx.y
    stride_row = cuda.gridDim.y * cuda.blockDim.y
    for row in range(first_row, outer * features, stride_row):
        o = row // features
        c = row - o * features
        a = scale[c]
        b = shift[c]
        for i in range(first_i, inner, stride_i):
            y[o, c, i] = float(x[o, c, i]) * a + b


@cuda.jit(**KERNEL)
def scale_shift_channels_last(x, scale, shift, y):
    rows, features = x.shape
    first_c = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    stride_c = cuda.gridDim.x * cuda.blockDim.x
    first_row = cuda.blockIdx.y * cuda.blockDim.y + cuda.threadIdx.y
    stride_row = cuda.gridDim.y * cuda.blockDim.y
    for r in range(first_row, rows, stride_row):
        for c in range(first_c, features, stride_c):
            y[r, c] = float(x[r, c]) * scale[c] + shift[c]


# ----------------------------------------------------------------------------- backward
@cuda.jit(**KERNEL)
def backward_reduce_planar(dy, x, mean, part_sum_dy, part_sum_dy_xmu):
    outer, features, inner = x.shape
    n = outer * inner
    threads, rank, first, stride, stride_o, stride_i = planar_grid_stride(inner)
    shared = cuda.shared.array(0, float64)
    s_dy = shared[:threads]
    s_dy_xmu = shared[threads:2 * threads]
    for c in range(cuda.blockIdx.y, features, cuda.gridDim.y):
        mu = float(mean[c])
        s = 0.0
        p = 0.0
        o, i = planar_item(first, inner)
        j = first
        while j < n:
            g = float(dy[o, c, i])
            s += g
            p += g * (float(x[o, c, i]) - mu)
            j += stride
            o += stride_o
            i += stride_i
            if i >= inner:
                i -= inner
                o += 1
        s_dy[rank] = s
        s_dy_xmu[rank] = p
        cuda.syncthreads()
        sum_thread_partials(s_dy, s_dy_xmu, rank, threads, 0, 1)
        if rank == 0:
            part_sum_dy[c, cuda.blockIdx.x] = s_dy[0]
            part_sum_dy_xmu[c, cuda.blockIdx.x] = s_dy_xmu[0]
        cuda.syncthreads()


@cuda.jit(**KERNEL)
def backward_reduce_channels_last(dy, x, mean, part_sum_dy, part_sum_dy_xmu):
    rows, features = x.shape
    columns = cuda.blockDim.x
    ranks = cuda.blockDim.y
    column = cuda.threadIdx.x
    rank = cuda.threadIdx.y
    slot = rank * columns + column
    row_stride = cuda.gridDim.y * ranks
    shared = cuda.shared.array(0, float64)
    size = columns * ranks
    s_dy = shared[:size]
    s_dy_xmu = shared[size:2 * size]
    for c0 in range(cuda.blockIdx.x * columns, features, cuda.gridDim.x * columns):
        c = c0 + column
        s = 0.0
        p = 0.0
        if c < features:
            mu = float(mean[c])
            for r in range(cuda.blockIdx.y * ranks + rank, rows, row_stride):
                g = float(dy[r, c])
                s += g
                p += g * (float(x[r, c]) - mu)
        s_dy[slot] = s
        s_dy_xmu[slot] = p
        cuda.syncthreads()
        sum_thread_partials(s_dy, s_dy_xmu, rank, ranks, column, columns)
        if rank == 0 and c < features:
            part_sum_dy[c, cuda.blockIdx.y] = s_dy[column]
            part_sum_dy_xmu[c, cuda.blockIdx.y] = s_dy_xmu[column]
        cuda.syncthreads()


@cuda.jit(**KERNEL)
def backward_coefficients(part_sum_dy, part_sum_dy_xmu, gamma, mean, invstd, count,
                          batch_stats, k1, k2, k3, dgamma, dbeta):
    """Stage 2 of the backward reduction, then per feature ``(k1, k2, k3)`` with
    ``dx = k1*dy + k2*x + k3`` (``host.backward_coefficients``), ``dgamma`` and ``dbeta``.
    A zero-length gamma stands for ones."""
    features, blocks = part_sum_dy.shape
    threads = cuda.blockDim.x
    rank = cuda.threadIdx.x
    shared = cuda.shared.array(0, float64)
    s_dy = shared[:threads]
    s_dy_xmu = shared[threads:2 * threads]
    for c in range(cuda.blockIdx.x, features, cuda.gridDim.x):
        s = 0.0
        p = 0.0
        for b in range(rank, blocks, threads):
            s += part_sum_dy[c, b]
            p += part_sum_dy_xmu[c, b]
        s_dy[rank] = s
        s_dy_xmu[rank] = p
        cuda.syncthreads()
        sum_thread_partials(s_dy, s_dy_xmu, rank, threads, 0, 1)
        if rank == 0:
            sum_dy = s_dy[0]
            sum_dy_xmu = s_dy_xmu[0]
            inv = float(invstd[c])
            g = float(gamma[c]) if gamma.shape[0] > 0 else 1.0
            a = g * inv
            b = 0.0
            d = 0.0
            if batch_stats:
                b = -a * inv * inv * (sum_dy_xmu / count)
                d = -a * (sum_dy / count) - b * float(mean[c])
            k1[c] = a
            k2[c] = b
            k3[c] = d
            dgamma[c] = sum_dy_xmu * inv
            dbeta[c] = sum_dy
        cuda.syncthreads()


@cuda.jit(**KERNEL)
def backward_elementwise_planar(dy, x, k1, k2, k3, dx):
    outer, features, inner = x.shape
    first_i = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    stride_i = cuda.gridDim.x * cuda.blockDim.x
    first_row = cuda.blockIdx.y * cuda.blockDim.y + cuda.threadIdx.y
    stride_row = cuda.gridDim.y * cuda.blockDim.y
    for row in range(first_row, outer * features, stride_row):
        o = row // features
        c = row - o * features
        a = k1[c]
        b = k2[c]
        d = k3[c]
        for i in range(first_i, inner, stride_i):
            dx[o, c, i] = float(dy[o, c, i]) * a + float(x[o, c, i]) * b + d


@cuda.jit(**KERNEL)
def backward_elementwise_channels_last(dy, x, k1, k2, k3, dx):
    rows, features = x.shape
    first_c = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    stride_c = cuda.gridDim.x * cuda.blockDim.x
    first_row = cuda.blockIdx.y * cuda.blockDim.y + cuda.threadIdx.y
    stride_row = cuda.gridDim.y * cuda.blockDim.y
    for r in range(first_row, rows, stride_row):
        for c in range(first_c, features, stride_c):
            dx[r, c] = float(dy[r, c]) * k1[c] + float(x[r, c]) * k2[c] + k3[c]


# ----------------------------------------------------------------------------- casts
@cuda.jit(**KERNEL)
def cast_copy(source, target):
    """``target[:] = source`` between flat arrays of different dtypes (``cuda.astype``)."""
    for j in range(cuda.grid(1), source.shape[0], cuda.gridsize(1)):
        target[j] = source[j]


#: Every kernel (not device function), for the PTX compile check in the tests.
KERNELS = (batch_moments_planar, batch_moments_channels_last, finalize_moments,
           update_running_stats, normalize_coefficients, scale_shift_planar,
           scale_shift_channels_last, backward_reduce_planar, backward_reduce_channels_last,
           backward_coefficients, backward_elementwise_planar,
           backward_elementwise_channels_last, cast_copy)
