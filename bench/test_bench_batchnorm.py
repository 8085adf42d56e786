"""pytest-benchmark suite: every pass, shape, dtype and implementation of the registry.

Each table (``benchmark.group``) compares the implementations for one ``pass|shape|dtype``;
``extra_info`` carries the bytes the pass must move, the effective GB/s and the % of the
memory roofline, against the bandwidth measured just before the (shape, dtype)'s benchmarks.
"""

from __future__ import annotations

import gc

import pytest

from fastbn.bench import registry
from fastbn.bench.roofline import (PASSES, bytes_moved, gb_per_s, measure_bandwidth,
                                   roofline_percent)

def pytest_generate_tests(metafunc):
    if "inputs" not in metafunc.fixturenames:
        return
    config = metafunc.config
    cases = [registry.parse_case(s)
             for s in config.getoption("--bench-shapes") or registry.DEFAULT_CASES]
    dtypes = config.getoption("--bench-dtypes") or registry.DTYPES
    passes = config.getoption("--bench-passes") or PASSES
    # Module scope: pytest groups the tests by (case, dtype), so the large inputs exist once.
    metafunc.parametrize("inputs", [(c, d) for c in cases for d in dtypes], indirect=True,
                         scope="module", ids=[f"{c.name}-{d}" for c in cases for d in dtypes])
    metafunc.parametrize(("operation", "implementation"),
                         [(op, impl) for op, impl in registry.pairs() if op in passes])


@pytest.fixture(scope="module")
def inputs(request, bandwidth_bytes):
    """Inputs of one (case, dtype), and the host bandwidth measured just before making them.

    The bandwidth a core can pull on a shared machine follows the host's load, so each
    (case, dtype) gets its own denominator rather than the session's first measurement.
    """
    case, dtype = request.param
    host_bandwidth = measure_bandwidth(bandwidth_bytes, runs=5)
    made = registry.make_inputs(case, dtype)
    yield made, host_bandwidth
    del made
    gc.collect()


def test_batchnorm(request, benchmark, inputs, operation, implementation):
    inputs, host_bandwidth = inputs
    reason = registry.unavailable_reason(implementation)
    if reason is not None:
        pytest.skip(reason)
    bandwidth = (request.getfixturevalue("gpu_bandwidth") if implementation == "cuda"
                 else host_bandwidth)
    body = registry.REGISTRY[operation][implementation](inputs)
    body()  # warm-up: JIT compilation and cache loads stay out of the timings
    moved = bytes_moved(operation, inputs.tensor_bytes)
    benchmark.group = f"{operation}|{inputs.case.label}|{inputs.dtype}"
    benchmark.extra_info.update({
        "implementation": implementation, "pass": operation, "case": inputs.case.name,
        "dtype": str(inputs.dtype), "bytes": moved,
        "roofline_gb_s": bandwidth.roofline_gb_s,
    })
    benchmark(body)
    stats = getattr(benchmark, "stats", None)
    if stats is not None:  # None under --benchmark-disable, where the body ran once
        median = stats.stats.median
        benchmark.extra_info["gb_per_s"] = gb_per_s(moved, median)
        benchmark.extra_info["roofline_percent"] = roofline_percent(
            moved, median, bandwidth.roofline_gb_s)
