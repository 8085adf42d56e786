"""Compile-time benchmark: what the JIT costs a user, in fresh processes.

Two numbers matter: the first-ever run (every cpu kernel compiled, no usable Numba cache) and a
new process once the cache is warm, where the time to the first result is what a user waits for
on every ``import``. Both run in child processes with ``NUMBA_CACHE_DIR`` pointed at a new empty
directory, so the cold run cannot load anything and this checkout's own cache is left alone.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

WARM_FIRST_RESULT_TARGET_S = 0.5  # issue 9

# What every new process pays before fastbn runs anything, timed the same way (process wall
# time): importing NumPy and Numba, and scipy.linalg, which Numba imports when it loads its
# first kernel, cached or not (numba.np.arraymath's _check_blas, while it loads its typing
# registries). It bounds the warm first result from below.
_IMPORT_FLOOR_CHILD = "import numpy, numba, scipy.linalg.cython_blas"

# Runs in the child. It times the import, the first result (a layer's training forward and
# backward on a small NCHW float32 batch, the first thing a training loop does), then every
# pass on each kernel layout and dtype, which compiles (or loads) every cpu kernel
# specialization the benchmarks use.
_CHILD = r"""
import json, sys, time
start = time.perf_counter()
import numpy as np
import fastbn
imported = time.perf_counter()
x = np.random.default_rng(0).standard_normal((8, 4, 6, 6)).astype(np.float32)
bn = fastbn.BatchNorm2d(4, dtype=np.float32, backend="cpu")
bn.backward(bn.forward(x))
first = time.perf_counter()
if sys.argv[1] == "all":
    for dtype in (np.float32, np.float64):
        for shape, axis in (((8, 4, 6, 6), 1), ((16, 4), 1), ((2, 3, 3, 4), -1)):
            x = np.random.default_rng(1).standard_normal(shape).astype(dtype)
            c = shape[axis]
            y, mean, invstd = fastbn.batch_norm_forward(x, axis=axis, backend="cpu")
            fastbn.batch_norm(x, np.zeros(c, dtype), np.ones(c, dtype), training=False,
                              axis=axis, backend="cpu")
            fastbn.batch_norm_backward(x, x, None, mean, invstd, axis=axis, backend="cpu")
            fastbn.moments(x, axis=axis, backend="cpu")
done = time.perf_counter()
print(json.dumps({"import_s": imported - start, "first_result_s": first - imported,
                  "all_kernels_s": done - imported}))
"""


def _run_child(mode: str, cache_dir: str) -> dict:
    env = {**os.environ, "NUMBA_CACHE_DIR": cache_dir}
    start = time.perf_counter()
    completed = subprocess.run([sys.executable, "-c", _CHILD, mode], env=env, check=True,
                               capture_output=True, text=True)
    wall = time.perf_counter() - start
    timings = json.loads(completed.stdout.strip().splitlines()[-1])
    timings["process_wall_s"] = wall
    return timings


def _import_floor_s() -> float:
    """Wall time of a new process that only imports what Numba needs to load a kernel."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", _IMPORT_FLOOR_CHILD], check=True, capture_output=True)
    return time.perf_counter() - start


def measure_compile_time() -> dict:
    """Cold (empty cache) and warm-cache timings of fresh processes, in seconds.

    Returns
    -------
    dict with ``cold`` and ``warm`` (each: ``import_s``, ``first_result_s``, ``all_kernels_s``,
    ``process_wall_s``), ``warm_first_result_s`` (process start to first result: the warm
    ``first``-only child's wall time, interpreter start-up included: a layer's training
    forward and backward), ``import_floor_s`` (a new process that only imports NumPy, Numba
    and scipy.linalg, which Numba imports to load any kernel: the floor under the first
    result) and the target.
    """
    with tempfile.TemporaryDirectory(prefix="fastbn-numba-cache-") as cache_dir:
        cold = _run_child("all", cache_dir)
        warm = _run_child("all", cache_dir)
        warm_first = _run_child("first", cache_dir)
    import_floor = _import_floor_s()
    return {
        "cold": cold,
        "warm": warm,
        "warm_first_result_s": warm_first["process_wall_s"],
        "import_floor_s": import_floor,
        "warm_first_result_target_s": WARM_FIRST_RESULT_TARGET_S,
    }
