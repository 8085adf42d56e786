"""The ``"cuda"`` backend: Numba CUDA kernels (see ``cuda_kernels``), the twin of ``cpu``.

Arrays
    Anything with ``__cuda_array_interface__`` (Numba device arrays, CuPy arrays, PyTorch CUDA
    tensors) is used in place through ``cuda.as_cuda_array``, and results come back as Numba
    device arrays (wrap them with ``cupy.asarray`` / ``torch.as_tensor``; neither copies).
    NumPy input is the slow convenience path: copied to the device, and results copied back.
    Per-feature arrays (gamma, beta, running statistics, mean, invstd) may be on either side;
    host running statistics are updated on the device and copied back in place.

Passes
    Forward-train: statistics (read x), two small per-feature kernels, the fused
    ``y = x*scale + shift`` (read x, write y). Eval: one per-feature kernel and the fused pass.
    Backward: reduction (read dy, x), a per-feature kernel, the fused elementwise pass.
    Nothing synchronizes with the host except ``nonfinite_features``, which copies the
    C-sized statistics back (the training forward checks them), and host<->device copies.

Launch configuration
    ``THREADS_PER_BLOCK``, ``MAX_BLOCKS``, ``MIN_ELEMENTS_PER_THREAD`` and ``MAX_GRID_Y`` are
    read at every launch, so tests can shrink them to force multi-block grids on tiny inputs.

See docs/cuda.md for the design and what has not been verified on a GPU.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .._checks import check_float_dtype, host_float_array
from .host import nonfinite_features as _host_nonfinite_features

try:
    from numba import cuda

    from . import cuda_kernels as k
except ImportError as exc:  # numba-cuda missing or broken: unavailable_reason says so
    cuda = None
    _IMPORT_ERROR = exc
else:
    _IMPORT_ERROR = None


def _simulated() -> bool:
    try:  # numba-cuda >= 0.2x keeps its own copy of the config
        from numba.cuda.core import config
    except ImportError:
        from numba.core import config
    return bool(config.ENABLE_CUDASIM)


_SIMULATED = cuda is not None and _simulated()

NAME = "cuda"

# On a GPU, 256 threads and up to 2048 blocks: about two waves on an H100 (132 SMs x 8
# resident blocks of 256). The simulator starts a Python thread per CUDA thread per block, so it
# gets small grids with more work per thread (tests shrink them further to force many blocks).
THREADS_PER_BLOCK = 16 if _SIMULATED else 256
MAX_BLOCKS = 4 if _SIMULATED else 2048
#: A reduction adds blocks per feature only while each thread keeps this many elements.
MIN_ELEMENTS_PER_THREAD = 32
WARP = 32
MAX_GRID_X = 2**31 - 1  # CUDA's limits on gridDim.x and gridDim.y
MAX_GRID_Y = 65535


# ----------------------------------------------------------------------------- availability
def unavailable_reason() -> str | None:
    """None where CUDA kernels can run here, else what is missing."""
    if cuda is None:
        return (f"numba-cuda is not installed or failed to import ({_IMPORT_ERROR}); "
                "install it with: pip install 'fastbn[cuda]'")
    if cuda.is_available():
        return None
    driver_error = cuda.cuda_error()
    if driver_error is not None:
        first_line = next((line for line in str(driver_error).splitlines() if line.strip()),
                          type(driver_error).__name__)
        return f"no usable NVIDIA driver or GPU ({first_line.strip()})"
    from numba.cuda.cudadrv import nvvm
    if not nvvm.is_available():
        return ("the CUDA toolkit's NVVM library was not found; "
                "install it with: pip install 'numba-cuda[cu12]'")
    return "no CUDA GPU was found"


# ----------------------------------------------------------------------------- arrays
def _is_device(x: Any) -> bool:
    # Numba's simulated device arrays have no __cuda_array_interface__, only __cuda_ndarray__.
    return hasattr(x, "__cuda_array_interface__") or bool(getattr(x, "__cuda_ndarray__", False))


def _device_view(x: Any) -> Any:
    """A Numba device array sharing ``x``'s memory."""
    if getattr(x, "__cuda_ndarray__", False):
        return x
    if not hasattr(cuda, "as_cuda_array"):
        raise TypeError(f"the CUDA simulator cannot use a {type(x).__name__}; "
                        "pass an array made with numba.cuda.to_device")
    return cuda.as_cuda_array(x)


def is_native(x: Any) -> bool:
    """Whether ``x`` is a GPU array (used in place, results stay on the device)."""
    return _is_device(x)


def asarray(x: Any, name: str) -> Any:
    """A Numba device array: a view of a GPU array, a copy of anything else."""
    if _is_device(x):
        array = _device_view(x)
        check_float_dtype(array.dtype, name)
        return array
    host = host_float_array(x, name)
    return cuda.to_device(np.ascontiguousarray(host))


def _require_contiguous(x: Any) -> None:
    if not x.is_c_contiguous():
        raise ValueError(
            f"the cuda backend needs C-contiguous device arrays; got shape {tuple(x.shape)} with "
            f"strides {tuple(x.strides)}. Pass a contiguous copy (cupy.ascontiguousarray(x), "
            "tensor.contiguous()); for a channels_last PyTorch tensor, pass "
            "tensor.permute(0, 2, 3, 1) with axis=-1 instead, which is contiguous")


def canonical(x: Any, shape3: tuple[int, int, int]) -> Any:
    """The ``(outer, C, inner)`` view of a C-contiguous device array (others raise)."""
    _require_contiguous(x)
    return x.reshape(shape3)


def output_view(out: Any, shape3: tuple[int, int, int], name: str) -> Any:
    """The canonical view of a caller's output array: a device array is written directly,
    a NumPy array receives a copy of the device result."""
    if _is_device(out):
        out = _device_view(out)
        _require_contiguous(out)
        return out.reshape(shape3)
    if not isinstance(out, np.ndarray):
        raise TypeError(f"{name} must be a NumPy or device array, got {type(out).__name__}")
    if not (out.flags.c_contiguous and out.flags.writeable):
        raise ValueError(f"{name} must be a writeable C-contiguous array")
    return out.reshape(shape3)


def _result_buffer(x3: Any, out3: Any) -> Any:
    """Where kernels write: the caller's device output, else a new device array."""
    if out3 is not None and _is_device(out3):
        return out3
    return cuda.device_array(x3.shape, x3.dtype)


def _deliver(result3: Any, out3: Any) -> Any:
    """The result as the caller asked for it: copied into a NumPy ``out3`` when given."""
    if out3 is None or _is_device(out3):
        return result3
    result3.copy_to_host(out3)
    return out3


def astype(a: Any, dtype: Any) -> Any:
    """``a`` in ``dtype`` (``a`` itself when it already is)."""
    dtype = np.dtype(dtype)
    if a.dtype == dtype:
        return a
    _require_contiguous(a)
    out = cuda.device_array(a.shape, dtype)
    if a.size:
        flat_in = a.reshape(a.size)
        _launch(k.cast_copy, _blocks(a.size), THREADS_PER_BLOCK, flat_in, out.reshape(a.size))
    return out


def to_output(y: Any, like: Any) -> Any:
    """``y`` on the device for a GPU ``like``, else copied to a NumPy array."""
    if _is_device(like) or not _is_device(y):
        return y
    return y.copy_to_host()


def to_host(a: Any) -> np.ndarray:
    """A NumPy copy of ``a``."""
    if _is_device(a):
        return _device_view(a).copy_to_host()
    return np.array(a, copy=True)


def _per_feature(value: Any) -> Any:
    """A C-sized parameter on the device; a zero-length array stands for None (the kernels
    then use 1 for gamma and 0 for beta, or skip the update)."""
    if value is None:
        return cuda.device_array(0, np.float64)
    if _is_device(value):
        return _device_view(value)
    return cuda.to_device(np.ascontiguousarray(value))


# ----------------------------------------------------------------------------- launches
def _launch(kernel, grid, block, *args, shared_doubles: int = 0) -> None:
    kernel[grid, block, 0, shared_doubles * 8](*args)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _blocks(items: int) -> int:
    return max(1, min(MAX_BLOCKS, _ceil_div(items, THREADS_PER_BLOCK)))


def _reduction_blocks(elements: int, threads: int, parallel_groups: int,
                      grid_limit: int) -> int:
    """Blocks sharing one feature (or one column group): enough to keep every thread at
    ``MIN_ELEMENTS_PER_THREAD``, within ``MAX_BLOCKS`` over all groups and the grid
    dimension's limit."""
    wanted = _ceil_div(elements, threads * MIN_ELEMENTS_PER_THREAD)
    return max(1, min(wanted, MAX_BLOCKS // max(1, parallel_groups), grid_limit))


def _channels_last_block(features: int) -> tuple[int, int]:
    """(threads along C, threads along rows): a warp covers consecutive features of a row."""
    threads = THREADS_PER_BLOCK
    columns = min(threads, WARP, _pow2_at_least(features))
    return columns, max(1, threads // columns)


def _planar_block(inner: int) -> tuple[int, int]:
    """(threads along a row's inner run, threads along rows), so short runs keep lanes busy."""
    threads = THREADS_PER_BLOCK
    along = min(threads, _pow2_at_least(inner))
    return along, max(1, threads // along)


def _elementwise_grid(extent_x: int, block_x: int, extent_y: int, block_y: int):
    grid_x = max(1, min(MAX_BLOCKS, _ceil_div(extent_x, block_x)))
    grid_y = max(1, min(MAX_GRID_Y, MAX_BLOCKS // grid_x, _ceil_div(extent_y, block_y)))
    return grid_x, grid_y


def _rows(a3):
    return a3.reshape(a3.shape[0], a3.shape[1])


def _finalize_threads(blocks_per_feature: int) -> int:
    return max(1, min(THREADS_PER_BLOCK, blocks_per_feature))


# ----------------------------------------------------------------------------- backend API
def moments(x3: Any) -> tuple[Any, Any]:
    """Per-feature mean and biased variance of the canonical view, float64 device arrays."""
    outer, features, inner = x3.shape
    if inner == 1:
        columns, ranks = _channels_last_block(features)
        grid_x = min(_ceil_div(features, columns), MAX_BLOCKS)
        blocks = _reduction_blocks(outer, ranks, grid_x, MAX_GRID_Y)
        parts = [cuda.device_array((features, blocks), np.float64) for _ in range(3)]
        _launch(k.batch_moments_channels_last, (grid_x, blocks), (columns, ranks), _rows(x3),
                *parts, shared_doubles=3 * columns * ranks)
    else:
        threads = THREADS_PER_BLOCK
        grid_y = min(features, MAX_GRID_Y, MAX_BLOCKS)
        blocks = _reduction_blocks(outer * inner, threads, grid_y, MAX_GRID_X)
        parts = [cuda.device_array((features, blocks), np.float64) for _ in range(3)]
        _launch(k.batch_moments_planar, (blocks, grid_y), threads, x3, *parts,
                shared_doubles=3 * threads)
    mean = cuda.device_array(features, np.float64)
    var = cuda.device_array(features, np.float64)
    finalize = _finalize_threads(blocks)
    _launch(k.finalize_moments, min(features, MAX_BLOCKS), finalize, *parts, mean, var,
            shared_doubles=3 * finalize)
    return mean, var


def _scale_shift(x3, scale, shift, y3):
    outer, features, inner = x3.shape
    if inner == 1:
        columns, ranks = _channels_last_block(features)
        grid = _elementwise_grid(features, columns, outer, ranks)
        _launch(k.scale_shift_channels_last, grid, (columns, ranks), _rows(x3), scale, shift,
                _rows(y3))
    else:
        along, rows = _planar_block(inner)
        grid = _elementwise_grid(inner, along, outer * features, rows)
        _launch(k.scale_shift_planar, grid, (along, rows), x3, scale, shift, y3)


def normalize(x3, mean, var, gamma, beta, eps, out3=None):
    """``y = x*scale + shift`` with float64 per-feature coefficients computed on the device.

    Returns
    -------
    y3 : device array like x3; ``out3`` when given (it may be x3: each element is read
        before it is written, by the same thread)
    invstd : float64 device array of shape (C,)
    """
    features = x3.shape[1]
    invstd, scale, shift = (cuda.device_array(features, np.float64) for _ in range(3))
    _launch(k.normalize_coefficients, _blocks(features), THREADS_PER_BLOCK,
            _per_feature(mean), _per_feature(var), _per_feature(gamma), _per_feature(beta),
            float(eps), invstd, scale, shift)
    y3 = _result_buffer(x3, out3)
    _scale_shift(x3, scale, shift, y3)
    return _deliver(y3, out3), invstd


def update_running_stats(running_mean, running_var, mean, var, count, momentum) -> None:
    """Exponentially weighted update in place (on the device; host arrays are copied back)."""
    if running_mean is None and running_var is None:
        return
    device_mean, device_var = _per_feature(running_mean), _per_feature(running_var)
    features = mean.shape[0]
    _launch(k.update_running_stats, _blocks(features), THREADS_PER_BLOCK, device_mean,
            device_var, _per_feature(mean), _per_feature(var), count / (count - 1),
            float(momentum))
    for host, device in ((running_mean, device_mean), (running_var, device_var)):
        if host is not None and not _is_device(host):
            host[...] = device.copy_to_host()


def backward(dy3, x3, gamma, mean, invstd, batch_stats, out3=None):
    """One reduction pass and one fused elementwise pass.

    Returns
    -------
    dx3 : device array like x3; ``out3`` when given (it may be dy3 or x3)
    dgamma, dbeta : float64 device arrays of shape (C,)
    """
    outer, features, inner = x3.shape
    mean = _per_feature(mean)
    if inner == 1:
        columns, ranks = _channels_last_block(features)
        grid_x = min(_ceil_div(features, columns), MAX_BLOCKS)
        blocks = _reduction_blocks(outer, ranks, grid_x, MAX_GRID_Y)
        parts = [cuda.device_array((features, blocks), np.float64) for _ in range(2)]
        _launch(k.backward_reduce_channels_last, (grid_x, blocks), (columns, ranks),
                _rows(dy3), _rows(x3), mean, *parts, shared_doubles=2 * columns * ranks)
    else:
        threads = THREADS_PER_BLOCK
        grid_y = min(features, MAX_GRID_Y, MAX_BLOCKS)
        blocks = _reduction_blocks(outer * inner, threads, grid_y, MAX_GRID_X)
        parts = [cuda.device_array((features, blocks), np.float64) for _ in range(2)]
        _launch(k.backward_reduce_planar, (blocks, grid_y), threads, dy3, x3, mean, *parts,
                shared_doubles=2 * threads)
    k1, k2, k3, dgamma, dbeta = (cuda.device_array(features, np.float64) for _ in range(5))
    finalize = _finalize_threads(blocks)
    _launch(k.backward_coefficients, min(features, MAX_BLOCKS), finalize, *parts,
            _per_feature(gamma), mean, _per_feature(invstd), float(outer * inner),
            bool(batch_stats), k1, k2, k3, dgamma, dbeta, shared_doubles=2 * finalize)
    dx3 = _result_buffer(x3, out3)
    if inner == 1:
        grid = _elementwise_grid(features, columns, outer, ranks)
        _launch(k.backward_elementwise_channels_last, grid, (columns, ranks), _rows(dy3),
                _rows(x3), k1, k2, k3, _rows(dx3))
    else:
        along, rows = _planar_block(inner)
        grid = _elementwise_grid(inner, along, outer * features, rows)
        _launch(k.backward_elementwise_planar, grid, (along, rows), dy3, x3, k1, k2, k3, dx3)
    return _deliver(dx3, out3), dgamma, dbeta


def nonfinite_features(mean, var) -> np.ndarray:
    """Indices of features whose statistics are NaN or infinite (copies the C-sized
    statistics to the host: the backend's one synchronization)."""
    return _host_nonfinite_features(to_host(mean), to_host(var))
