"""pytest-benchmark configuration for the fastbn suite (``pytest bench/ --benchmark-only``).

Not part of the plain test run: pyproject's ``testpaths`` is ``tests``. Options narrow the
suite (the smoke test runs it on a tiny shape with ``--benchmark-disable``).
"""

from __future__ import annotations

import pytest

from fastbn.bench import machine, registry
from fastbn.bench.roofline import PASSES, measure_gpu_bandwidth


def pytest_addoption(parser):
    group = parser.getgroup("fastbn-bench")
    group.addoption("--bench-shapes", nargs="+", default=None, metavar="SHAPE",
                    help="case names or shapes like 128x64x28x28 or 32x28x28x64:-1 "
                         "(default: the standard cases)")
    group.addoption("--bench-dtypes", nargs="+", default=None, choices=registry.DTYPES)
    group.addoption("--bench-passes", nargs="+", default=None, choices=PASSES)
    group.addoption("--bench-bandwidth-mib", type=int, default=None,
                    help="stream array size of the bandwidth measurement (roofline denominator)")


@pytest.fixture(scope="session")
def bandwidth_bytes(request) -> int | None:
    """Stream array size of the bandwidth measurements (None: the default, 8x the L3)."""
    mib = request.config.getoption("--bench-bandwidth-mib")
    return mib * 2**20 if mib else None


@pytest.fixture(scope="session")
def gpu_bandwidth():
    """Device-memory bandwidth, the cuda rows' roofline (measured only when they run)."""
    return measure_gpu_bandwidth()


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["fastbn"] = {**machine.machine_info(), "versions": machine.versions()}
