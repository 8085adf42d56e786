"""Smoke test of the benchmarks: every registry body once on tiny shapes, the roofline
arithmetic, the report CLI end to end, and the pytest-benchmark suite collected and run once.

The benchmarks themselves are not part of the test run (``testpaths = ["tests"]``); this keeps
them importable and correct without paying for their timings.
"""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest

from fastbn.bench import registry, report
from fastbn.bench.roofline import (PASS_STREAMS, PASSES, Bandwidth, bytes_moved, gb_per_s,
                                   measure_bandwidth, roofline_percent)
from fastbn.bench.timing import time_body

REPO = Path(__file__).resolve().parents[1]
TOLERANCE = {"float32": dict(rtol=2e-4, atol=2e-4), "float64": dict(rtol=1e-9, atol=1e-9)}


@pytest.fixture(scope="module", params=[(c, d) for c in registry.TINY_CASES
                                        for d in registry.DTYPES],
                ids=[f"{c.name}-{d}" for c in registry.TINY_CASES for d in registry.DTYPES])
def tiny_inputs(request):
    case, dtype = request.param
    return registry.make_inputs(case, dtype, seed=3)


def test_registry_has_every_pass_and_implementation():
    assert tuple(registry.REGISTRY) == PASSES
    for operation, setups in registry.REGISTRY.items():
        expected = set(registry.IMPLEMENTATIONS) - ({"cpu-out"} if operation == "moments"
                                                    else set())
        assert set(setups) == expected


@pytest.mark.parametrize(("operation", "implementation"), registry.pairs())
def test_every_body_agrees_with_naive_numpy(tiny_inputs, operation, implementation):
    reason = registry.unavailable_reason(implementation, allow_simulator=True)
    if reason is not None:
        pytest.skip(reason)
    expected = registry.REGISTRY[operation]["numpy"](tiny_inputs)()
    got = registry.REGISTRY[operation][implementation](tiny_inputs)()
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        g, e = registry.to_numpy(g), registry.to_numpy(e)
        assert g.shape == e.shape
        np.testing.assert_allclose(g.astype(np.float64), e.astype(np.float64),
                                   **TOLERANCE[str(tiny_inputs.dtype)])


def test_bodies_return_outputs_in_the_input_layout():
    inputs = registry.make_inputs(registry.TINY_CASES[2], "float32")
    (y,) = registry.REGISTRY["forward-eval"]["numpy"](inputs)()
    assert y.shape == inputs.x.shape


def test_roofline_arithmetic():
    assert PASS_STREAMS == {"forward-train": 3, "forward-eval": 2, "backward": 5, "moments": 1}
    assert bytes_moved("backward", 1000) == 5000
    assert gb_per_s(3e9, 1.5) == pytest.approx(2.0)
    # 1 GB at 4 GB/s takes 0.25 s at the roofline; measured 0.5 s is half of it
    assert roofline_percent(1e9, 0.5, 4.0) == pytest.approx(50.0)
    with pytest.raises(ValueError, match="unknown pass"):
        bytes_moved("sideways", 1)


def test_roofline_denominator_is_the_faster_stream():
    b = Bandwidth(read_gb_s=30.0, read_write_gb_s=25.0, array_bytes=1, runs=1, threads=1)
    assert b.roofline_gb_s == 30.0 and b.roofline_source == "read"
    assert b.to_dict()["roofline_gb_s"] == 30.0
    later = Bandwidth(read_gb_s=20.0, read_write_gb_s=28.0, array_bytes=1, runs=1, threads=1)
    best = b.best_with(later)
    assert (best.read_gb_s, best.read_write_gb_s, best.runs) == (30.0, 28.0, 2)


def test_bandwidth_measurement_runs():
    b = measure_bandwidth(4 * 2**20, runs=2)
    assert b.read_gb_s > 0 and b.read_write_gb_s > 0 and math.isfinite(b.roofline_gb_s)
    assert b.array_bytes == 4 * 2**20


def test_parse_case():
    assert registry.parse_case("nc-8192x1024") is registry.CASES["nc-8192x1024"]
    case = registry.parse_case("32x28x28x64:-1")
    assert case.shape == (32, 28, 28, 64) and case.axis == -1 and case.layout == "NHWC"
    assert registry.parse_case("8x4x3x3").axis == 1
    for bad in ("huge", "8x4:5", "8,4"):
        with pytest.raises(ValueError):
            registry.parse_case(bad)


def test_time_body_warms_up_and_takes_the_median():
    calls = []
    timing = time_body(lambda: calls.append(1), repeats=3, min_sample_s=1e-4, warmup=1)
    assert timing.repeats == 3 and timing.number >= 1
    assert len(calls) == 1 + 1 + 3 * timing.number  # warm-up, calibration, samples
    assert 0 < timing.min_s <= timing.median_s


def _row(case, operation, speedup, roofline, implementation="cpu"):
    return {"case": case, "pass": operation, "dtype": "float32",
            "implementation": implementation, "speedup_vs_numpy": speedup,
            "roofline_percent": roofline}


def test_targets_are_computed_from_the_rows():
    rows = [_row("nchw-256x64x56x56", "forward-train", 7.0, 70.0),
            _row("nchw-256x64x56x56", "backward", 3.0, 50.0)]
    verdicts = report.evaluate_targets({"rows": rows, "compile_time": None})
    status = [v["status"] for v in verdicts]
    assert status[:3] == ["PASS", "FAIL", "FAIL"]  # 7x >= 6x, 3x < 4x, 70 % < 75 %
    assert set(status[3:]) == {"SKIP"}
    text = report.format_targets(verdicts)
    assert "measured 7.00x" in text and "measured 70 %" in text


def test_report_cli_end_to_end(tmp_path):
    json_path, png_path = tmp_path / "run.json", tmp_path / "run.png"
    out = io.StringIO()
    status = report.main(["--shapes", "4x3x5x5", "6x3", "--dtypes", "float32",
                          "--backends", "numpy", "cpu", "cuda", "--repeats", "1",
                          "--min-sample-time", "0.0001", "--bandwidth-mib", "4",
                          "--no-compile-time", "--json", str(json_path), "--png", str(png_path)],
                         out=out, progress=None)
    assert status == 0
    results = json.loads(json_path.read_text())
    assert results["schema"] == report.SCHEMA
    for key in ("created", "command", "machine", "versions", "bandwidth", "settings", "rows",
                "skipped", "failures", "targets"):
        assert key in results
    assert {"cpu", "usable_cpus", "numba_threads", "numba_threading_layer"} <= \
        set(results["machine"])
    assert {"python", "numpy", "numba", "torch"} <= set(results["versions"])
    assert results["bandwidth"]["roofline_gb_s"] > 0
    groups = 2 * len(PASSES)  # 2 shapes x 1 dtype x every pass
    assert len(results["bandwidth"]["per_group_roofline_gb_s"]) == groups
    assert len(results["bandwidth_probes"]) == groups + 1  # start, between the groups, end
    assert len(results["rows"]) == 2 * len(PASSES) * 2  # 2 shapes, numpy and cpu
    assert [s["implementation"] for s in results["skipped"]] == ["cuda"]  # never faked
    for row in results["rows"]:
        assert row["median_s"] > 0
        assert row["bytes"] == bytes_moved(row["pass"], 4 * math.prod(row["shape"]))
        per_group = results["bandwidth"]["per_group_roofline_gb_s"]
        assert row["roofline_gb_s"] == per_group[row["segment"]]
        assert row["roofline_percent"] == pytest.approx(roofline_percent(
            row["bytes"], row["median_s"], row["roofline_gb_s"]))
        if row["implementation"] == "numpy":
            assert row["speedup_vs_numpy"] == pytest.approx(1.0)
    assert all(v["status"] == "SKIP" for v in results["targets"])
    text = out.getvalue()
    assert "% roofline" in text and "cuda rows skipped" in text and "SKIP" in text
    pytest.importorskip("matplotlib")
    assert png_path.stat().st_size > 0

    markdown = io.StringIO()
    assert report.main(["--markdown", str(json_path), "--passes", "backward"], out=markdown) == 0
    lines = markdown.getvalue().splitlines()
    table = [line for line in lines if line.startswith("| backward")]
    assert len(table) == 2 and "Reproduce: `python -m fastbn bench" in markdown.getvalue()


def test_module_entry_point():
    done = subprocess.run([sys.executable, "-m", "fastbn", "bench", "--help"],
                          capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0 and "--quick" in done.stdout


def test_benchmarks_stay_out_of_the_plain_test_run():
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert config["tool"]["pytest"]["ini_options"]["testpaths"] == ["tests"]


def test_benchmark_suite_runs_once_on_a_tiny_shape():
    """Collect the pytest-benchmark suite and run each of its bodies once."""
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_ADDOPTS"}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "bench/test_bench_batchnorm.py", "-q",
         "-p", "no:cacheprovider", "--benchmark-disable", "--bench-shapes", "4x3x5x5",
         "2x3x4x5:-1", "--bench-dtypes", "float32", "--bench-bandwidth-mib", "4"],
        capture_output=True, text=True, cwd=REPO, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "passed" in done.stdout


def test_attainable_percent_of_a_read_only_pass_is_100():
    b = Bandwidth(read_gb_s=30.0, read_write_gb_s=24.0, array_bytes=1, runs=1, threads=1)
    assert b.attainable_percent("moments") == pytest.approx(100.0)
    # forward-train: 1 read at 30 GB/s plus a read+write pair at 24 GB/s, 3 streams in all
    assert b.attainable_percent("forward-train") == pytest.approx(
        100 * (3 / 30) / (1 / 30 + 2 / 24))


def test_cuda_rows_use_the_gpu_roofline():
    """The report's cuda plumbing, in the simulator (the real report refuses simulator rows)."""
    reason = registry.unavailable_reason("cuda", allow_simulator=True)
    if reason is not None:
        pytest.skip(reason)
    from fastbn.bench.roofline import measure_gpu_bandwidth
    gpu = measure_gpu_bandwidth(8 * 1024, runs=1)
    host = Bandwidth(read_gb_s=10.0, read_write_gb_s=8.0, array_bytes=1, runs=1, threads=1)
    rows, failures = report.run_benchmarks(
        [registry.TINY_CASES[0]], ["float32"], ["numpy", "cuda"], ["forward-eval"],
        repeats=1, min_sample_s=1e-4, progress=None)
    assert failures == []
    report.add_roofline(rows, [host], gpu)
    by_impl = {r["implementation"]: r for r in rows}
    assert by_impl["cuda"]["roofline_gb_s"] == gpu.roofline_gb_s
    assert by_impl["numpy"]["roofline_gb_s"] == host.roofline_gb_s


def test_cache_resident_rows_are_flagged_by_working_set():
    from fastbn.bench.roofline import partly_cache_resident
    mib = 2**20
    assert partly_cache_resident("forward-train", 12 * mib, 32 * mib)   # 24 MiB of x and y
    assert not partly_cache_resident("backward", 205 * mib, 32 * mib)
    assert not partly_cache_resident("moments", 1, None)                # cache size unknown
