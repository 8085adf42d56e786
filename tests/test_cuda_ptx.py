"""Every CUDA kernel compiled to PTX for sm_90 for float16, float32 and float64 inputs, and read.

The simulator runs kernels as Python, so it misses what only Numba's CUDA compiler decides:
typing (a float32/float64 unification), unsupported constructs, and above all the precision
of the arithmetic. In compiled Numba ``float(x)`` of a float32 stays float32 (the simulator
widens it), which put the statistics' deviation and square in float32 on the GPU
(``sub.f32``/``mul.f32``): this test reads the PTX of every kernel and fails on any float32 or
float16 arithmetic, and on local memory (the groups of loads in flight must live in registers).
Compiling needs the real ``numba.cuda`` but no GPU, so it runs in a subprocess without
``NUMBA_ENABLE_CUDASIM`` (which tests/conftest.py sets when there is no GPU).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("numba.cuda")

COMPILE_EVERY_KERNEL = textwrap.dedent("""
    import json
    import re
    from types import SimpleNamespace

    import numba.cuda.dispatcher
    from numba import cuda, types

    # Device functions are compiled for the current device's compute capability; with no GPU
    # there is no device to ask, so answer for the H100 that compile_ptx targets below.
    numba.cuda.dispatcher.get_current_device = lambda: SimpleNamespace(compute_capability=(9, 0))

    from fastbn.backends import cuda_kernels as k

    f64, i64, boolean = types.float64, types.int64, types.boolean

    def arr(dtype, ndim, layout="C"):
        return types.Array(dtype, ndim, layout)

    def signatures(t):
        '''Argument types as cuda.py launches them for input dtype t: statistics, partials and
        coefficients float64; gamma, beta and running statistics in the layer's dtype t or
        float64 (batch statistics, zero-length placeholders).'''
        v64, s64, p64 = arr(f64, 1), arr(f64, 2), arr(f64, 3)
        vt = arr(t, 1)
        table = {}
        for layout, x in (("planar", arr(t, 3)), ("channels_last", arr(t, 2))):
            table[f"batch_moments_{layout}"] = [(x, p64, s64)]
            table[f"scale_shift_{layout}"] = [
                (x, v64, v64, vt, vt, f64, x, boolean, x, v64),
                (x, vt, vt, v64, v64, f64, x, boolean, x, v64)]
            table[f"backward_reduce_{layout}"] = [
                (x, x, x, v64, v64, vt, vt, boolean, f64, p64, s64)]
            table[f"backward_elementwise_{layout}"] = [
                (x, x, x, v64, v64, vt, vt, v64, v64, f64, boolean, boolean, f64, x, x)]
        table["merge_block_partials"] = [(p64, i64, s64)]
        table["merge_gradient_partials"] = [(p64, i64, v64, s64)]
        table["update_running_stats"] = [(vt, vt, v64, v64, f64, f64, f64, f64,
                                          arr(types.int32, 1))]
        table["contiguous_copy"] = [(arr(t, 3, "A"), arr(t, 3)),  # copies and casts
                                    (arr(t, 3, "A"), arr(types.float32, 3)),
                                    (arr(f64, 3, "A"), arr(t, 3))]
        return table

    ARITHMETIC = re.compile(r"\\b(?:add|sub|mul|fma|div|neg|abs|min|max|sqrt|rcp)"
                            r"(?:\\.[a-z]+)*\\.(?:f32|f16|f16x2)\\b")
    report = {}
    for name in ("float16", "float32", "float64"):
        t = getattr(types, name)
        table = signatures(t)
        missing = {kernel.__name__ for kernel in k.KERNELS} - set(table)
        assert not missing, f"no PTX signature for {sorted(missing)}"
        for kernel in k.KERNELS:
            for sig in table[kernel.__name__]:
                ptx, _ = cuda.compile_ptx(kernel.py_func, sig, cc=(9, 0))
                assert ".target sm_90" in ptx and ".entry" in ptx, kernel.__name__
                report.setdefault(f"{kernel.__name__}[{name}]", []).append({
                    "narrow_arithmetic": sorted(set(ARITHMETIC.findall(ptx))),
                    "local_memory": ".local" in ptx,
                    "global_loads": len(re.findall(r"\\bld\\.global", ptx)),
                    "integer_divisions": len(re.findall(r"\\b(?:div|rem)\\.[su]64", ptx)),
                })
    print(json.dumps(report))
""")


@pytest.fixture(scope="module")
def ptx_report():
    env = {key: value for key, value in os.environ.items() if key != "NUMBA_ENABLE_CUDASIM"}
    result = subprocess.run([sys.executable, "-c", COMPILE_EVERY_KERNEL], capture_output=True,
                            text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_every_kernel_compiles_for_every_dtype(ptx_report):
    from fastbn.backends import cuda_kernels as k
    assert set(ptx_report) == {f"{kernel.__name__}[{dtype}]" for kernel in k.KERNELS
                               for dtype in ("float16", "float32", "float64")}


def test_all_kernel_arithmetic_is_float64(ptx_report):
    narrow = {name: [sig["narrow_arithmetic"] for sig in sigs]
              for name, sigs in ptx_report.items()
              if any(sig["narrow_arithmetic"] for sig in sigs)}
    assert narrow == {}, f"float32/float16 arithmetic in {narrow}"


def test_loads_in_flight_live_in_registers(ptx_report):
    from fastbn.backends import cuda_kernels as k
    assert not [name for name, sigs in ptx_report.items() if any(s["local_memory"] for s in sigs)]
    for dtype in ("float16", "float32", "float64"):
        for layout in ("planar", "channels_last"):
            # The group of LOADS values is loaded by unrolled code, not one load in a loop.
            loads = ptx_report[f"batch_moments_{layout}[{dtype}]"][0]["global_loads"]
            assert loads >= k.LOADS, (layout, dtype, loads)


def test_planar_elementwise_passes_divide_once_per_feature_not_per_row(ptx_report):
    # A block owns a feature: the only 64-bit division left is the set-up of the loop over
    # features (a range() trip count), none per row or element.
    for kernel in ("scale_shift_planar", "backward_elementwise_planar"):
        for dtype in ("float16", "float32", "float64"):
            for sig in ptx_report[f"{kernel}[{dtype}]"]:
                assert sig["integer_divisions"] <= 1, (kernel, dtype, sig)
