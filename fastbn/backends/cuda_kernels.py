"""Numba ``@cuda.jit`` kernels of the ``"cuda"`` backend, the twin of ``cpu_kernels``.

======================================  ========  ==========================================
kernel (or device function)             pass      job
======================================  ========  ==========================================
``batch_moments_planar``                stats     stage 1: per-(feature, block) moments
``batch_moments_channels_last``         stats     the same for ``(rows, C)``
``merge_block_partials``                stats     stage 2: Chan-merge them -> mean, var
``update_running_stats``                per-C     running averages, all or nothing
``normalize_coefficients`` (device)     per-C     invstd, scale, shift (``feature_math``)
``scale_shift_planar``                  forward   y = act(x*scale + shift [+ residual])
``scale_shift_channels_last``           forward   the same for ``(rows, C)``
``backward_reduce_planar``              backward  stage 1: partial sums of g, g*(x - mean)
``backward_reduce_channels_last``       backward  the same for ``(rows, C)``
``merge_gradient_partials``             backward  stage 2: sum them -> dgamma, dbeta
``backward_coefficients`` (device)      per-C     dy_scale, x_scale, dx_shift
``backward_elementwise_planar``         backward  dx = g*dy_scale + x*x_scale + dx_shift
``backward_elementwise_channels_last``  backward  the same for ``(rows, C)``
``contiguous_copy``                     input     strided 3-D view -> contiguous copy/cast
======================================  ========  ==========================================

Layouts of the canonical ``(outer, C, inner)`` view:

* ``*_planar``: ``inner > 1`` (NCHW). ``blockIdx.y`` is the feature (grid-strided beyond the
  grid's limit), so a block's per-feature coefficients sit in registers and no element pays an
  integer division; consecutive threads take consecutive elements of a feature's runs, so loads
  coalesce.
* ``*_channels_last``: ``inner == 1`` (NC, NHWC), a 2-D ``(rows, C)`` array. Blocks are 2-D with
  ``threadIdx.x`` along C (a warp reads consecutive features of a row, as PyTorch's and apex's
  ``*_channels_last`` kernels) and ``threadIdx.y`` along rows; a thread keeps its feature's
  coefficients in registers while it walks the rows.

Loads in flight: every pass loads ``LOADS`` values per thread into registers before it uses any
(PyTorch's ``ELEMENTS_PER_ITER``, apex's ``PARALLEL_LOADS``); one load at a time leaves a
memory-bound kernel waiting on DRAM latency. The group is a ``cuda.local.array`` indexed by
constant-trip loops, which NVVM unrolls into registers (tests/test_cuda_ptx.py checks that no
kernel uses local memory).

Reductions run in two stages. Stage 1 folds a grid-stride range per thread, merges the block's
threads in shared memory with one helper per combine operation (``block_reduce_moments``: Chan
merge; ``block_reduce_sums``: plain sums) and writes one partial per ``(feature, block)``; stage 2
merges those per feature. Where a feature fits one block, stage 1 writes the final result and
stage 2 is not launched. No atomics: results do not depend on block scheduling.

Statistics are chunked Welford: a thread's group of ``LOADS`` values is summed relative to its
first value (the ``pivot``), turned into the group's mean and M2 (one divide), and merged into
the thread's running moments with Chan's formula, like ``cpu_kernels`` does per cache-sized
chunk. The pivot keeps the sums free of cancellation when ``|mean| >> std``.

Numerics: every load is widened with ``numba.float64(...)`` before arithmetic. Compiled Numba
keeps ``float(x)`` of a float32 in float32 (only the simulator widens it), so ``float()`` would
put the statistics' subtraction and square in float32 on the GPU; tests/test_cuda_ptx.py reads
the PTX of every reduction and elementwise kernel and fails on any float32 or float16
arithmetic. Per-feature coefficients are float64 (``feature_math``, compiled here with
``cuda.jit(device=True)``); each result is rounded once, at the store, to the array's dtype
(float16, float32 or float64).

Shared memory is dynamic (``cuda.shared.array(0, ...)``, sized at launch), so block shapes are
launch-time choices of ``cuda.py``.
"""

from __future__ import annotations

from numba import cuda, float64

try:  # numba-cuda >= 0.2x keeps its own copy of the config
    from numba.cuda.core import config
except ImportError:
    from numba.core import config

from . import feature_math

LOADS = 8  # values a thread loads before it combines them (and a statistics chunk)
# Kernels are cached on disk, like cpu_kernels, so a new process skips the NVVM compile of each
# signature it has seen before (the cache is keyed by compute capability).
KERNEL = dict(cache=True)
# ptxas gives scale_shift_planar 164 registers a thread (float32, sm_90): one 256-thread block
# per SM. Capped at 128 it needs 120 and spills nothing, so two blocks fit. (The backward
# elementwise kernels spill at that cap, so they keep theirs.) Not a simulator option.
CAPPED_KERNEL = KERNEL if config.ENABLE_CUDASIM else dict(KERNEL, max_registers=128)

# ----------------------------------------------------------------------------- shared math
device = cuda.jit(device=True)
chan_merge = device(feature_math.chan_merge)
inverse_std = device(feature_math.inverse_std)
affine_scale = device(feature_math.affine_scale)
affine_shift = device(feature_math.affine_shift)
backward_dy_scale = device(feature_math.backward_dy_scale)
backward_x_scale = device(feature_math.backward_x_scale)
backward_dx_shift = device(feature_math.backward_dx_shift)
unbiased_variance = device(feature_math.unbiased_variance)
running_average = device(feature_math.running_average)


@cuda.jit(device=True)
def optional(vector, c, absent):
    """``vector[c]`` in float64, or ``absent`` where the vector has length 0 (None)."""
    return float64(vector[c]) if vector.shape[0] > 0 else absent


@cuda.jit(device=True)
def chunk_moments(values, loaded):
    """Count, mean and M2 of ``values[:loaded]`` (``loaded >= 1``), summed relative to the
    first value (the pivot)."""
    pivot = values[0]
    total = 0.0
    total_sq = 0.0
    for q in range(LOADS):
        if q < loaded:
            d = values[q] - pivot
            total += d
            total_sq += d * d
    count = float64(loaded)
    mean_shifted = total / count
    return count, pivot + mean_shifted, total_sq - total * mean_shifted


@cuda.jit(device=True)
def block_reduce_moments(shared, count, mean, m2, rank, ranks, column, columns):
    """Chan-merge the block's per-thread moments along ``rank``; returns the total of
    ``column`` (valid in the thread with ``rank == 0``). Every thread of the block must call
    it: it synchronizes, and it leaves ``shared`` free for reuse."""
    size = ranks * columns
    slot = rank * columns + column
    shared[slot] = count
    shared[size + slot] = mean
    shared[2 * size + slot] = m2
    cuda.syncthreads()
    active = ranks
    while active > 1:
        half = (active + 1) // 2
        if rank < active - half:
            other = slot + half * columns
            n, mu, q = chan_merge(shared[slot], shared[size + slot], shared[2 * size + slot],
                                  shared[other], shared[size + other], shared[2 * size + other])
            shared[slot] = n
            shared[size + slot] = mu
            shared[2 * size + slot] = q
        cuda.syncthreads()
        active = half
    n, mu, q = shared[column], shared[size + column], shared[2 * size + column]
    cuda.syncthreads()
    return n, mu, q


@cuda.jit(device=True)
def block_reduce_sums(shared, first, second, rank, ranks, column, columns):
    """:func:`block_reduce_moments` for two plain sums."""
    size = ranks * columns
    slot = rank * columns + column
    shared[slot] = first
    shared[size + slot] = second
    cuda.syncthreads()
    active = ranks
    while active > 1:
        half = (active + 1) // 2
        if rank < active - half:
            other = slot + half * columns
            shared[slot] += shared[other]
            shared[size + slot] += shared[size + other]
        cuda.syncthreads()
        active = half
    a, b = shared[column], shared[size + column]
    cuda.syncthreads()
    return a, b


@cuda.jit(device=True)
def planar_grid_stride(inner):
    """This thread's rank in its block, the block's size, its first element of a feature's
    ``outer * inner`` values (as ``j`` and as ``(o, i)``), and the grid stride as ``j`` and as
    ``(o, i)``: the stride is walked as a fixed (o, i) step, never dividing by ``inner``."""
    threads = cuda.blockDim.x
    rank = cuda.threadIdx.x
    first = cuda.blockIdx.x * threads + rank
    stride = cuda.gridDim.x * threads
    first_o = first // inner
    stride_o = stride // inner
    return (rank, threads, first, first_o, first - first_o * inner, stride, stride_o,
            stride - stride_o * inner)


@cuda.jit(device=True)
def store_moments(partials, stats, c, block, blocks, count, mean, m2):
    """A block's moments of feature ``c``: the result ``stats[:, c] = (mean, biased var)``
    where the feature has one block, else partial ``block`` for stage 2."""
    if blocks == 1:
        stats[0, c] = mean
        stats[1, c] = m2 / count
    else:
        partials[0, c, block] = count
        partials[1, c, block] = mean
        partials[2, c, block] = m2


@cuda.jit(device=True)
def store_sums(partials, grads, c, block, blocks, sum_g, sum_g_xmu, invstd_c):
    """:func:`store_moments` for the backward sums: ``grads[:, c] = (dgamma, dbeta)``."""
    if blocks == 1:
        grads[0, c] = sum_g_xmu * invstd_c
        grads[1, c] = sum_g
    else:
        partials[0, c, block] = sum_g
        partials[1, c, block] = sum_g_xmu


@cuda.jit(device=True)
def planar_step(j, o, i, stride, stride_o, stride_i, inner):
    """Element ``j + stride`` of a feature, and its ``(o, i)``, from element ``j`` at (o, i)."""
    i += stride_i
    o += stride_o
    if i >= inner:
        i -= inner
        o += 1
    return j + stride, o, i


# ----------------------------------------------------------------------------- statistics
@cuda.jit(**KERNEL)
def batch_moments_planar(x, partials, stats):
    """``partials[:, c, block] = (count, mean, M2)``; with one block per feature,
    ``stats[:, c] = (mean, biased var)`` directly."""
    outer, features, inner = x.shape
    n = outer * inner
    rank, threads, first, first_o, first_i, stride, stride_o, stride_i = planar_grid_stride(inner)
    shared = cuda.shared.array(0, float64)
    values = cuda.local.array(LOADS, float64)
    for c in range(cuda.blockIdx.y, features, cuda.gridDim.y):
        count = 0.0
        mean = 0.0
        m2 = 0.0
        j = first
        o = first_o
        i = first_i
        while j < n:
            loaded = 0
            for q in range(LOADS):
                if j < n:
                    values[q] = float64(x[o, c, i])
                    loaded += 1
                    j, o, i = planar_step(j, o, i, stride, stride_o, stride_i, inner)
            n_b, mean_b, m2_b = chunk_moments(values, loaded)
            count, mean, m2 = chan_merge(count, mean, m2, n_b, mean_b, m2_b)
        count, mean, m2 = block_reduce_moments(shared, count, mean, m2, rank, threads, 0, 1)
        if rank == 0:
            store_moments(partials, stats, c, cuda.blockIdx.x, cuda.gridDim.x, count, mean,
                          m2)


@cuda.jit(**KERNEL)
def batch_moments_channels_last(x, partials, stats):
    """:func:`batch_moments_planar` for a ``(rows, C)`` array; ``blockIdx.y`` indexes the
    partials."""
    rows, features = x.shape
    columns = cuda.blockDim.x
    ranks = cuda.blockDim.y
    column = cuda.threadIdx.x
    rank = cuda.threadIdx.y
    row_stride = cuda.gridDim.y * ranks
    shared = cuda.shared.array(0, float64)
    values = cuda.local.array(LOADS, float64)
    for c0 in range(cuda.blockIdx.x * columns, features, cuda.gridDim.x * columns):
        c = c0 + column
        count = 0.0
        mean = 0.0
        m2 = 0.0
        if c < features:
            r = cuda.blockIdx.y * ranks + rank
            while r < rows:
                loaded = 0
                for q in range(LOADS):
                    if r < rows:
                        values[q] = float64(x[r, c])
                        loaded += 1
                        r += row_stride
                n_b, mean_b, m2_b = chunk_moments(values, loaded)
                count, mean, m2 = chan_merge(count, mean, m2, n_b, mean_b, m2_b)
        count, mean, m2 = block_reduce_moments(shared, count, mean, m2, rank, ranks, column,
                                               columns)
        if rank == 0 and c < features:
            store_moments(partials, stats, c, cuda.blockIdx.y, cuda.gridDim.y, count, mean,
                          m2)


@cuda.jit(**KERNEL)
def merge_block_partials(partials, blocks, stats):
    """Stage 2: Chan-merge the first ``blocks`` partials of every feature into
    ``stats = (mean, biased var)``. One block per feature (grid-strided)."""
    features = partials.shape[1]
    threads = cuda.blockDim.x
    rank = cuda.threadIdx.x
    shared = cuda.shared.array(0, float64)
    for c in range(cuda.blockIdx.x, features, cuda.gridDim.x):
        count = 0.0
        mean = 0.0
        m2 = 0.0
        for b in range(rank, blocks, threads):
            count, mean, m2 = chan_merge(count, mean, m2,
                                         partials[0, c, b], partials[1, c, b], partials[2, c, b])
        count, mean, m2 = block_reduce_moments(shared, count, mean, m2, rank, threads, 0, 1)
        if rank == 0:
            store_moments(partials, stats, c, 0, 1, count, mean, m2)


@cuda.jit(**KERNEL)
def update_running_stats(running_mean, running_var, mean, var, count, momentum, mean_limit,
                         var_limit, status):
    """``running = running_average(running, batch, momentum)`` (unbiased variance), all or
    nothing: launched as one block, it first checks that every new value stays below its
    array's overflow limit (``*_limit``: where rounding to the running dtype gives inf), and
    writes only if all do. ``status[0]`` = 1 after the update, 0 when nothing was written.
    A zero-length running array is not tracked."""
    features = mean.shape[0]
    fine = 1
    for c in range(cuda.threadIdx.x, features, cuda.blockDim.x):
        if running_mean.shape[0] > 0:
            new_mean = running_average(float64(running_mean[c]), float64(mean[c]), momentum)
            if not abs(new_mean) < mean_limit:
                fine = 0
        if running_var.shape[0] > 0:
            new_var = running_average(float64(running_var[c]),
                                      unbiased_variance(float64(var[c]), count), momentum)
            if not abs(new_var) < var_limit:
                fine = 0
    everywhere = cuda.syncthreads_and(fine)
    if everywhere:
        for c in range(cuda.threadIdx.x, features, cuda.blockDim.x):
            if running_mean.shape[0] > 0:
                running_mean[c] = running_average(float64(running_mean[c]), float64(mean[c]),
                                                  momentum)
            if running_var.shape[0] > 0:
                running_var[c] = running_average(float64(running_var[c]),
                                                 unbiased_variance(float64(var[c]), count),
                                                 momentum)
    if cuda.threadIdx.x == 0:
        status[0] = 1 if everywhere else 0


# ----------------------------------------------------------------------------- forward
@cuda.jit(device=True)
def forward_affine(gamma, beta, c, mean_c, invstd_c):
    """Feature ``c``'s ``(scale, shift)`` of ``y = x*scale + shift``; an empty gamma (beta) is
    1 (0). The backward's recomputed ReLU mask uses it too, so both see the same value."""
    scale = affine_scale(optional(gamma, c, 1.0), invstd_c)
    return scale, affine_shift(optional(beta, c, 0.0), mean_c, scale)


@cuda.jit(device=True)
def normalize_coefficients(mean, var, gamma, beta, c, eps):
    """Feature ``c``'s ``(invstd, scale, shift)`` in float64."""
    invstd = inverse_std(float64(var[c]), eps)
    scale, shift = forward_affine(gamma, beta, c, float64(mean[c]), invstd)
    return invstd, scale, shift


@cuda.jit(device=True)
def forward_value(x, residual, index, scale, shift, with_residual):
    """``x*scale + shift [+ residual]`` at ``index``, in float64 (rounded later, at the store).
    An explicit FMA, which the backward's recomputed ReLU mask uses too, so the two agree to
    the bit whatever the compiler would contract."""
    v = cuda.fma(float64(x[index]), scale, shift)
    if with_residual:
        v += float64(residual[index])
    return v


@cuda.jit(device=True)
def activation(v, relu):
    """ReLU where ``relu`` (NaN stays NaN), else the identity."""
    return 0.0 if relu and v < 0.0 else v


# Coefficients are float64: x*scale + shift cancels when |mean| >> std, and a float32 shift
# would carry an absolute error of |mean|/std * 6e-8. The pass is memory-bound, so the wider
# arithmetic is free on data-centre GPUs; each element is loaded in its dtype and rounded once
# at the store. Every group is loaded completely before any of it is stored, so y may be x or
# the residual itself.
@cuda.jit(**CAPPED_KERNEL)
def scale_shift_planar(x, mean, var, gamma, beta, eps, residual, relu, y, invstd):
    """``y = act(x*scale + shift + residual)``; ``invstd[c]`` written by the feature's first
    block. An empty residual means none."""
    outer, features, inner = x.shape
    with_residual = residual.shape[0] > 0
    values = cuda.local.array(LOADS, float64)
    along = cuda.blockDim.x
    first_o = cuda.blockIdx.x * cuda.blockDim.y + cuda.threadIdx.y
    stride_o = cuda.gridDim.x * cuda.blockDim.y
    for c in range(cuda.blockIdx.y, features, cuda.gridDim.y):
        inv, scale, shift = normalize_coefficients(mean, var, gamma, beta, c, eps)
        if cuda.blockIdx.x == 0 and cuda.threadIdx.x == 0 and cuda.threadIdx.y == 0:
            invstd[c] = inv
        o = first_o
        while o < outer:  # while, not range: no division per row
            i0 = cuda.threadIdx.x
            while i0 < inner:
                for q in range(LOADS):
                    i = i0 + q * along
                    if i < inner:
                        values[q] = forward_value(x, residual, (o, c, i), scale, shift,
                                                 with_residual)
                for q in range(LOADS):
                    i = i0 + q * along
                    if i < inner:
                        y[o, c, i] = activation(values[q], relu)
                i0 += along * LOADS
            o += stride_o


@cuda.jit(**KERNEL)
def scale_shift_channels_last(x, mean, var, gamma, beta, eps, residual, relu, y, invstd):
    """:func:`scale_shift_planar` for a ``(rows, C)`` array; ``invstd[c]`` written by the
    first row of threads."""
    rows, features = x.shape
    with_residual = residual.shape[0] > 0
    values = cuda.local.array(LOADS, float64)
    first_r = cuda.blockIdx.y * cuda.blockDim.y + cuda.threadIdx.y
    stride_r = cuda.gridDim.y * cuda.blockDim.y
    for c in range(cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x, features,
                   cuda.gridDim.x * cuda.blockDim.x):
        inv, scale, shift = normalize_coefficients(mean, var, gamma, beta, c, eps)
        if first_r == 0:
            invstd[c] = inv
        for r0 in range(first_r, rows, stride_r * LOADS):
            for q in range(LOADS):
                r = r0 + q * stride_r
                if r < rows:
                    values[q] = forward_value(x, residual, (r, c), scale, shift,
                                             with_residual)
            for q in range(LOADS):
                r = r0 + q * stride_r
                if r < rows:
                    y[r, c] = activation(values[q], relu)


# ----------------------------------------------------------------------------- backward
# The ReLU mask: g = dy where the forward output was positive. Given the forward's y it is
# y > 0; else it is recomputed from x as the forward computed it (same statements, same
# coefficients), compared with ``relu_floor``, the largest float64 that rounds to 0 in x's
# dtype, so the mask is exactly ``stored y > 0``. Ties (y == 0) get no gradient, as PyTorch's
# threshold_backward.
@cuda.jit(device=True)
def masked_gradient(dy, x, y, index, relu, with_y, scale, shift, floor):
    """``(g, x)`` at ``index`` in float64: dy through the ReLU mask, read from y (``floor``
    0) or recomputed from x (``floor`` = ``relu_floor``)."""
    g = float64(dy[index])
    xv = float64(x[index])
    if relu:
        value = float64(y[index]) if with_y else cuda.fma(xv, scale, shift)
        if not value > floor:
            g = 0.0
    return g, xv


@cuda.jit(**KERNEL)
def backward_reduce_planar(dy, x, y, mean, invstd, gamma, beta, relu, relu_floor, partials,
                           grads):
    """``partials[:, c, block] = (sum g, sum g*(x - mean))``; with one block per feature,
    ``grads[:, c] = (dgamma, dbeta)`` directly. An empty y means: recompute the mask."""
    outer, features, inner = x.shape
    n = outer * inner
    with_y = y.shape[0] > 0
    floor = 0.0 if with_y else relu_floor
    rank, threads, first, first_o, first_i, stride, stride_o, stride_i = planar_grid_stride(inner)
    shared = cuda.shared.array(0, float64)
    g_values = cuda.local.array(LOADS, float64)
    x_values = cuda.local.array(LOADS, float64)
    for c in range(cuda.blockIdx.y, features, cuda.gridDim.y):
        mu = float64(mean[c])
        inv = float64(invstd[c])
        scale, shift = forward_affine(gamma, beta, c, mu, inv)
        s = 0.0
        p = 0.0
        j = first
        o = first_o
        i = first_i
        while j < n:
            loaded = 0
            for q in range(LOADS):
                if j < n:
                    g, xv = masked_gradient(dy, x, y, (o, c, i), relu, with_y, scale, shift,
                                           floor)
                    g_values[q] = g
                    x_values[q] = xv
                    loaded += 1
                    j, o, i = planar_step(j, o, i, stride, stride_o, stride_i, inner)
            for q in range(LOADS):
                if q < loaded:
                    s += g_values[q]
                    p += g_values[q] * (x_values[q] - mu)
        s, p = block_reduce_sums(shared, s, p, rank, threads, 0, 1)
        if rank == 0:
            store_sums(partials, grads, c, cuda.blockIdx.x, cuda.gridDim.x, s, p, inv)


@cuda.jit(**KERNEL)
def backward_reduce_channels_last(dy, x, y, mean, invstd, gamma, beta, relu, relu_floor,
                                  partials, grads):
    """:func:`backward_reduce_planar` for a ``(rows, C)`` array."""
    rows, features = x.shape
    with_y = y.shape[0] > 0
    floor = 0.0 if with_y else relu_floor
    columns = cuda.blockDim.x
    ranks = cuda.blockDim.y
    column = cuda.threadIdx.x
    rank = cuda.threadIdx.y
    row_stride = cuda.gridDim.y * ranks
    shared = cuda.shared.array(0, float64)
    g_values = cuda.local.array(LOADS, float64)
    x_values = cuda.local.array(LOADS, float64)
    for c0 in range(cuda.blockIdx.x * columns, features, cuda.gridDim.x * columns):
        c = c0 + column
        s = 0.0
        p = 0.0
        inv = 0.0
        if c < features:
            mu = float64(mean[c])
            inv = float64(invstd[c])
            scale, shift = forward_affine(gamma, beta, c, mu, inv)
            r = cuda.blockIdx.y * ranks + rank
            while r < rows:
                loaded = 0
                for q in range(LOADS):
                    if r < rows:
                        g, xv = masked_gradient(dy, x, y, (r, c), relu, with_y, scale, shift,
                                               floor)
                        g_values[q] = g
                        x_values[q] = xv
                        loaded += 1
                        r += row_stride
                for q in range(LOADS):
                    if q < loaded:
                        s += g_values[q]
                        p += g_values[q] * (x_values[q] - mu)
        s, p = block_reduce_sums(shared, s, p, rank, ranks, column, columns)
        if rank == 0 and c < features:
            store_sums(partials, grads, c, cuda.blockIdx.y, cuda.gridDim.y, s, p, inv)


@cuda.jit(**KERNEL)
def merge_gradient_partials(partials, blocks, invstd, grads):
    """Stage 2: ``grads[:, c] = (dgamma, dbeta)`` from the first ``blocks`` partial sums of
    every feature. One block per feature (grid-strided)."""
    features = partials.shape[1]
    threads = cuda.blockDim.x
    rank = cuda.threadIdx.x
    shared = cuda.shared.array(0, float64)
    for c in range(cuda.blockIdx.x, features, cuda.gridDim.x):
        s = 0.0
        p = 0.0
        for b in range(rank, blocks, threads):
            s += partials[0, c, b]
            p += partials[1, c, b]
        s, p = block_reduce_sums(shared, s, p, rank, threads, 0, 1)
        if rank == 0:
            store_sums(partials, grads, c, 0, 1, s, p, float64(invstd[c]))


@cuda.jit(device=True)
def backward_coefficients(mean, invstd, gamma, dgamma, dbeta, c, count, batch_stats):
    """Feature ``c``'s ``(dy_scale, x_scale, dx_shift)`` in float64 (``feature_math``)."""
    inv = float64(invstd[c])
    dy_scale = backward_dy_scale(optional(gamma, c, 1.0), inv)
    x_scale = backward_x_scale(dy_scale, inv, float64(dgamma[c]), count, batch_stats)
    return dy_scale, x_scale, backward_dx_shift(dy_scale, x_scale, float64(mean[c]),
                                                float64(dbeta[c]), count, batch_stats)


@cuda.jit(**KERNEL)
def backward_elementwise_planar(dy, x, y, mean, invstd, gamma, beta, dgamma, dbeta, count,
                                batch_stats, relu, relu_floor, dx, dresidual):
    """``dx = g*dy_scale + x*x_scale + dx_shift`` and, where ``dresidual`` is not empty,
    ``dresidual = g``. dx may be dy or x (each group is loaded before it is stored)."""
    outer, features, inner = x.shape
    with_y = y.shape[0] > 0
    floor = 0.0 if with_y else relu_floor
    with_dresidual = dresidual.shape[0] > 0
    g_values = cuda.local.array(LOADS, float64)
    x_values = cuda.local.array(LOADS, float64)
    along = cuda.blockDim.x
    first_o = cuda.blockIdx.x * cuda.blockDim.y + cuda.threadIdx.y
    stride_o = cuda.gridDim.x * cuda.blockDim.y
    for c in range(cuda.blockIdx.y, features, cuda.gridDim.y):
        dy_scale, x_scale, dx_shift = backward_coefficients(mean, invstd, gamma, dgamma, dbeta,
                                                            c, count, batch_stats)
        scale, shift = forward_affine(gamma, beta, c, float64(mean[c]), float64(invstd[c]))
        o = first_o
        while o < outer:  # while, not range: no division per row
            i0 = cuda.threadIdx.x
            while i0 < inner:
                for q in range(LOADS):
                    i = i0 + q * along
                    if i < inner:
                        g, xv = masked_gradient(dy, x, y, (o, c, i), relu, with_y, scale, shift,
                                               floor)
                        g_values[q] = g
                        x_values[q] = xv
                for q in range(LOADS):
                    i = i0 + q * along
                    if i < inner:
                        dx[o, c, i] = g_values[q] * dy_scale + x_values[q] * x_scale + dx_shift
                        if with_dresidual:
                            dresidual[o, c, i] = g_values[q]
                i0 += along * LOADS
            o += stride_o


@cuda.jit(**KERNEL)
def backward_elementwise_channels_last(dy, x, y, mean, invstd, gamma, beta, dgamma, dbeta,
                                       count, batch_stats, relu, relu_floor, dx, dresidual):
    """:func:`backward_elementwise_planar` for a ``(rows, C)`` array."""
    rows, features = x.shape
    with_y = y.shape[0] > 0
    floor = 0.0 if with_y else relu_floor
    with_dresidual = dresidual.shape[0] > 0
    g_values = cuda.local.array(LOADS, float64)
    x_values = cuda.local.array(LOADS, float64)
    first_r = cuda.blockIdx.y * cuda.blockDim.y + cuda.threadIdx.y
    stride_r = cuda.gridDim.y * cuda.blockDim.y
    for c in range(cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x, features,
                   cuda.gridDim.x * cuda.blockDim.x):
        dy_scale, x_scale, dx_shift = backward_coefficients(mean, invstd, gamma, dgamma, dbeta,
                                                            c, count, batch_stats)
        scale, shift = forward_affine(gamma, beta, c, float64(mean[c]), float64(invstd[c]))
        for r0 in range(first_r, rows, stride_r * LOADS):
            for q in range(LOADS):
                r = r0 + q * stride_r
                if r < rows:
                    g, xv = masked_gradient(dy, x, y, (r, c), relu, with_y, scale, shift,
                                           floor)
                    g_values[q] = g
                    x_values[q] = xv
            for q in range(LOADS):
                r = r0 + q * stride_r
                if r < rows:
                    dx[r, c] = g_values[q] * dy_scale + x_values[q] * x_scale + dx_shift
                    if with_dresidual:
                        dresidual[r, c] = g_values[q]


# ----------------------------------------------------------------------------- input copies
@cuda.jit(**KERNEL)
def contiguous_copy(source, target):
    """``target[...] = source`` for a strided 3-D ``source`` and a C-contiguous ``target``
    (of the same or another dtype: ``cuda.astype``)."""
    outer, features, inner = source.shape
    for j in range(cuda.grid(1), outer * features * inner, cuda.gridsize(1)):
        row = j // inner
        o = row // features
        target[o, row - o * features, j - row * inner] = source[o, row - o * features,
                                                                j - row * inner]


#: Every kernel (not device function), for the PTX checks in the tests.
KERNELS = (batch_moments_planar, batch_moments_channels_last, merge_block_partials,
           update_running_stats, scale_shift_planar, scale_shift_channels_last,
           backward_reduce_planar, backward_reduce_channels_last, merge_gradient_partials,
           backward_elementwise_planar, backward_elementwise_channels_last, contiguous_copy)
