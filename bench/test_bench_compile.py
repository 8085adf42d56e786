"""Compile-time benchmark: JIT cost in a fresh process, cold and with a warm Numba cache.

Runs child processes, so it is timed once (``pedantic``, one round) rather than repeated.
"""

from __future__ import annotations

from fastbn.bench.compile_time import WARM_FIRST_RESULT_TARGET_S, measure_compile_time


def test_compile_time(benchmark):
    benchmark.group = "compile-time"
    measured = benchmark.pedantic(measure_compile_time, rounds=1, iterations=1)
    benchmark.extra_info.update({
        "cold_all_kernels_s": measured["cold"]["all_kernels_s"],
        "cold_first_result_s": measured["cold"]["first_result_s"],
        "warm_all_kernels_s": measured["warm"]["all_kernels_s"],
        "warm_first_result_s": measured["warm_first_result_s"],
        "numba_floor_s": measured["numba_floor_s"],
        "warm_first_result_target_s": WARM_FIRST_RESULT_TARGET_S,
    })
