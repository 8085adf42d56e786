"""Compile-time benchmark: what the JIT costs a user, in fresh processes.

Two numbers matter: the first-ever run (every cpu kernel compiled, no usable Numba cache) and a
new process once the cache is warm, where the time to the first result is what a user waits for
on every ``import``. Both run in child processes with ``NUMBA_CACHE_DIR`` pointed at a new empty
directory, so the cold run cannot load anything and this checkout's own cache is left alone.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

WARM_FIRST_RESULT_TARGET_S = 0.5  # issue 9

# What every new process pays before fastbn runs anything, timed the same way (process wall
# time): importing NumPy and Numba and calling one trivial cached @njit function. Numba's first
# call of any compiled function, cached or not, loads its typing and lowering registries
# (importing numba.np's array, math and linalg modules, and scipy.linalg to check for BLAS),
# which no package built on Numba avoids. It bounds the warm first result from below.
_FLOOR_KERNEL = """
import numba

@numba.njit(cache=True)
def first_element(a):
    return a[0]
"""
_FLOOR_CHILD = ("import sys; sys.path.insert(0, sys.argv[1]); import numpy; import floor_kernel; "
                "floor_kernel.first_element(numpy.zeros(1))")
# New processes' wall times vary by tens of milliseconds: each figure is a median of these.
PROCESS_RUNS = 3

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


def child_env(cache_dir: str) -> dict[str, str]:
    """The environment of a timed child: Numba's cache in ``cache_dir``, and Python's bytecode
    cache on (``PYTHONDONTWRITEBYTECODE`` removed), so that "warm" means both caches are warm,
    as after a normal install, and a later child does not compile fastbn's sources again."""
    env = {**os.environ, "NUMBA_CACHE_DIR": cache_dir}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def _timed_run(args: list[str], env: dict) -> tuple[float, str]:
    """``(wall seconds, stdout)`` of a child process."""
    start = time.perf_counter()
    completed = subprocess.run(args, env=env, check=True, capture_output=True, text=True)
    return time.perf_counter() - start, completed.stdout


def _run_child(mode: str, cache_dir: str) -> dict:
    wall, stdout = _timed_run([sys.executable, "-c", _CHILD, mode], child_env(cache_dir))
    timings = json.loads(stdout.strip().splitlines()[-1])
    timings["process_wall_s"] = wall
    return timings


def write_floor_kernel(module_dir: str) -> None:
    """The floor's module, ``floor_kernel.py``, in ``module_dir`` (``_FLOOR_CHILD`` imports it
    from the directory given as its argument)."""
    with open(os.path.join(module_dir, "floor_kernel.py"), "w") as f:
        f.write(_FLOOR_KERNEL)


def _numba_floor_s(cache_dir: str) -> float:
    """Median wall time of a new process that imports NumPy and Numba and calls one trivial
    @njit function from a warm cache (compiled into ``cache_dir`` by a first run)."""
    with tempfile.TemporaryDirectory(prefix="fastbn-floor-") as module_dir:
        write_floor_kernel(module_dir)
        env = child_env(cache_dir)
        args = [sys.executable, "-c", _FLOOR_CHILD, module_dir]
        _timed_run(args, env)  # compiles and caches the function
        return statistics.median(_timed_run(args, env)[0] for _ in range(PROCESS_RUNS))


def measure_compile_time() -> dict:
    """Cold (empty cache) and warm-cache timings of fresh processes, in seconds.

    Returns
    -------
    dict with ``cold`` and ``warm`` (each: ``import_s``, ``first_result_s``, ``all_kernels_s``,
    ``process_wall_s``), ``warm_first_result_s`` (process start to first result: the warm
    ``first``-only child's wall time, interpreter start-up included: a layer's training
    forward and backward; median of ``PROCESS_RUNS``), ``numba_floor_s`` (a new process that
    imports NumPy and Numba and calls one trivial cached @njit function: the floor under the
    first result; median of ``PROCESS_RUNS``) and the target.
    """
    with tempfile.TemporaryDirectory(prefix="fastbn-numba-cache-") as cache_dir:
        cold = _run_child("all", cache_dir)
        warm = _run_child("all", cache_dir)
        warm_first_s = statistics.median(_run_child("first", cache_dir)["process_wall_s"]
                                         for _ in range(PROCESS_RUNS))
        numba_floor = _numba_floor_s(cache_dir)
    return {
        "cold": cold,
        "warm": warm,
        "warm_first_result_s": warm_first_s,
        "numba_floor_s": numba_floor,
        "warm_first_result_target_s": WARM_FIRST_RESULT_TARGET_S,
    }


def floor_of(compile_time: dict) -> tuple[float, str] | None:
    """``(seconds, what was timed)`` of a result's floor under the first result, or None.

    Results before 2026-12-03T19 timed only the imports (``import_floor_s``), which leave out
    the registries Numba loads at its first call.
    """
    if "numba_floor_s" in compile_time:
        return compile_time["numba_floor_s"], ("a new process that imports NumPy and Numba and "
                                               "calls one trivial cached @njit function")
    if "import_floor_s" in compile_time:
        return compile_time["import_floor_s"], ("a new process that only imports NumPy, Numba "
                                                "and scipy.linalg")
    return None
