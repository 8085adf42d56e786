"""The ``"cuda"`` backend: Numba CUDA kernels (see ``cuda_kernels``), the twin of ``cpu``.

Arrays
    Anything with ``__cuda_array_interface__`` (Numba device arrays, CuPy arrays, PyTorch CUDA
    tensors) is used in place, on its own GPU and stream, and results come back as the caller's
    array type (``to_output``): a torch tensor for torch input, a CuPy array for CuPy input, a
    Numba device array otherwise, each sharing the result's memory. For torch and CuPy inputs,
    outputs are allocated by the framework's caching allocator. A torch tensor that requires grad
    is used through a detached view (fastbn computes its own gradients). Non-contiguous device
    input is copied on the device with a :class:`NonContiguousCopyWarning`. NumPy input is the
    slow convenience path: copied to the device, results copied back.

Streams (see :func:`use_stream`)
    Kernels and copies run on the caller's stream: the one given to ``use_stream``, else the
    input's (``__cuda_array_interface__['stream']``, a Numba array's ``.stream``, or torch's
    current stream for a torch tensor). Importing never synchronizes a stream, since the work
    is queued behind the producer's on the same stream; outputs are bound to that stream.

Devices
    Every call runs on the GPU that holds its arrays; arrays of one call on different GPUs raise
    ValueError.

Synchronization: fastbn waits for the GPU only in ``nonfinite_features`` (the training forward's
NaN/Inf check copies the C-sized mean and variance to the host), in ``to_host``/``to_output``
for host callers, in copies of NumPy inputs, and in ``update_running_stats`` when a new running
value might overflow its dtype (the status is read back; see its docstring).

Passes and launches: forward-train 3 launches (statistics, running update, fused normalize;
+1 for the second reduction stage on inputs large enough to spread a feature over several
blocks), eval 1, backward 2 (+1). Scratch space (per-block partials, status words, pinned
staging buffers) is allocated once per device, stream and size, and reused.

Launch configuration: ``THREADS_PER_BLOCK``, ``MAX_BLOCKS``, ``MIN_ELEMENTS_PER_THREAD`` and
``MAX_GRID_Y`` are read at every launch, so tests can shrink them to force multi-block grids.

See docs/cuda.md for the design and what has (not) been verified on a GPU.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import threading
import warnings
from collections import OrderedDict
from typing import Any, Iterator

import numpy as np

from .._checks import host_input_array
from . import composed, feature_math, is_device_array
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


SIMULATED = cuda is not None and _simulated()

NAME = "cuda"

# On a GPU, 256 threads and up to 2048 blocks: 132 SMs x 2048 resident threads on an H100 hold
# about 1000 such blocks, so 2048 is two waves, and the (C, blocks) partials stay small. The
# simulator starts a Python thread per CUDA thread per block, so it gets small grids with more
# work per thread (tests shrink them further to force many blocks).
THREADS_PER_BLOCK = 16 if SIMULATED else 256
MAX_BLOCKS = 4 if SIMULATED else 2048
#: A reduction adds blocks per feature only while each thread keeps this many elements.
MIN_ELEMENTS_PER_THREAD = 32
WARP = 32
MAX_GRID_X = 2**31 - 1  # CUDA's limits on gridDim.x and gridDim.y
MAX_GRID_Y = 65535


class NonContiguousCopyWarning(UserWarning):
    """A non-contiguous device input was copied to a contiguous buffer before the kernels."""


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


# ----------------------------------------------------------------------------- streams
_local = threading.local()


def as_numba_stream(stream: Any) -> Any:
    """A Numba stream for ``stream``: a Numba stream, a ``torch.cuda.Stream``, a CuPy stream,
    anything with ``__cuda_stream__``, or a raw handle (0: the default stream)."""
    if stream is None or stream == 0:
        return 0
    if isinstance(stream, int):
        return cuda.external_stream(stream)
    if hasattr(stream, "cuda_stream"):  # torch.cuda.Stream
        return as_numba_stream(int(stream.cuda_stream))
    if hasattr(stream, "__cuda_stream__"):
        return as_numba_stream(int(stream.__cuda_stream__()[1]))
    if type(stream).__module__.startswith("cupy"):
        return as_numba_stream(int(stream.ptr))
    return stream  # a Numba stream (or the simulator's)


@contextlib.contextmanager
def use_stream(stream: Any) -> Iterator[Any]:
    """Run every fastbn CUDA call of this thread inside the block on ``stream``.

    Without it, each call runs on its input's stream (see the module docstring). Yields the
    Numba stream.

    Examples
    --------
    >>> s = torch.cuda.Stream()                     # doctest: +SKIP
    >>> with torch.cuda.stream(s), use_stream(s):   # doctest: +SKIP
    ...     y = fastbn.batch_norm(x, rm, rv, training=True)
    """
    previous = getattr(_local, "stream", None)
    _local.stream = as_numba_stream(stream)
    try:
        yield _local.stream
    finally:
        _local.stream = previous


def _stream_of(a: Any) -> Any:
    override = getattr(_local, "stream", None)
    if override is not None:
        return override
    return getattr(a, "stream", 0)


def _stream_key(stream: Any) -> int:
    if stream == 0:
        return 0
    try:
        return int(stream)
    except TypeError:  # the simulator's streams have no handle
        return id(stream)


def _bound(a: Any, stream: Any) -> Any:
    """``a`` with ``stream`` as its stream (Numba's reshape and the simulator drop it)."""
    return a if getattr(a, "stream", 0) is stream else a.bind(stream)


# ----------------------------------------------------------------------------- devices
def _device_id(a: Any) -> int | None:
    """The ordinal of the GPU holding a Numba device array (None in the simulator)."""
    gpu_data = getattr(a, "gpu_data", None)
    context = getattr(gpu_data, "context", None)
    return None if context is None else context.device.id


def _pointer_device(x: Any) -> int | None:
    """The ordinal of the GPU holding a ``__cuda_array_interface__`` object."""
    device = getattr(x, "device", None)
    for attribute in ("index", "id"):  # torch.device.index, cupy.cuda.Device.id
        ordinal = getattr(device, attribute, None)
        if isinstance(ordinal, int):
            return ordinal
    if SIMULATED:
        return None
    from numba.cuda.cudadrv import driver
    pointer = x.__cuda_array_interface__["data"][0]
    if not pointer:
        return None
    attribute = driver.binding.CUpointer_attribute.CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL
    return int(driver.driver.cuPointerGetAttribute(attribute, driver.binding.CUdeviceptr(pointer)))


def _on_device(ordinal: int | None):
    """A context manager that makes GPU ``ordinal`` current (nothing where it already is)."""
    if ordinal is None or SIMULATED or cuda.current_context().device.id == ordinal:
        return contextlib.nullcontext()
    return cuda.gpus[ordinal]


def _common_device(arrays: tuple) -> int | None:
    devices = {d for d in map(_device_id, arrays) if d is not None}
    if len(devices) > 1:
        raise ValueError(f"the arrays of one fastbn call must be on one GPU; got arrays on "
                         f"GPUs {sorted(devices)}")
    return devices.pop() if devices else None


@contextlib.contextmanager
def _call(*arrays: Any) -> Iterator[Any]:
    """Run a backend call on the GPU that holds ``arrays``; yields the call's stream (that of
    the first array, or the :func:`use_stream` override)."""
    with _on_device(_common_device(arrays)):
        yield _stream_of(arrays[0])


# ----------------------------------------------------------------------------- frameworks
def _framework(x: Any) -> str | None:
    """'torch' or 'cupy' for their arrays, and for Numba views of memory they own."""
    owner = getattr(getattr(x, "gpu_data", None), "owner", x)
    module = type(owner).__module__.split(".")[0]
    return module if module in ("torch", "cupy") else None


def _detached(x: Any) -> Any:
    """A torch tensor that requires grad, as a detached view (same memory); others as they are."""
    return x.detach() if getattr(x, "requires_grad", False) else x


def _torch_stream(x: Any) -> Any:
    import torch
    return as_numba_stream(int(torch.cuda.current_stream(x.device).cuda_stream))


def _torch_empty(shape, dtype, like):
    import torch
    return torch.empty(shape, dtype=getattr(torch, np.dtype(dtype).name),
                       device=getattr(like, "device", None) or f"cuda:{_device_id(like)}")


def _cupy_empty(shape, dtype, like):
    import cupy
    with cupy.cuda.Device(_device_id(like)):
        return cupy.empty(shape, dtype)


def _torch_output(y, like):
    import torch
    return torch.as_tensor(y, device=like.device)


def _cupy_output(y, like):
    import cupy
    return cupy.asarray(y)


#: How each framework allocates (caching allocators) and wraps results without a copy.
FRAMEWORK_EMPTY = {"torch": _torch_empty, "cupy": _cupy_empty}
FRAMEWORK_OUTPUT = {"torch": _torch_output, "cupy": _cupy_output}
FRAMEWORK_STREAM = {"torch": _torch_stream}


# ----------------------------------------------------------------------------- arrays
def _import(x: Any) -> Any:
    """A Numba device array sharing a GPU array's memory, on its device and stream."""
    if getattr(x, "__cuda_ndarray__", False):
        return x
    x = _detached(x)
    if not hasattr(cuda, "as_cuda_array"):
        raise TypeError(f"the CUDA simulator cannot use a {type(x).__name__}; "
                        "pass an array made with numba.cuda.to_device")
    with _on_device(_pointer_device(x)):
        array = cuda.as_cuda_array(x, sync=False)  # we queue behind the producer's stream
    framework_stream = FRAMEWORK_STREAM.get(_framework(x))
    return array.bind(framework_stream(x)) if framework_stream else array


def _host(x: Any, name: str) -> np.ndarray:
    """A host input as the host backends take it (same conversions, same errors)."""
    return host_input_array(_detached(x), name)


def asarray(x: Any, name: str) -> Any:
    """A Numba device array: a view of a GPU array, a copy of anything else (the dtype is
    checked by the pipeline)."""
    x = _detached(x)
    if is_device_array(x):
        return _import(x)
    host = _host(x, name)
    stream = _stream_of(None)
    return cuda.to_device(np.ascontiguousarray(host), stream=stream)


def _reshape(a: Any, shape: tuple) -> Any:
    return _bound(a.reshape(shape), getattr(a, "stream", 0))


def _strided_view(x: Any, shape3: tuple[int, int, int]) -> Any:
    """A 3-D view of a non-contiguous array with the canonical shape, or None where its
    strides do not merge into three axes."""
    shape, strides = tuple(x.shape), tuple(x.strides)
    merged_strides = []
    start = 0
    for extent in shape3:
        stop, size = start, 1
        while size < extent and stop < len(shape):
            size *= shape[stop]
            stop += 1
        while stop < len(shape) and shape[stop] == 1 and size == extent and extent > 1 \
                and start == stop:
            stop += 1
        if size != extent:
            return None
        axes = [d for d in range(start, stop) if shape[d] != 1]
        for a, b in zip(axes, axes[1:]):
            if strides[a] != strides[b] * shape[b]:
                return None
        merged_strides.append(strides[axes[-1]] if axes else x.dtype.itemsize)
        start = stop
    if SIMULATED:
        view = np.lib.stride_tricks.as_strided(x._ary, shape3, merged_strides)
        return type(x)(view, stream=getattr(x, "stream", 0))
    from numba.cuda.cudadrv.devicearray import DeviceNDArray
    return DeviceNDArray(shape3, tuple(merged_strides), x.dtype, stream=x.stream,
                         gpu_data=x.gpu_data)


def canonical(x: Any, shape3: tuple[int, int, int]) -> Any:
    """The C-contiguous ``(outer, C, inner)`` view of a device array; a non-contiguous one is
    copied on the device, with a :class:`NonContiguousCopyWarning`. A host array is copied to
    the device first."""
    if not is_device_array(x):
        x = asarray(x, "x")
    if x.is_c_contiguous():
        return _reshape(x, shape3)
    view = _strided_view(x, shape3)
    if view is None:
        raise ValueError(
            f"the cuda backend cannot view a device array of shape {tuple(x.shape)} and strides "
            f"{tuple(x.strides)} as (outer, C, inner) = {shape3}; pass a contiguous copy "
            "(cupy.ascontiguousarray(x), tensor.contiguous())")
    warnings.warn(
        f"a non-contiguous device array (shape {tuple(x.shape)}, strides {tuple(x.strides)}) "
        "was copied to a contiguous buffer (one extra read and write); pass a contiguous array "
        "(for a channels_last torch tensor: tensor.permute(0, 2, 3, 1) with axis=-1)",
        NonContiguousCopyWarning, stacklevel=3)
    with _call(x) as stream:
        copy = _allocate(shape3, x.dtype, stream, like=x)
        _launch(k.contiguous_copy, _blocks(view.size), THREADS_PER_BLOCK, stream, view, copy)
    return copy


def output_view(out: Any, shape3: tuple[int, int, int], name: str) -> Any:
    """The canonical view of a caller's output array: a device array is written directly,
    a NumPy array receives a copy of the device result."""
    out = _detached(out)
    if is_device_array(out):
        out = _import(out)
        if not out.is_c_contiguous():
            raise ValueError(f"{name} must be a C-contiguous device array; got strides "
                             f"{tuple(out.strides)}")
        return _reshape(out, shape3)
    if not isinstance(out, np.ndarray):
        raise TypeError(f"{name} must be a NumPy or device array, got {type(out).__name__}")
    if not (out.flags.c_contiguous and out.flags.writeable):
        raise ValueError(f"{name} must be a writeable C-contiguous array")
    return out.reshape(shape3)


def empty(shape3: tuple[int, int, int], dtype: Any) -> Any:
    """A new uninitialized device array on the :func:`use_stream` stream (else the default)."""
    return _allocate(shape3, dtype, _stream_of(None), like=None)


def astype(a: Any, dtype: Any) -> Any:
    """``a`` (any shape) converted to ``dtype`` on the device, rounded once: ``a`` itself
    where it already has ``dtype``. Host arrays are copied to the device first."""
    a = _import(_detached(a)) if is_device_array(a) else asarray(a, "array")
    dtype = np.dtype(dtype)
    if a.dtype == dtype:
        return a
    flat = (1, 1, a.size)
    source = _reshape(a, flat) if a.is_c_contiguous() else _strided_view(a, flat)
    if source is None:
        raise ValueError(f"the cuda backend cannot convert a device array of shape "
                         f"{tuple(a.shape)} and strides {tuple(a.strides)}; pass a contiguous "
                         "copy")
    with _call(a) as stream:
        out = _allocate(tuple(a.shape), dtype, stream, like=a)
        if a.size:
            _launch(k.contiguous_copy, _blocks(a.size), THREADS_PER_BLOCK, stream, source,
                    _reshape(out, flat))
    return out


def _allocate(shape, dtype, stream, like) -> Any:
    """A new device array on ``stream``, from ``like``'s framework's caching allocator where
    ``like`` is memory of torch or CuPy (Numba's allocator otherwise)."""
    framework_empty = FRAMEWORK_EMPTY.get(_framework(like)) if like is not None else None
    if framework_empty is None:
        return cuda.device_array(shape, dtype, stream=stream)
    return cuda.as_cuda_array(framework_empty(shape, dtype, like), sync=False).bind(stream)


def to_output(y: Any, like: Any) -> Any:
    """``y`` as the caller's array type: torch/CuPy for torch/CuPy ``like`` (sharing memory),
    a Numba device array for a Numba ``like``, a NumPy copy for host callers (synchronizes)."""
    like = _detached(like)
    if not is_device_array(y):
        return y
    if not is_device_array(like):
        return y.copy_to_host(stream=getattr(y, "stream", 0))
    wrap = FRAMEWORK_OUTPUT.get(_framework(like))
    return wrap(y, like) if wrap else _bound(y, _stream_of(like))


def to_host(a: Any) -> np.ndarray:
    """A NumPy copy of ``a`` (waits for ``a``'s stream)."""
    a = _detached(a)
    if is_device_array(a):
        a = _import(a)
        return a.copy_to_host(stream=getattr(a, "stream", 0))
    return np.array(np.asarray(_detached(a)), copy=True)


# ----------------------------------------------------------------------------- scratch space
_WORKSPACES: OrderedDict = OrderedDict()
_WORKSPACE_SLOTS = 64  # distinct (device, stream, shape) scratch arrays kept alive


def _workspace(kind: str, shape: tuple, dtype: Any, stream: Any, pinned: bool = False) -> Any:
    """A reusable scratch array for this device and stream. Work on one stream is ordered, so
    the next call's kernels cannot overwrite it before this call's have read it."""
    device = None if SIMULATED else cuda.current_context().device.id
    key = (kind, device, _stream_key(stream), shape, np.dtype(dtype).str)
    array = _WORKSPACES.get(key)
    if array is None:
        if pinned:
            array = cuda.pinned_array(shape, dtype)
        else:
            array = cuda.device_array(shape, dtype, stream=stream)
        _WORKSPACES[key] = array
        while len(_WORKSPACES) > _WORKSPACE_SLOTS:
            _WORKSPACES.popitem(last=False)
    else:
        _WORKSPACES.move_to_end(key)
    return array


def _absent(ndim: int, dtype: Any, stream: Any) -> Any:
    """The zero-length array the kernels read as None (no gamma, residual, y, ...)."""
    return _workspace("absent", (0,) * ndim, dtype, stream)


def _vector(v: Any, stream: Any) -> Any:
    """A per-feature argument on the device (host vectors are copied on ``stream``)."""
    if v is None:
        return _absent(1, np.float64, stream)
    v = _detached(v)
    if is_device_array(v):
        return _import(v)
    return cuda.to_device(np.ascontiguousarray(v), stream=stream)


def _result_buffer(like3: Any, out3: Any, stream: Any) -> Any:
    """Where kernels write: the caller's device output, else a new device array."""
    if out3 is not None and is_device_array(out3):
        return out3
    return _allocate(like3.shape, like3.dtype, stream, like=like3)


def _deliver(result3: Any, out3: Any, stream: Any) -> Any:
    """The result as the caller asked for it: copied into a NumPy ``out3`` when given."""
    if out3 is None or is_device_array(out3):
        return result3
    result3.copy_to_host(out3, stream=stream)
    return out3


def _input(a3: Any, ndim: int, dtype: Any, stream: Any) -> Any:
    """An optional elementwise input (residual, y) as a kernel argument."""
    if a3 is None:
        return _absent(ndim, dtype, stream)
    return _rows(a3) if ndim == 2 else a3


def overflow_limit(dtype: Any) -> float:
    """The smallest float64 magnitude that rounds to infinity in ``dtype``."""
    info = np.finfo(dtype)
    if np.dtype(dtype) == np.float64:
        return float("inf")
    return 2.0 ** info.maxexp * (1.0 - 2.0 ** -(info.nmant + 2))


# ----------------------------------------------------------------------------- launches
def _launch(kernel, grid, block, stream, *args, shared_doubles: int = 0) -> None:
    """Every kernel launch of the backend: on ``stream``, ``shared_doubles`` float64 of
    dynamic shared memory."""
    kernel[grid, block, stream, shared_doubles * 8](*args)


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


def _rows(a3):
    return _reshape(a3, (a3.shape[0], a3.shape[1]))


def _reduction_grid(x3) -> tuple[tuple, Any, int, int]:
    """(grid, block, blocks per feature, threads per block) of a stage-1 reduction."""
    outer, features, inner = x3.shape
    if inner == 1:
        columns, ranks = _channels_last_block(features)
        grid_x = min(_ceil_div(features, columns), MAX_BLOCKS)
        blocks = _reduction_blocks(outer, ranks, grid_x, MAX_GRID_Y)
        return (grid_x, blocks), (columns, ranks), blocks, columns * ranks
    threads = THREADS_PER_BLOCK
    grid_y = min(features, MAX_GRID_Y, MAX_BLOCKS)
    blocks = _reduction_blocks(outer * inner, threads, grid_y, MAX_GRID_X)
    return (blocks, grid_y), threads, blocks, threads


def _elementwise_grid(x3) -> tuple[tuple, tuple]:
    """(grid, block) of an elementwise pass: planar blocks own one feature (``blockIdx.y``)."""
    outer, features, inner = x3.shape
    if inner == 1:
        columns, ranks = _channels_last_block(features)
        grid_x = max(1, min(MAX_BLOCKS, _ceil_div(features, columns)))
        grid_y = max(1, min(MAX_GRID_Y, MAX_BLOCKS // grid_x, _ceil_div(outer, ranks)))
        return (grid_x, grid_y), (columns, ranks)
    along, rows = _planar_block(inner)
    grid_y = min(features, MAX_GRID_Y, MAX_BLOCKS)
    grid_x = max(1, min(MAX_BLOCKS // grid_y, _ceil_div(outer, rows)))
    return (grid_x, grid_y), (along, rows)


def _merge_threads(blocks: int) -> int:
    return max(1, min(THREADS_PER_BLOCK, blocks))


def _layout(x3):
    """(view for the kernels, suffix of the kernel names)."""
    return (_rows(x3), "channels_last") if x3.shape[2] == 1 else (x3, "planar")


# ----------------------------------------------------------------------------- statistics
def moments(x3: Any) -> tuple[Any, Any]:
    """Per-feature mean and biased variance of the canonical view: float64 device vectors
    (views of one ``(2, C)`` array). Two launches where a feature spans several blocks."""
    features = x3.shape[1]
    with _call(x3) as stream:
        grid, block, blocks, threads = _reduction_grid(x3)
        stats = _allocate((2, features), np.float64, stream, like=x3)
        partials = _workspace("moments", (3, features, blocks), np.float64, stream)
        view, layout = _layout(x3)
        _launch(getattr(k, "batch_moments_" + layout), grid, block, stream, view, partials,
                stats, shared_doubles=3 * threads)
        if blocks > 1:
            merge = _merge_threads(blocks)
            _launch(k.merge_block_partials, min(features, MAX_BLOCKS), merge, stream, partials,
                    blocks, stats, shared_doubles=3 * merge)
    return stats[0], stats[1]


# The host copies of the statistics last checked by nonfinite_features, so that
# update_running_stats can tell without a second synchronization that no value can overflow.
_checked = threading.local()


def nonfinite_features(mean: Any, var: Any) -> np.ndarray:
    """Host int64 indices of the features whose mean or var is NaN or infinite. Copies the
    C-sized statistics to the host: the training forward's one synchronization."""
    if not is_device_array(mean):
        host_mean, host_var = np.asarray(mean), np.asarray(var)
    else:
        with _call(mean, var) as stream:
            features = mean.shape[0]
            staging = _workspace("nonfinite", (2, features), np.float64, stream, pinned=True)
            _import(mean).copy_to_host(staging[0], stream=stream)
            _import(var).copy_to_host(staging[1], stream=stream)
            (cuda.default_stream() if stream == 0 else stream).synchronize()
            host_mean, host_var = staging[0].copy(), staging[1].copy()
    _checked.value = (mean, var, host_mean, host_var)
    return _host_nonfinite_features(host_mean, host_var)


def _fits(batch: np.ndarray, running: Any) -> bool:
    """Whether running averages of ``batch`` with a finite running value surely stay finite
    in the running array's dtype (a convex combination of values below its maximum)."""
    with np.errstate(over="ignore", invalid="ignore"):
        return running is None or bool(np.all(np.abs(batch) <= np.finfo(running.dtype).max))


def update_running_stats(running_mean: Any, running_var: Any, mean: Any, var: Any,
                         count: int, momentum: float) -> bool:
    """``running = (1 - momentum) * running + momentum * batch`` in place (unbiased variance),
    all or nothing; False, writing nothing, where a new value would not be finite in the
    running array's dtype.

    Device running statistics are updated by one single-block kernel that checks every new
    value before it writes any. The answer is read back from the device (a synchronization)
    only when the host copies of the statistics from the preceding ``nonfinite_features`` do
    not already prove that nothing can overflow, which assumes the running statistics are
    finite on entry (this function never makes them otherwise). Host running statistics are
    updated on the host.
    """
    if running_mean is None and running_var is None:
        return True
    device_arrays = [a for a in (running_mean, running_var) if a is not None]
    on_device = [is_device_array(a) for a in device_arrays]
    if not any(on_device):
        return _update_on_host(running_mean, running_var, to_host(mean), to_host(var), count,
                               momentum)
    if not all(on_device):
        raise TypeError("running_mean and running_var must both be device arrays or both "
                        "host arrays on the cuda backend")
    with _call(*device_arrays) as stream:
        status = _workspace("status", (1,), np.int32, stream)
        _launch(k.update_running_stats, 1, THREADS_PER_BLOCK, stream,
                _vector(running_mean, stream), _vector(running_var, stream),
                _vector(mean, stream), _vector(var, stream), float(count), float(momentum),
                overflow_limit(running_mean.dtype if running_mean is not None else np.float64),
                overflow_limit(running_var.dtype if running_var is not None else np.float64),
                status)
        checked = getattr(_checked, "value", None)
        if checked is not None and checked[0] is mean and checked[1] is var:
            host_mean, host_var = checked[2], checked[3]
        elif not is_device_array(mean):
            host_mean, host_var = np.asarray(mean), np.asarray(var)
        else:
            host_mean = None
        if host_mean is not None and _fits(host_mean, running_mean) and _fits(
                feature_math.unbiased_variance(np.asarray(host_var, np.float64), count),
                running_var):
            return True
        return bool(status.copy_to_host(stream=stream)[0])


def _update_on_host(running_mean, running_var, mean, var, count, momentum) -> bool:
    updates = []
    for running, batch in ((running_mean, mean),
                           (running_var, feature_math.unbiased_variance(var, count))):
        if running is not None:
            with np.errstate(over="ignore", invalid="ignore"):
                new = feature_math.running_average(running.astype(np.float64), batch, momentum)
            if not np.all(np.abs(new) < overflow_limit(running.dtype)):
                return False
            updates.append((running, new))
    for running, new in updates:
        running[...] = new
    return True


# ----------------------------------------------------------------------------- forward
def normalize(x3: Any, mean: Any, var: Any, gamma: Any, beta: Any, eps: float,
              out3: Any = None, residual3: Any = None, relu: bool = False) -> tuple[Any, Any]:
    """``y = act(x*scale + shift + residual)`` in one launch; the float64 coefficients are
    computed per block from the per-feature arrays (``feature_math``).

    Returns
    -------
    y3 : device array like x3; ``out3`` when given (it may be x3 or residual3: each element
        is read before it is written, by the same thread)
    invstd : float64 device array of shape (C,)
    """
    with _call(x3, *(a for a in (out3, residual3) if is_device_array(a))) as stream:
        view, layout = _layout(x3)
        y3 = _result_buffer(x3, out3, stream)
        invstd = _allocate((x3.shape[1],), np.float64, stream, like=x3)
        grid, block = _elementwise_grid(x3)
        _launch(getattr(k, "scale_shift_" + layout), grid, block, stream, view,
                _vector(mean, stream), _vector(var, stream), _vector(gamma, stream),
                _vector(beta, stream), float(eps),
                _input(_device_input(residual3, stream), view.ndim, x3.dtype, stream),
                bool(relu), _rows(y3) if view.ndim == 2 else y3, invstd)
        return _deliver(y3, out3, stream), invstd


def _device_input(a3: Any, stream: Any) -> Any:
    """An elementwise operand on the device (host residuals are copied)."""
    if a3 is None or is_device_array(a3):
        return a3
    return cuda.to_device(np.ascontiguousarray(a3), stream=stream)


# ----------------------------------------------------------------------------- backward
def backward_reduce(dy3: Any, x3: Any, gamma: Any, beta: Any, mean: Any, invstd: Any,
                    relu: bool = False, y3: Any = None) -> tuple[Any, Any]:
    """Float64 ``(dgamma, dbeta)`` device vectors (views of one ``(2, C)`` array): one launch,
    two where a feature spans several blocks. The ReLU mask is ``y3 > 0`` where ``y3`` is
    given, else recomputed from x."""
    features = x3.shape[1]
    with _call(x3, dy3) as stream:
        grid, block, blocks, threads = _reduction_grid(x3)
        view, layout = _layout(x3)
        ndim = view.ndim
        grads = _allocate((2, features), np.float64, stream, like=x3)
        partials = _workspace("backward", (2, features, blocks), np.float64, stream)
        invstd = _vector(invstd, stream)
        _launch(getattr(k, "backward_reduce_" + layout), grid, block, stream,
                _rows(dy3) if ndim == 2 else dy3, view,
                _input(_device_input(y3, stream), ndim, x3.dtype, stream),
                _vector(mean, stream), invstd, _vector(gamma, stream), _vector(beta, stream),
                bool(relu), feature_math.relu_floor(x3.dtype), partials, grads,
                shared_doubles=2 * threads)
        if blocks > 1:
            merge = _merge_threads(blocks)
            _launch(k.merge_gradient_partials, min(features, MAX_BLOCKS), merge, stream, partials,
                    blocks, invstd, grads, shared_doubles=2 * merge)
    return grads[0], grads[1]


def backward_elementwise(dy3: Any, x3: Any, gamma: Any, beta: Any, mean: Any, invstd: Any,
                         dgamma: Any, dbeta: Any, count: int, batch_stats: bool,
                         out3: Any = None, relu: bool = False, y3: Any = None,
                         dresidual3: Any = None) -> Any:
    """``dx = g*dy_scale + x*x_scale + dx_shift`` in one launch, and ``dresidual = g`` in the
    same pass where ``dresidual3`` is given. Returns dx's array (``out3`` when given; it may
    be dy3 or x3)."""
    device_outputs = [a for a in (out3, dresidual3) if is_device_array(a)]
    with _call(x3, dy3, *device_outputs) as stream:
        view, layout = _layout(x3)
        ndim = view.ndim
        dx3 = _result_buffer(x3, out3, stream)
        dres3 = None if dresidual3 is None else _result_buffer(x3, dresidual3, stream)
        grid, block = _elementwise_grid(x3)
        _launch(getattr(k, "backward_elementwise_" + layout), grid, block, stream,
                _rows(dy3) if ndim == 2 else dy3, view,
                _input(_device_input(y3, stream), ndim, x3.dtype, stream),
                _vector(mean, stream), _vector(invstd, stream), _vector(gamma, stream),
                _vector(beta, stream), _vector(dgamma, stream), _vector(dbeta, stream),
                float(count), bool(batch_stats), bool(relu), feature_math.relu_floor(x3.dtype),
                _rows(dx3) if ndim == 2 else dx3, _input(dres3, ndim, x3.dtype, stream))
        if dresidual3 is not None:
            _deliver(dres3, dresidual3, stream)
        return _deliver(dx3, out3, stream)


# Whole passes: the steps above, each already one launch (a fused call saves nothing here).
forward_train = functools.partial(composed.forward_train, sys.modules[__name__])
backward = functools.partial(composed.backward, sys.modules[__name__])
