"""pytest-benchmark configuration for the fastbn suite (``pytest bench/ --benchmark-only``).

Not part of the plain test run: pyproject's ``testpaths`` is ``tests``. Options narrow the
suite (the smoke test runs it on a tiny shape with ``--benchmark-disable``).
"""

from __future__ import annotations

import pytest

from fastbn.bench import cases, machine
from fastbn.bench.roofline import (PASSES, BandwidthSchedule, measure_gpu_bandwidth,
                                   roofline_percent)


def pytest_addoption(parser):
    group = parser.getgroup("fastbn-bench")
    group.addoption("--bench-shapes", nargs="+", default=None, metavar="SHAPE",
                    help="case names or shapes like 128x64x28x28 or 32x28x28x64:-1 "
                         "(default: the standard cases)")
    group.addoption("--bench-dtypes", nargs="+", default=None, choices=cases.ALL_DTYPES)
    group.addoption("--bench-passes", nargs="+", default=None, choices=PASSES)
    group.addoption("--bench-bandwidth-mib", type=int, default=None,
                    help="stream array size of the bandwidth measurement (roofline denominator)")


class RooflineLedger:
    """The report's bandwidth rule (:class:`BandwidthSchedule`) applied to the suite: each
    benchmark enters its (shape, dtype, pass) group before timing, and once the session ends
    (one more probe) its ``extra_info`` gets the denominator of the probes around its group."""

    def __init__(self, array_bytes: int | None) -> None:
        self.schedule = BandwidthSchedule(array_bytes)
        self.pending: list[tuple[int, dict, float | None]] = []

    def enter(self, key: object) -> int:
        return self.schedule.enter(key)

    def record(self, group: int, extra_info: dict, median_s: float | None) -> None:
        self.pending.append((group, extra_info, median_s))

    def close(self) -> None:
        denominators = self.schedule.finish()
        for group, extra_info, median_s in self.pending:
            bandwidth = denominators[group]
            extra_info["roofline_gb_s"] = bandwidth.roofline_gb_s
            if median_s is not None:
                extra_info["roofline_percent"] = roofline_percent(
                    extra_info["bytes"], median_s, bandwidth.roofline_gb_s)


@pytest.fixture(scope="session")
def roofline_ledger(request):
    mib = request.config.getoption("--bench-bandwidth-mib")
    ledger = RooflineLedger(mib * 2**20 if mib else None)
    yield ledger
    ledger.close()


@pytest.fixture(scope="session")
def gpu_bandwidth():
    """Device-memory bandwidth (copy kernel), the GPU rows' roofline (only when they run)."""
    return measure_gpu_bandwidth()


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["fastbn"] = {**machine.machine_info(), "versions": machine.versions()}
