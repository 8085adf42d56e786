"""The ``"cpu"`` backend: Numba ``@njit(parallel=True)`` kernels (see ``cpu_kernels``).

Implements the backend contract (``contract.Backend``). Forward-train streams the tensor three
times (statistics, then read + write of the fused pass); eval twice; backward five times (read
dy and x to reduce, read dy and x and write dx). Each call is one compiled call that also does
the per-feature math, so at training sizes a call costs little more than Numba's dispatch.
Outputs come from a pool of recycled buffers (``buffers.POOL``), so that a fresh output's page
faults do not add a pass.

float16 arrays go to the kernels viewed as their uint16 bits (Numba's CPU target has no
float16); the kernels widen each element exactly to float32 and compute it there (``half``,
``cpu_kernels``).

Threads: inputs under ``SERIAL_BELOW`` elements run on the calling thread. A process forked
from one that has run the threaded kernels runs them all serially (GNU OpenMP, Numba's usual
threading layer, aborts a forked child's first parallel region), with the parent's thread count
as the number of partials, so the child's results are bitwise the parent's.
"""

from __future__ import annotations

import os
import threading

import numba
import numpy as np

from . import host, stores
from . import cpu_kernels as k
from .buffers import POOL
from .contract import FORWARD_DONE

NAME = "cpu"

# Array handling is shared with the numpy backend.
unavailable_reason = host.unavailable_reason
asarray = host.asarray
canonical = host.canonical
output_view = host.output_view
astype = host.astype
to_output = host.to_output
to_host = host.to_host

# Below this many elements a kernel runs serially on the calling thread: the thread pool costs
# more than it saves there, and beside BLAS threads spinning after a matmul it costs
# milliseconds (see cpu_kernels.threaded_and_serial).
SERIAL_BELOW = 1 << 17

# Forward outputs of at least this many bytes (by itemsize) may be written with streaming
# stores, which skip reading each written line from memory first (``stores``; which ones:
# ``_streams``).
STREAMING_FROM_BYTES = stores.streaming_from_bytes()


def _streams(y3: np.ndarray) -> bool:
    """Whether the forward pass writes ``y3`` with streaming stores: float64 and float32
    outputs of at least their threshold, where they measured faster (``stores`` has the
    figures; float16 is unmeasured). The backward was level with them (0.92-1.13x), so it
    keeps ordinary stores."""
    threshold = STREAMING_FROM_BYTES.get(y3.itemsize)
    return threshold is not None and y3.nbytes >= threshold


# Numba's 'workqueue' threading layer aborts the process when two Python threads launch
# parallel kernels at once. The first launch runs under the lock and learns which layer Numba
# picked; only workqueue keeps serializing afterwards.
_launch_lock = threading.Lock()
_layer_is_threadsafe = False
_forked_child = False


def _after_fork_in_child() -> None:
    global _forked_child, _launch_lock
    _forked_child = True
    _launch_lock = threading.Lock()  # another thread may have held it at the fork


os.register_at_fork(after_in_child=_after_fork_in_child)


def _launch(kernel, size: int, *args, output: np.ndarray | None = None):
    """Run a kernel (or whole pass) on ``size`` elements, threaded or serially; its result.

    ``output``: the tensor a forward pass writes, with streaming stores where ``_streams``
    says. Inputs small enough to run serially are never streamed, and their calls omit the
    flag, which then compiles in as False.
    """
    global _layer_is_threadsafe
    if size < SERIAL_BELOW:
        # one thread: max_threads (and streaming) omitted, constants
        return k.SERIAL[kernel.__name__](*args)
    if output is not None:
        args = (*args, _streams(output))
    if _forked_child:
        return k.SERIAL[kernel.__name__](*args, numba.get_num_threads())
    if _layer_is_threadsafe:
        return kernel(*args, numba.get_num_threads())
    with _launch_lock:
        result = kernel(*args, numba.get_num_threads())
        _layer_is_threadsafe = numba.threading_layer() != "workqueue"
    return result


def _bits(a: np.ndarray | None) -> np.ndarray | None:
    """float16 as its uint16 bits for the kernels (which have no float16), else ``a``."""
    return a if a is None or a.itemsize != 2 else a.view(np.uint16)


def empty(shape3: tuple[int, int, int], dtype: np.dtype) -> np.ndarray:
    """A new uninitialized C-contiguous output (large ones recycled by ``buffers.POOL``)."""
    return POOL.empty(shape3, dtype)


def moments(x3: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature float64 ``(mean, var)`` of ``(outer, C, inner)`` ``x3``, one pass."""
    features = x3.shape[1]
    out = np.empty((2, features))
    if x3.shape[2] == 1:
        _launch(k.batch_moments_channels_last, x3.size, _bits(x3),
                k.channels_last_block_rows(features, x3.itemsize), out[0], out[1])
    else:
        _launch(k.batch_moments_planar, x3.size, _bits(x3), k.planar_chunk(x3.shape[2]),
                out[0], out[1])
    return out[0], out[1]


def nonfinite_features(mean: np.ndarray, var: np.ndarray) -> np.ndarray:
    """int64 indices of the features whose mean or var is NaN or infinite."""
    if k.nonfinite_count(mean, var) == 0:
        return np.empty(0, np.int64)
    return np.flatnonzero(~(np.isfinite(mean) & np.isfinite(var)))


def update_running_stats(running_mean: np.ndarray | None, running_var: np.ndarray | None,
                         mean: np.ndarray, var: np.ndarray, count: int, momentum: float) -> bool:
    """Running averages in place (unbiased variance); False, writing nothing, on overflow."""
    return k.update_running_stats(running_mean, running_var, mean, var, count, momentum)


def normalize(x3: np.ndarray, mean: np.ndarray, var: np.ndarray, gamma: np.ndarray | None,
              beta: np.ndarray | None, eps: float, out3: np.ndarray | None = None,
              residual3: np.ndarray | None = None, relu: bool = False
              ) -> tuple[np.ndarray, np.ndarray]:
    """``y = act(x * scale + shift [+ residual])``; returns ``(y3, invstd)`` (see contract)."""
    y3 = POOL.empty_like(x3) if out3 is None else out3
    invstd = np.empty(x3.shape[1])
    if x3.shape[2] == 1:
        _launch(k.scale_shift_channels_last, x3.size, _bits(x3), mean, var, gamma, beta, eps,
                _bits(residual3), relu, _bits(y3), invstd, output=y3)
    else:
        _launch(k.scale_shift_planar, x3.size, _bits(x3), mean, var, gamma, beta, eps,
                _bits(residual3), relu, k.planar_chunk(x3.shape[2]), _bits(y3), invstd,
                output=y3)
    return y3, invstd


def backward_reduce(dy3: np.ndarray, x3: np.ndarray, gamma: np.ndarray | None,
                    beta: np.ndarray | None, mean: np.ndarray, invstd: np.ndarray,
                    relu: bool = False, y3: np.ndarray | None = None
                    ) -> tuple[np.ndarray, np.ndarray]:
    """float64 ``(dgamma, dbeta)`` of this input (see contract)."""
    out = np.empty((2, x3.shape[1]))
    if x3.shape[2] == 1:
        _launch(k.backward_reduce_channels_last, x3.size, _bits(dy3), _bits(x3), gamma, beta,
                mean, invstd, relu, _bits(y3), out[0], out[1])
    else:
        _launch(k.backward_reduce_planar, x3.size, _bits(dy3), _bits(x3), gamma, beta, mean,
                invstd, relu, _bits(y3), k.planar_chunk(x3.shape[2]), out[0], out[1])
    return out[0], out[1]


def backward_elementwise(dy3: np.ndarray, x3: np.ndarray, gamma: np.ndarray | None,
                         beta: np.ndarray | None, mean: np.ndarray, invstd: np.ndarray,
                         dgamma: np.ndarray, dbeta: np.ndarray, count: int, batch_stats: bool,
                         out3: np.ndarray | None = None, relu: bool = False,
                         y3: np.ndarray | None = None, dresidual3: np.ndarray | None = None
                         ) -> np.ndarray:
    """``dx = g * dy_scale + x * x_scale + dx_shift`` (and ``dresidual = g``); returns dx3."""
    dx3 = POOL.empty_like(x3) if out3 is None else out3
    if x3.shape[2] == 1:
        _launch(k.backward_elementwise_channels_last, x3.size, _bits(dy3), _bits(x3), gamma,
                beta, mean, invstd, dgamma, dbeta, count, batch_stats, relu, _bits(y3),
                _bits(dx3), _bits(dresidual3))
    else:
        _launch(k.backward_elementwise_planar, x3.size, _bits(dy3), _bits(x3), gamma, beta,
                mean, invstd, dgamma, dbeta, count, batch_stats, relu, _bits(y3),
                k.planar_chunk(x3.shape[2]), _bits(dx3), _bits(dresidual3))
    return dx3


# ----------------------------------------------------------------------------- whole passes
def forward_train(x3: np.ndarray, gamma: np.ndarray | None, beta: np.ndarray | None, eps: float,
                  running_mean: np.ndarray | None, running_var: np.ndarray | None,
                  momentum: float, out3: np.ndarray | None = None,
                  residual3: np.ndarray | None = None, relu: bool = False
                  ) -> tuple[np.ndarray | None, np.ndarray, np.ndarray, np.ndarray | None, int]:
    """``(y3, mean, var, invstd, status)`` (see contract), in one compiled call."""
    y3 = POOL.empty_like(x3) if out3 is None else out3
    stats = np.empty((3, x3.shape[1]))
    if x3.shape[2] == 1:
        status = _launch(k.forward_train_channels_last, x3.size, _bits(x3), gamma, beta, eps,
                         running_mean, running_var, momentum, _bits(residual3), relu,
                         k.channels_last_block_rows(x3.shape[1], x3.itemsize), _bits(y3), stats,
                         output=y3)
    else:
        status = _launch(k.forward_train_planar, x3.size, _bits(x3), gamma, beta, eps,
                         running_mean, running_var, momentum, _bits(residual3), relu,
                         k.planar_chunk(x3.shape[2]), _bits(y3), stats, output=y3)
    if status != FORWARD_DONE:
        return None, stats[0], stats[1], None, status
    return y3, stats[0], stats[1], stats[2], status


def backward(dy3: np.ndarray, x3: np.ndarray, gamma: np.ndarray | None, beta: np.ndarray | None,
             mean: np.ndarray, invstd: np.ndarray, count: int, batch_stats: bool,
             out3: np.ndarray | None = None, relu: bool = False, y3: np.ndarray | None = None,
             dresidual3: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(dx3, dgamma, dbeta)`` (see contract), in one compiled call."""
    dx3 = POOL.empty_like(x3) if out3 is None else out3
    grads = np.empty((2, x3.shape[1]))
    if x3.shape[2] == 1:
        _launch(k.backward_channels_last, x3.size, _bits(dy3), _bits(x3), gamma, beta, mean,
                invstd, count, batch_stats, relu, _bits(y3), _bits(dx3), _bits(dresidual3),
                grads)
    else:
        _launch(k.backward_planar, x3.size, _bits(dy3), _bits(x3), gamma, beta, mean, invstd,
                count, batch_stats, relu, _bits(y3), k.planar_chunk(x3.shape[2]), _bits(dx3),
                _bits(dresidual3), grads)
    return dx3, grads[0], grads[1]
