"""Streaming (non-temporal) stores for Numba's CPU target, and when the cpu backend uses them.

An ordinary store to a line that is not in cache first reads the line from memory (read for
ownership), so a pass writing a tensor far larger than the last-level cache moves each written
byte twice. A non-temporal store (LLVM's ``!nontemporal``; MOVNT* on x86) writes whole lines
without reading them and without evicting what the cache holds. For an output that would have
stayed in cache it is slower: it goes to memory anyway, and its next reader fetches it back.

Two ways to write them, each where it measured faster:

* element by element (:func:`store_streaming`, :func:`store`): LLVM cannot prove a row 64-byte
  aligned, so it emits one MOVNTSD/MOVNTSS per element. 8 bytes per instruction win; 4 bytes
  per instruction lost to ordinary stores on float32 planar outputs (0.7-0.92x).
* by whole lines (:func:`stream_lines`): a run's elements are computed, two lines at a time, into
  a stack buffer (:func:`stack_stage`, vector code as the ordinary loop), and each aligned line
  is written by one vector non-temporal store (:func:`store_streaming_line`); the run's
  unaligned head and tail take ordinary stores. The cpu backend writes float32 planar outputs
  so (:func:`streams_by_lines`). A stage of 2 lines beat 1, 8 and 16 lines side by side,
  and 4 lines in a separate run (float32 and float64, 48 and 191 MiB).

Measured on the 2-core EPYC VM (AMD family 26, Zen 5, AVX-512; "Zen 3" and "Zen 4": the
same VM on other days, family 25), 2 threads, eval into a recycled output, side by side in one
process: speed-up over ordinary stores, one figure per run (the VM's speed varied about 2x
between runs; "rows": by lines, one channels-last row at a time; "flat": by lines along the
rows' one contiguous run, ``cpu_kernels.scale_shift_rows_by_lines``):

=========================  ========  =======================  =====================
shape (N, C, HW), dtype    output    by element               by lines
=========================  ========  =======================  =====================
(256, 64, 3136) float32    196 MiB   0.91x (Zen 3)            1.40x, 1.34x, 1.26x, 0.90x
(256, 64, 1568) float32    98 MiB                             1.14x
(128, 64, 1568) float32    49 MiB                             0.84x
(128, 64, 784) float32     24 MiB                             0.77x, 0.97x, 1.09x, 1.27x
(128, 64, 784) float64     49 MiB    1.51x, 1.38x, 1.30x      1.38x
(32, 256, 196) float64     12.3 MiB  1.27x (Zen 3)
(32768, 1024, 1) float64   256 MiB   1.36x, 1.21x;            rows: 0.89x;
                                     1.53x (Zen 4)            flat: 1.51x (Zen 4)
(32768, 1024, 1) float32   128 MiB   0.57x, 0.58x, 0.66x;     rows: 0.84x;
                                     1.15-1.27x (Zen 3);      flat: 1.11x, 1.23x (Zen 4)
                                     1.00x, 1.03x (Zen 4)
(802816, 64, 1) float32    196 MiB   0.61x; 0.94x, 1.01x      flat: 1.28x, 1.48x (Zen 4)
                                     (Zen 4)
(200704, 256, 1) float32   196 MiB   0.54x, 1.01x (Zen 4)     flat: 1.07x, 1.14x (Zen 4)
(131072, 128, 1) float32   64 MiB    0.85x, 1.04x (Zen 4)     flat: 0.99x, 1.25x (Zen 4)
(200704, 256, 1) float64   392 MiB   1.62x (Zen 4)            flat: 1.57x (Zen 4)
(6272, 1024, 1) float32    24.5 MiB  0.98x (Zen 3)
=========================  ========  =======================  =====================

So the cpu backend streams float64 outputs from half the last-level cache on (12.3 MiB won)
element by element, and float32 outputs from twice the last-level cache on by lines
(:data:`STREAMING_CACHE_MULTIPLES`): planar ones run by run, channels-last ones along the
rows' flat run (element stores lost for them on Zen 5 and tied on Zen 4, and row by row lost
to ordinary stores). The kernels take the choice as a run-time flag, and the ordinary-store
loop compiles to vector code as without the flag (checked in tests/test_stores.py).
"""

from __future__ import annotations

import functools
import os

from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic, overload
from numba.np import numpy_support
from numba.np.arrayobj import populate_array

# Outputs of at least this multiple of the last-level cache are streamed, by element size:
# float64 ones won from 12.3 MiB (0.4x the 32 MiB cache) on, float32 ones from 98 MiB and lost
# or tied up to 49 MiB (measured, table above); float16 is unmeasured, so never streamed.
STREAMING_CACHE_MULTIPLES = {8: 0.5, 4: 2.0}
# Where the cache size is unknown: as for a common 32 MiB last-level cache.
UNKNOWN_CACHE_BYTES = 32 << 20
# Streaming stores write whole cache lines, one vector store each; the elements are computed
# a stage of lines at a time into a stack buffer first (which stays in L1).
LINE_BYTES = 64
STAGE_BYTES = 2 * LINE_BYTES


def l3_cache_bytes() -> int | None:
    """Size of the largest CPU cache reported by Linux sysfs, or None where unknown."""
    sizes = []
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        entries = os.listdir(base)
    except OSError:
        return None
    for entry in entries:
        try:
            with open(os.path.join(base, entry, "size")) as f:
                text = f.read().strip()
        except OSError:
            continue
        units = {"K": 2**10, "M": 2**20, "G": 2**30}
        if text and text[-1] in units:
            sizes.append(int(text[:-1]) * units[text[-1]])
        elif text.isdigit():
            sizes.append(int(text))
    return max(sizes) if sizes else None


@functools.cache
def streaming_from_bytes() -> dict[int, int]:
    """Smallest output (in bytes) the cpu kernels write with streaming stores, by itemsize."""
    cache = l3_cache_bytes() or UNKNOWN_CACHE_BYTES
    return {itemsize: int(multiple * cache)
            for itemsize, multiple in STREAMING_CACHE_MULTIPLES.items()}


@intrinsic
def store_streaming(typingctx, array, index, value):
    """``array[index] = value`` as a non-temporal store (``index`` an integer, or a tuple of
    one integer per dimension, in bounds and non-negative; ``value`` of the array's dtype)."""
    if not isinstance(array, types.Array):
        return None
    if isinstance(index, types.Integer):
        if array.ndim != 1:
            return None
    elif not (isinstance(index, types.BaseTuple) and len(index) == array.ndim
              and all(isinstance(i, types.Integer) for i in index)):
        return None

    def codegen(context, builder, signature, args):
        array_type, index_type, value_type = signature.args
        data, at, item = args
        view = context.make_array(array_type)(context, builder, data)
        if isinstance(index_type, types.BaseTuple):
            indices = [context.cast(builder, i, t, types.intp) for i, t in
                       zip(cgutils.unpack_tuple(builder, at, array_type.ndim), index_type)]
        else:
            indices = [context.cast(builder, at, index_type, types.intp)]
        pointer = cgutils.get_item_pointer(context, builder, array_type, view, indices,
                                           wraparound=False, boundscheck=False)
        stored = builder.store(context.cast(builder, item, value_type, array_type.dtype),
                               pointer)
        stored.set_metadata("nontemporal",
                            builder.module.add_metadata([ir.Constant(ir.IntType(32), 1)]))
        return context.get_dummy_value()

    return types.void(array, index, value), codegen


@njit(inline="always", cache=True)
def store(array, index, value, streaming):
    """``array[index] = value``, as a streaming store when ``streaming``."""
    if streaming:
        store_streaming(array, index, value)
    else:
        array[index] = value


@intrinsic
def stack_stage(typingctx, like):
    """A 1-D buffer of ``STAGE_BYTES`` of ``like``'s dtype on the stack of the function it is
    inlined into (allocated once at its entry, uninitialized)."""
    if not isinstance(like, types.Array):
        return None
    dtype = like.dtype
    stage_type = types.Array(dtype, 1, "C")

    def codegen(context, builder, signature, args):
        element = context.get_data_type(dtype)
        itemsize = context.get_abi_sizeof(element)
        data = cgutils.alloca_once(builder, element, size=STAGE_BYTES // itemsize)
        stage = context.make_array(stage_type)(context, builder)
        intp = context.get_value_type(types.intp)
        populate_array(stage, data=data, shape=[ir.Constant(intp, STAGE_BYTES // itemsize)],
                       strides=[ir.Constant(intp, itemsize)],
                       itemsize=ir.Constant(intp, itemsize), meminfo=None)
        return stage._getvalue()

    return stage_type(like), codegen


@intrinsic
def store_streaming_line(typingctx, array, start, source, offset):
    """``array[start:start + lanes] = source[offset:offset + lanes]`` as one non-temporal vector
    store of a whole cache line (``lanes`` = ``LINE_BYTES // itemsize``; ``array[start]`` must
    lie on a line boundary, both runs in bounds and contiguous)."""
    if not (isinstance(array, types.Array) and array.ndim == 1 and array.layout == "C"
            and isinstance(source, types.Array) and source.ndim == 1 and source.layout == "C"
            and source.dtype == array.dtype
            and isinstance(start, types.Integer) and isinstance(offset, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        array_type, start_type, source_type, offset_type = signature.args
        data, at, values, values_at = args

        def pointer(array_type, array, index, index_type):
            view = context.make_array(array_type)(context, builder, array)
            return cgutils.get_item_pointer(context, builder, array_type, view,
                                            [context.cast(builder, index, index_type,
                                                          types.intp)],
                                            wraparound=False, boundscheck=False)

        element = context.get_data_type(array_type.dtype)
        itemsize = context.get_abi_sizeof(element)
        line = ir.VectorType(element, LINE_BYTES // itemsize)
        loaded = builder.load(builder.bitcast(pointer(source_type, values, values_at,
                                                      offset_type), line.as_pointer()),
                              align=itemsize)
        stored = builder.store(loaded, builder.bitcast(pointer(array_type, data, at, start_type),
                                                       line.as_pointer()), align=LINE_BYTES)
        stored.set_metadata("nontemporal",
                            builder.module.add_metadata([ir.Constant(ir.IntType(32), 1)]))
        return context.get_dummy_value()

    return types.void(array, start, source, offset), codegen


def line_lanes(a):
    """Elements of ``a``'s dtype in one cache line (a constant of the compiled function:
    ``a.itemsize`` is read at run time, and its divisions would be too)."""


@overload(line_lanes, inline="always")
def _line_lanes(a):
    lanes = LINE_BYTES // numpy_support.as_dtype(a.dtype).itemsize
    return lambda a: lanes


def streams_by_lines(a):
    """Whether streaming stores to ``a`` go by whole lines (:func:`stream_lines`) rather than
    element by element (:func:`store_streaming`): for elements of at most 4 bytes, whose
    one-element stores (MOVNTSS) were slower than ordinary stores (a constant of the compiled
    function)."""


@overload(streams_by_lines, inline="always")
def _streams_by_lines(a):
    by_lines = numpy_support.as_dtype(a.dtype).itemsize <= 4
    return lambda a: by_lines


@njit(inline="always", cache=True)
def line_span(a):
    """``(head, end)``: ``a[head:end]`` are the whole cache lines of the contiguous 1-D ``a``
    (an empty span where its address is not a multiple of its itemsize)."""
    lanes = line_lanes(a)
    itemsize = LINE_BYTES // lanes
    address = a.ctypes.data
    if address % itemsize:
        return a.size, a.size
    head = min((-address) % LINE_BYTES // itemsize, a.size)
    return head, head + (a.size - head) // lanes * lanes


@njit(inline="always", cache=True)
def stream_lines(stage, count, array, start):
    """``array[start:start + count] = stage[:count]`` with streaming stores (``count`` whole
    lines, ``array[start]`` on a line boundary)."""
    lanes = line_lanes(array)
    for line in range(count // lanes):
        store_streaming_line(array, start + line * lanes, stage, line * lanes)
