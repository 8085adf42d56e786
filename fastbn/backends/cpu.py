"""The ``"cpu"`` backend: Numba ``@njit(parallel=True)`` kernels (see ``cpu_kernels``).

Forward-train streams the tensor three times (statistics, then read + write of the fused pass);
eval twice; backward five times (read dy and x to reduce, read dy and x and write dx). Outputs
come from a pool of recycled buffers (``buffers.POOL``), so that a fresh output's page faults do
not add a pass.
"""

from __future__ import annotations

import threading

import numba
import numpy as np

from . import cpu_kernels as k
from .buffers import POOL
from .host import (asarray, astype, backward_coefficients, canonical,  # noqa: F401
                   nonfinite_features, output_view, per_feature, to_host, to_output, unavailable_reason,
                   update_running_stats)

NAME = "cpu"

# Numba's 'workqueue' threading layer aborts the process when two Python threads launch
# parallel kernels at once. The first launch runs under the lock and learns which layer Numba
# picked; only workqueue keeps serializing afterwards.
_launch_lock = threading.Lock()
_layer_is_threadsafe = False


def _launch(kernel, *args, threads: int):
    global _layer_is_threadsafe
    if threads == 1:
        return k.SERIAL[kernel.__name__](*args, 1)
    if _layer_is_threadsafe:
        return kernel(*args, threads)
    with _launch_lock:
        result = kernel(*args, threads)
        _layer_is_threadsafe = numba.threading_layer() != "workqueue"
        return result


# Below this many elements a kernel runs serially on the calling thread: the thread pool costs
# more than it saves there, and beside BLAS threads spinning after a matmul it costs
# milliseconds (see cpu_kernels.threaded_and_serial).
SERIAL_BELOW = 1 << 17


def _threads(x3: np.ndarray) -> int:
    return 1 if x3.size < SERIAL_BELOW else numba.get_num_threads()


def _rows(a3: np.ndarray) -> np.ndarray:
    return a3.reshape(a3.shape[0], a3.shape[1])


def moments(x3: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if x3.shape[2] == 1:
        return _launch(k.batch_moments_channels_last, _rows(x3),
                       k.channels_last_block_rows(x3.shape[1]), threads=_threads(x3))
    return _launch(k.batch_moments_planar, x3, k.planar_chunk(x3.shape[2]),
                   threads=_threads(x3))


def normalize(x3, mean, var, gamma, beta, eps, out3=None):
    features = x3.shape[1]
    invstd = 1.0 / np.sqrt(np.asarray(var, dtype=np.float64) + eps)
    scale = per_feature(gamma, features, 1.0) * invstd
    shift = per_feature(beta, features, 0.0) - np.asarray(mean, dtype=np.float64) * scale
    y3 = POOL.empty(x3.shape, x3.dtype) if out3 is None else out3
    if x3.shape[2] == 1:
        _launch(k.scale_shift_channels_last, _rows(x3), scale, shift, _rows(y3),
                threads=_threads(x3))
    else:
        _launch(k.scale_shift_planar, x3, scale, shift, k.planar_chunk(x3.shape[2]), y3,
                threads=_threads(x3))
    return y3, invstd


def backward(dy3, x3, gamma, mean, invstd, batch_stats, out3=None):
    outer, features, inner = x3.shape
    threads = _threads(x3)
    mean = np.asarray(mean, dtype=np.float64)
    invstd = np.asarray(invstd, dtype=np.float64)
    if inner == 1:
        sum_dy, sum_dy_xmu = _launch(k.backward_reduce_channels_last, _rows(dy3), _rows(x3),
                                     mean, threads=threads)
    else:
        sum_dy, sum_dy_xmu = _launch(k.backward_reduce_planar, dy3, x3, mean,
                                     k.planar_chunk(inner), threads=threads)
    k1, k2, k3 = backward_coefficients(per_feature(gamma, features, 1.0), mean, invstd,
                                       sum_dy, sum_dy_xmu, outer * inner, batch_stats)
    dx3 = POOL.empty(x3.shape, x3.dtype) if out3 is None else out3
    if inner == 1:
        _launch(k.backward_elementwise_channels_last, _rows(dy3), _rows(x3), k1, k2, k3,
                _rows(dx3), threads=threads)
    else:
        _launch(k.backward_elementwise_planar, dy3, x3, k1, k2, k3, k.planar_chunk(inner), dx3,
                threads=threads)
    return dx3, sum_dy_xmu * invstd, sum_dy
