"""pytest-benchmark suite: every pass, shape, dtype and implementation of the pass registry.

Each table (``benchmark.group``) compares the implementations for one ``pass|shape|dtype``;
``extra_info`` carries the bytes the pass must move, the effective GB/s, the % of the
memory roofline and the memory regime (``cache``/``mixed``/``dram``, as in the report). The roofline denominator follows the report's rule (bench/conftest.py's
``RooflineLedger``): the best bandwidth probe just before and just after the group.
"""

from __future__ import annotations

import gc

import pytest

from fastbn.bench import cases, registry
from fastbn.bench.roofline import (PASSES, bytes_moved, gb_per_s, l3_cache_bytes,
                                   memory_regime, roofline_percent)


def pytest_generate_tests(metafunc):
    if "inputs" not in metafunc.fixturenames:
        return
    config = metafunc.config
    chosen = [cases.parse_case(s)
              for s in config.getoption("--bench-shapes") or cases.DEFAULT_CASES]
    dtypes = config.getoption("--bench-dtypes") or cases.DTYPES
    passes = config.getoption("--bench-passes") or PASSES
    # Module scope: pytest groups the tests by (case, dtype), so the large inputs exist once.
    metafunc.parametrize("inputs", [(c, d) for c in chosen for d in dtypes], indirect=True,
                         scope="module", ids=[f"{c.name}-{d}" for c in chosen for d in dtypes])
    metafunc.parametrize(("operation", "implementation"),
                         [(op, impl) for op, impl in registry.pairs() if op in passes])


@pytest.fixture(scope="module")
def inputs(request):
    case, dtype = request.param
    made = cases.make_inputs(case, dtype)
    yield made
    del made
    gc.collect()


def test_batchnorm(request, benchmark, roofline_ledger, inputs, operation, implementation):
    reason = registry.unavailable_reason(implementation)
    if reason is not None:
        pytest.skip(reason)
    on_gpu = registry.IMPLEMENTATIONS[implementation].device == "gpu"
    group = None if on_gpu else roofline_ledger.enter(
        (inputs.case.name, str(inputs.dtype), operation))
    body = registry.REGISTRY[operation][implementation](inputs)
    body()  # warm-up: JIT compilation and cache loads stay out of the timings
    moved = bytes_moved(operation, inputs.tensor_bytes)
    benchmark.group = f"{operation}|{inputs.case.label}|{inputs.dtype}"
    benchmark.extra_info.update({
        "implementation": implementation, "pass": operation, "case": inputs.case.name,
        "dtype": str(inputs.dtype), "bytes": moved,
    })
    if not on_gpu:  # "cache" rows: judge against PyTorch, not the DRAM roofline
        benchmark.extra_info["memory"] = memory_regime(operation, inputs.tensor_bytes,
                                                       l3_cache_bytes())
    benchmark(body)
    stats = getattr(benchmark, "stats", None)
    median = None if stats is None else stats.stats.median  # None under --benchmark-disable
    if median is not None:
        benchmark.extra_info["gb_per_s"] = gb_per_s(moved, median)
    if on_gpu:
        gpu = request.getfixturevalue("gpu_bandwidth")
        benchmark.extra_info["roofline_gb_s"] = gpu.roofline_gb_s
        if median is not None:
            benchmark.extra_info["roofline_percent"] = roofline_percent(
                moved, median, gpu.roofline_gb_s)
    else:
        roofline_ledger.record(group, benchmark.extra_info, median)
