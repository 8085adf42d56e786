"""CUDA twins of the CPU stream kernels of :mod:`fastbn.bench.roofline`.

A module of its own, imported only when a GPU is measured (it needs numba-cuda). ``cuda`` is a
module global, not a closure variable, so the CUDA simulator can swap it in the smoke test.
"""

from numba import cuda


@cuda.jit
def stream_read(a, total):
    start = cuda.grid(1)
    stride = cuda.gridsize(1)
    partial = 0.0
    for i in range(start, a.size, stride):
        partial += a[i]
    cuda.atomic.add(total, 0, partial)  # keeps the loads from being optimized away


@cuda.jit
def stream_read_write(a, out, factor):
    start = cuda.grid(1)
    stride = cuda.gridsize(1)
    for i in range(start, a.size, stride):
        out[i] = a[i] * factor
