"""Every CUDA kernel compiles to PTX for sm_90, for float32 and float64 inputs.

The simulator runs kernels as Python, so it misses what only Numba's CUDA compiler checks:
typing (e.g. a float32/float64 unification), unsupported constructs, shared/local memory use.
Compiling needs the real ``numba.cuda`` but no GPU, so it runs in a subprocess without
``NUMBA_ENABLE_CUDASIM`` (which tests/conftest.py sets when there is no GPU).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("numba.cuda")

COMPILE_EVERY_KERNEL = textwrap.dedent("""
    from types import SimpleNamespace

    import numba.cuda.dispatcher
    from numba import cuda, types

    # Device functions are compiled for the current device's compute capability; with no GPU
    # there is no device to ask, so answer for the H100 that compile_ptx targets below.
    numba.cuda.dispatcher.get_current_device = lambda: SimpleNamespace(compute_capability=(9, 0))

    from fastbn.backends import cuda_kernels as k

    f64, boolean = types.float64, types.boolean

    def arr(dtype, ndim):
        return types.Array(dtype, ndim, "C")

    def signatures(t):
        '''Argument types as cuda.py launches them, for input dtype t: statistics and
        coefficients are float64; gamma, beta and running statistics have the layer's dtype
        (or are float64 batch statistics / zero-length float64 placeholders).'''
        x3, x2, vt = arr(t, 3), arr(t, 2), arr(t, 1)
        v64, p64 = arr(f64, 1), arr(f64, 2)
        other = types.float32 if t == types.float64 else types.float64
        return {
            k.batch_moments_planar: [(x3, p64, p64, p64)],
            k.batch_moments_channels_last: [(x2, p64, p64, p64)],
            k.finalize_moments: [(p64, p64, p64, v64, v64)],
            k.update_running_stats: [(vt, vt, v64, v64, f64, f64), (v64, vt, v64, v64, f64, f64)],
            k.normalize_coefficients: [(v64, v64, vt, vt, f64, v64, v64, v64),
                                       (vt, vt, v64, v64, f64, v64, v64, v64)],
            k.scale_shift_planar: [(x3, v64, v64, x3)],
            k.scale_shift_channels_last: [(x2, v64, v64, x2)],
            k.backward_reduce_planar: [(x3, x3, v64, p64, p64), (x3, x3, vt, p64, p64)],
            k.backward_reduce_channels_last: [(x2, x2, v64, p64, p64), (x2, x2, vt, p64, p64)],
            k.backward_coefficients: [(p64, p64, vt, v64, v64, f64, boolean,
                                       v64, v64, v64, v64, v64),
                                      (p64, p64, v64, vt, vt, f64, boolean,
                                       v64, v64, v64, v64, v64)],
            k.backward_elementwise_planar: [(x3, x3, v64, v64, v64, x3)],
            k.backward_elementwise_channels_last: [(x2, x2, v64, v64, v64, x2)],
            k.cast_copy: [(vt, arr(other, 1))],
        }

    compiled = 0
    for t in (types.float32, types.float64):
        table = signatures(t)
        missing = set(k.KERNELS) - set(table)
        assert not missing, f"no PTX signature for {sorted(m.__name__ for m in missing)}"
        for kernel, sigs in table.items():
            for sig in sigs:
                ptx, _ = cuda.compile_ptx(kernel.py_func, sig, cc=(9, 0))
                assert ".target sm_90" in ptx and ".entry" in ptx, kernel.__name__
                compiled += 1
    print("compiled", compiled)
""")


def test_every_kernel_compiles_to_ptx_for_both_dtypes():
    env = {key: value for key, value in os.environ.items() if key != "NUMBA_ENABLE_CUDASIM"}
    result = subprocess.run([sys.executable, "-c", COMPILE_EVERY_KERNEL], capture_output=True,
                            text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.split() == ["compiled", "36"]
