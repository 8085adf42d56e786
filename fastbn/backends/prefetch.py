"""A software prefetch for Numba's CPU target (``llvm.prefetch``, a read hint to all caches).

The channels-last statistics sweep reads several rows at once (see
``cpu_kernels.sweep_pivoted_sums``). Each row's segment is short, and the hardware prefetchers
follow such interleaved streams poorly: measured on one core of the 2-core EPYC at
(401408, 64), 1.05 ns per float64 element and 0.60 per float32 without a hint, 0.75 and 0.35
with one 4 KiB ahead (a plain sequential sum: 0.56 and 0.40). A prefetch never faults, so it
may point past the end of the array.

Two hints: :func:`prefetch_element` brings the line into every level (``prefetcht0`` on x86),
:func:`prefetch_element_to_l2` into the outer levels only (``prefetcht1``), which lets a hint
run further ahead without filling L1 with lines needed later than the ones it holds (the
statistics sweep of short rows, see ``cpu_kernels.MOMENTS_PREFETCH_AHEAD``).
"""

from __future__ import annotations

from llvmlite import ir
from llvmlite.binding import llvm_version_info
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

# LLVM 15 and later name the intrinsic after the opaque pointer type, earlier ones after i8*.
_PREFETCH = "llvm.prefetch.p0" if llvm_version_info[0] >= 15 else "llvm.prefetch.p0i8"
# llvm.prefetch's locality: 3 keeps the line in all caches, 2 in all but the innermost.
_READ, _KEEP_IN_ALL_CACHES, _KEEP_IN_OUTER_CACHES, _DATA_CACHE = 0, 3, 2, 1


def _prefetch_typer(locality, flat, index):
    """Signature and codegen of a read hint for element ``index`` of the 1-D array ``flat``."""
    if not (isinstance(flat, types.Array) and flat.ndim == 1 and isinstance(index, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        array_type = signature.args[0]
        array = context.make_array(array_type)(context, builder, args[0])
        offset = builder.mul(context.cast(builder, args[1], signature.args[1], types.intp),
                             context.get_constant(types.intp,
                                                  context.get_abi_sizeof(
                                                      context.get_data_type(array_type.dtype))))
        address = builder.gep(builder.bitcast(array.data, ir.IntType(8).as_pointer()), [offset])
        i32 = ir.IntType(32)
        hint = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [address.type, i32, i32, i32]),
            _PREFETCH)
        builder.call(hint, [address, ir.Constant(i32, _READ), ir.Constant(i32, locality),
                            ir.Constant(i32, _DATA_CACHE)])
        return context.get_dummy_value()

    return types.void(flat, index), codegen


@intrinsic
def prefetch_element(typingctx, flat, index):
    """Hint that element ``index`` of the 1-D array ``flat`` will be read soon (all caches)."""
    return _prefetch_typer(_KEEP_IN_ALL_CACHES, flat, index)


@intrinsic
def prefetch_element_to_l2(typingctx, flat, index):
    """Hint that element ``index`` of the 1-D array ``flat`` will be read, not into L1."""
    return _prefetch_typer(_KEEP_IN_OUTER_CACHES, flat, index)
