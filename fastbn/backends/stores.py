"""Streaming (non-temporal) stores for Numba's CPU target, and when the cpu backend uses them.

An ordinary store to a line that is not in cache first reads the line from memory (read for
ownership), so a pass writing a tensor far larger than the last-level cache moves each written
byte twice. A non-temporal store (LLVM's ``!nontemporal``; MOVNT* on x86) writes whole lines
without reading them and without evicting what the cache holds. For an output that would have
stayed in cache it is slower: it goes to memory anyway, and its next reader fetches it back.

Measured on the 2-core EPYC, 2 threads, the eval pass into a recycled output, side by side:

=============================  ==========  ===============  ================
shape, dtype                   output      ordinary stores  streaming stores
=============================  ==========  ===============  ================
(128, 64, 784) float64         49 MiB      7.31 ms          4.50 ms
(32, 256, 196) float64         12.3 MiB    1.38 ms          1.09 ms
(32768, 1024, 1) float32       128 MiB     16.4-18.4 ms     13.7-16.0 ms
(6272, 1024, 1) float32        24.5 MiB    3.67 ms          3.76 ms
(256, 64, 3136) float32        196 MiB     21.0 ms          23.0 ms
(64, 128, 1) float32           32 KiB      3.3 us           8.3 us
=============================  ==========  ===============  ================

LLVM cannot prove the rows 32-byte aligned, so it writes the non-temporal stores one element
at a time (MOVNTSD/MOVNTSS on this AMD CPU): 8 bytes per instruction win, 4 bytes only where
the ordinary loop was slow (channels-last). So the cpu backend streams the forward outputs of
at least half the last-level cache (:func:`streaming_from_bytes`) that are float64, or
float32 channels-last (``cpu._streams``). The kernels take the choice as a run-time flag, and
the store helper branches on it inside their loops: LLVM hoists the branch out of each loop
(unswitching), and the ordinary-store loop compiles to vector code as without the flag
(checked in tests/test_stores.py).
"""

from __future__ import annotations

import functools
import os

from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

# Outputs of at least this fraction of the last-level cache may be streamed: float64 ones won
# from 12.3 MiB (0.4x the 32 MiB cache) on; a 2 MiB one lost by half (measured).
STREAMING_CACHE_MULTIPLE = 0.5
# Where the cache size is unknown: half a common 32 MiB last-level cache.
UNKNOWN_CACHE_STREAMING_BYTES = 16 << 20


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
def streaming_from_bytes() -> int:
    """Smallest output (in bytes) the cpu kernels write with streaming stores."""
    cache = l3_cache_bytes()
    return int(STREAMING_CACHE_MULTIPLE * cache) if cache else UNKNOWN_CACHE_STREAMING_BYTES


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
