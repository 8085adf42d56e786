"""Smoke test of the benchmarks: every registry body once on tiny shapes (pass, layer and fused
sections, each checked against a reference), the roofline and bandwidth rule, the statistics,
the targets, the CLI end to end, and the pytest-benchmark suite collected and run once.

The benchmarks themselves are not part of the test run (``testpaths = ["tests"]``); this keeps
them importable and correct without paying for their timings.
"""

from __future__ import annotations

import importlib.util
import io
import json
import math
import os
import subprocess
import sys
import time
import tomllib
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest

import reference
from fastbn.bench import cases, cli, fused, layer, measure, numpy_layer, registry, render
from fastbn.bench.roofline import (PASS_STREAMS, PASSES, STREAM_BODIES, STREAM_MIX, STREAMS,
                                   Bandwidth, BandwidthSchedule, StreamBodies, bytes_moved,
                                   gb_per_s, measure_bandwidth, memory_regime,
                                   roofline_percent)
from fastbn.bench.rows import SCHEMA, Row
from fastbn.bench.stats import Ratio, speedup
from fastbn.bench.targets import NO_TORCH, TARGETS, Target, compile_time_verdict, evaluate
from fastbn.bench.timing import Timing, time_body, time_interleaved, time_round_robin

REPO = Path(__file__).resolve().parents[1]
# float16: the naive backend computes in float32 and fastbn in float64, each rounding once, so
# two results may differ by an ulp of float16 (2**-10 relative)
TOLERANCE = {"float16": dict(rtol=2e-3, atol=4e-3), "float32": dict(rtol=2e-4, atol=2e-4),
             "float64": dict(rtol=1e-9, atol=1e-9)}
TINY_LAYER_CASES = (cases.Case("tiny-nc", (8, 4), 1), cases.Case("tiny-nchw", (4, 3, 2, 2), 1))


def _assert_outputs_agree(got, expected, dtype):
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        g, e = registry.to_numpy(g), registry.to_numpy(e)
        assert g.shape == e.shape
        np.testing.assert_allclose(g.astype(np.float64), e.astype(np.float64),
                                   **TOLERANCE[str(dtype)])


@pytest.fixture(scope="module",
                params=[(c, d) for c in cases.TINY_CASES for d in cases.ALL_DTYPES],
                ids=[f"{c.name}-{d}" for c in cases.TINY_CASES for d in cases.ALL_DTYPES])
def tiny_inputs(request):
    case, dtype = request.param
    return cases.make_inputs(case, dtype, seed=3)


# ----------------------------------------------------------------------------- registries
def test_pass_registry_has_every_pass_and_implementation():
    assert tuple(registry.REGISTRY) == PASSES
    for operation, setups in registry.REGISTRY.items():
        expected = set(registry.IMPLEMENTATIONS) - ({"cpu-out"} if operation == "moments"
                                                    else set())
        assert set(setups) == expected
    # every device's rows have a PyTorch counterpart on that device
    for impl in registry.IMPLEMENTATIONS.values():
        assert registry.IMPLEMENTATIONS[registry.TORCH_ON[impl.device]].device == impl.device


@pytest.mark.parametrize(("operation", "implementation"), registry.pairs())
def test_every_pass_body_agrees_with_naive_numpy(tiny_inputs, operation, implementation):
    reason = registry.unavailable_reason(implementation, allow_simulator=True)
    if reason is not None:
        pytest.skip(reason)
    expected = registry.REGISTRY[operation]["numpy"](tiny_inputs)()
    got = registry.REGISTRY[operation][implementation](tiny_inputs)()
    _assert_outputs_agree(got, expected, tiny_inputs.dtype)


def test_pass_bodies_return_outputs_in_the_input_layout():
    inputs = cases.make_inputs(cases.TINY_CASES[2], "float32")
    (y,) = registry.REGISTRY["forward-eval"]["numpy"](inputs)()
    assert y.shape == inputs.x.shape


@pytest.mark.parametrize("dtype", cases.DTYPES)
@pytest.mark.parametrize("case", TINY_LAYER_CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("operation", layer.OPERATIONS)
def test_layer_bodies_agree(case, dtype, operation):
    """fastbn's layer, PyTorch's and the CS231n-style layer compute the same step."""
    inputs = cases.make_inputs(case, dtype, seed=5)
    expected = layer.REGISTRY[operation]["numpy-layer"](inputs)()
    for implementation, setup in layer.REGISTRY[operation].items():
        if layer.unavailable_reason(implementation) is None:
            _assert_outputs_agree(setup(inputs)(), expected, dtype)


@pytest.mark.parametrize("shape", [(16, 5), (3, 4, 2, 3)])
def test_numpy_layer_matches_the_float64_reference(shape):
    rng = np.random.default_rng(0)
    x, dy = rng.standard_normal(shape), rng.standard_normal(shape)
    gamma, beta = rng.uniform(0.5, 1.5, shape[1]), rng.uniform(-1, 1, shape[1])
    forward, backward = numpy_layer.layer_functions(len(shape))
    bn_param = {"mode": "train", "eps": 1e-5}
    y, cache = forward(x, gamma, beta, bn_param)
    dx, dgamma, dbeta = backward(dy, cache)
    np.testing.assert_allclose(y, reference.forward(x, gamma, beta)[0], rtol=1e-12, atol=1e-12)
    for got, want in zip((dx, dgamma, dbeta), reference.backward(dy, x, gamma)):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)
    # the course's convention: running = 0.9 running + 0.1 batch, biased variance
    reduced = tuple(a for a in range(len(shape)) if a != 1)
    np.testing.assert_allclose(bn_param["running_mean"], 0.1 * x.mean(axis=reduced))


@pytest.mark.parametrize("dtype", ["float16", "float64"])
@pytest.mark.parametrize("operation", fused.OPERATIONS)
def test_fused_bodies_agree(operation, dtype):
    inputs = cases.make_inputs(cases.TINY_CASES[0], dtype, seed=7)
    expected = fused.REGISTRY[operation]["unfused"](inputs)()
    ran = []
    for implementation, setup in fused.REGISTRY[operation].items():
        if fused.unavailable_reason(implementation) is None:
            _assert_outputs_agree(setup(inputs)(), expected, dtype)
            ran.append(implementation)
    assert ("fused" in ran) == (fused.fused_api_missing() is None)


def test_fused_section_says_why_it_cannot_run_yet():
    reason = fused.fused_api_missing()
    assert reason is None or "issue 13" in reason


# ----------------------------------------------------------------------------- roofline
def test_roofline_arithmetic():
    assert PASS_STREAMS == {"forward-train": 3, "forward-eval": 2, "backward": 5, "moments": 1}
    assert bytes_moved("backward", 1000) == 5000
    assert bytes_moved("bn-relu-step", 10) == 80
    assert gb_per_s(3e9, 1.5) == pytest.approx(2.0)
    # 1 GB at 4 GB/s takes 0.25 s at the roofline; measured 0.5 s is half of it
    assert roofline_percent(1e9, 0.5, 4.0) == pytest.approx(50.0)
    with pytest.raises(ValueError, match="unknown pass"):
        bytes_moved("sideways", 1)


def test_memory_regime_by_working_set():
    mib = 2**20
    assert memory_regime("forward-train", 12 * mib, 32 * mib) == "cache"   # 24 MiB of x and y
    assert memory_regime("forward-train", 128 * mib, 32 * mib) == "dram"   # 256 MiB = 8x
    assert memory_regime("moments", 128 * mib, 32 * mib) == "mixed"
    assert memory_regime("moments", 1, None) is None                        # cache size unknown
    # the default matrix has a DRAM-sized forward-train in every layout (32 MiB cache)
    layouts = {c.layout for c in cases.CASES.values()
               if memory_regime("forward-train", 4 * c.numel(), 32 * mib) == "dram"}
    assert layouts == {"NCHW", "NHWC", "NC"}


def test_roofline_denominator_is_the_faster_stream():
    b = Bandwidth(read_gb_s=30.0, read_write_gb_s=25.0, array_bytes=1, runs=1, threads=1)
    assert b.roofline_gb_s == 30.0 and b.roofline_source == "read"
    assert b.to_dict()["roofline_gb_s"] == 30.0
    later = Bandwidth(read_gb_s=20.0, read_write_gb_s=28.0, array_bytes=1, runs=1, threads=1)
    best = b.best_with(later)
    assert (best.read_gb_s, best.read_write_gb_s, best.runs) == (30.0, 28.0, 2)


def test_attainable_percent_of_a_read_only_pass_is_100():
    b = Bandwidth(read_gb_s=30.0, read_write_gb_s=24.0, array_bytes=1, runs=1, threads=1)
    assert b.attainable_percent("moments") == pytest.approx(100.0)
    assert b.attainable_percent("forward-train") == pytest.approx(
        100 * (3 / 30) / (1 / 30 + 2 / 24))


def test_bandwidth_schedule_judges_each_group_by_the_probes_around_it():
    rates = iter([10.0, 30.0, 20.0, 5.0])
    runs_seen = []

    def fake(array_bytes, runs):
        runs_seen.append(runs)
        r = next(rates)
        return Bandwidth(r, r, 1, runs, 1)

    schedule = BandwidthSchedule(measure=fake, runs_at_ends=15, runs_between=5)
    assert [schedule.enter(k) for k in ("a", "a", "b", "c")] == [0, 0, 1, 2]
    denominators = schedule.finish()
    assert [d.roofline_gb_s for d in denominators] == [30.0, 30.0, 20.0]
    assert runs_seen == [15, 5, 5, 15]
    assert schedule.best().roofline_gb_s == 30.0


def test_stream_bodies_rate_is_their_median_sample():
    streams = StreamBodies(2**20)
    assert set(streams.bodies) == set(STREAM_BODIES)
    for body in streams.bodies.values():
        body()
    b = streams.bandwidth(Timing((9.0, 1e-3, 2e-3), 4), Timing((4e-3, 1.0, 1e-3), 2))
    assert b.read_gb_s == pytest.approx(2**20 / 2e-3 / 1e9)
    assert b.read_write_gb_s == pytest.approx(2 * 2**20 / 4e-3 / 1e9)
    assert (b.array_bytes, b.runs) == (2**20, 3)


def test_side_by_side_streams_are_timed_in_each_groups_rounds():
    """The report's rule: a host row is judged against the streams' medians from its own
    group's rounds; the best probe around the group stays as its peak."""
    peak = Bandwidth(read_gb_s=1e6, read_write_gb_s=1e6, array_bytes=1, runs=1, threads=1)
    schedule = BandwidthSchedule(2**20, measure=lambda array_bytes, runs: peak,
                                 side_by_side=True)
    timed = []
    timer = measure.round_robin_timer(3, 1e-4)

    def recording_timer(makers):
        timed.append(set(makers))
        return timer(makers)

    rows, failures = measure.run_section(
        measure.SECTIONS["pass"], [cases.TINY_CASES[0]], ["float32"], ["numpy", "cpu"],
        ["forward-eval", "moments"], recording_timer, schedule, progress=None)
    assert failures == []
    assert timed == [{"numpy", "cpu", *STREAM_BODIES}] * 2
    assert {r.implementation for r in rows} == {"numpy", "cpu"}    # the streams make no rows
    side = schedule.side_by_side_denominators()
    assert len(side) == 2 and all(b is not None and b.runs == 3 for b in side)
    peaks = schedule.finish()
    measure.apply_roofline(rows, schedule.roofline_denominators(), host_peaks=peaks)
    for row in rows:
        assert row.roofline_gb_s == side[row.bandwidth_group].roofline_gb_s
        assert row.roofline_percent == pytest.approx(
            roofline_percent(row.bytes, row.median_s, row.roofline_gb_s))
        assert row.ceiling_percent == pytest.approx(
            side[row.bandwidth_group].attainable_percent(row.operation))
        assert row.peak_roofline_gb_s == 1e6
        assert row.peak_roofline_percent == pytest.approx(
            roofline_percent(row.bytes, row.median_s, 1e6))
    # the pytest-benchmark suite cannot interleave: without side_by_side there are no streams
    assert BandwidthSchedule(2**20).stream_bodies() == {}


def test_bandwidth_measurement_runs():
    b = measure_bandwidth(4 * 2**20, runs=2)
    assert b.read_gb_s > 0 and b.read_write_gb_s > 0 and math.isfinite(b.roofline_gb_s)
    assert b.array_bytes == 4 * 2**20


# ----------------------------------------------------------------------------- timing, stats
def test_parse_case():
    assert cases.parse_case("nc-8192x1024") is cases.CASES["nc-8192x1024"]
    case = cases.parse_case("32x28x28x64:-1")
    assert case.shape == (32, 28, 28, 64) and case.axis == -1 and case.layout == "NHWC"
    assert cases.parse_case("256x1024").layout == "NC"
    for bad in ("huge", "8x4:5", "8,4"):
        with pytest.raises(ValueError):
            cases.parse_case(bad)


def test_time_body_warms_up_and_takes_the_median():
    calls = []
    timing = time_body(lambda: calls.append(1), repeats=3, min_sample_s=1e-4, warmup=1)
    assert timing.repeats == 3 and timing.number >= 1
    assert len(calls) == 1 + 1 + 3 * timing.number  # warm-up, calibration, samples
    assert 0 < timing.min_s <= timing.median_s


def test_time_round_robin_alternates_calibrated_samples():
    order = []

    def body(name, seconds):
        def run():
            order.append(name)
            time.sleep(seconds)
        return run

    # "slow" lasts a sample by itself (its calibration call is its first sample); "fast" is
    # repeated within each sample.
    timings = time_round_robin({"fast": body("fast", 0.0), "slow": body("slow", 0.003)},
                               repeats=3, min_sample_s=0.002, warmup=1)
    assert timings["slow"].number == 1 and timings["fast"].number > 1
    assert {n: t.repeats for n, t in timings.items()} == {"fast": 3, "slow": 3}
    assert order.count("slow") == 1 + 3  # warm-up, then 3 samples (the first is calibration)
    assert order.count("fast") == 1 + 1 + 3 * timings["fast"].number
    # after the calibrations, samples alternate: each round has one of each
    timed = order[order.index("slow") + 2:]
    runs = [name for i, name in enumerate(timed) if i == 0 or timed[i - 1] != name]
    assert runs == ["fast", "slow", "fast"]  # round 2 starts with "slow", which is done
    with pytest.raises(ValueError):
        time_round_robin({"a": body("a", 0.0)}, repeats=0)


def test_time_interleaved_times_single_calls_of_each_body():
    calls = {"a": 0, "b": 0}

    def body(name):
        def run():
            calls[name] += 1
        return run

    timings = time_interleaved({n: body(n) for n in calls}, calls=50, rounds=5, warmup=3)
    assert {n: t.repeats for n, t in timings.items()} == {"a": 50, "b": 50}
    assert calls == {"a": 53, "b": 53}
    assert all(t.number == 1 for t in timings.values())


def test_speedup_interval():
    rng = np.random.default_rng(1)
    ratio = speedup(rng.normal(2.0, 0.05, 200), rng.normal(1.0, 0.02, 200))
    assert ratio.low < ratio.value < ratio.high
    assert ratio.value == pytest.approx(2.0, rel=0.05) and ratio.high - ratio.low < 0.1
    assert speedup([3.0], [1.0]) == Ratio(3.0)  # one sample: no interval
    assert Ratio.from_dict(ratio.to_dict()) == ratio


# ----------------------------------------------------------------------------- targets
def _row(implementation, operation, shape, speedups=None, roofline=None, memory=None,
         section="pass", dtype="float32", ceiling=None):
    return Row(section=section, implementation=implementation, operation=operation,
               case="x".join(map(str, shape)), shape=tuple(shape), axis=1, layout="NC",
               dtype=dtype, median_s=1.0, min_s=1.0, q1_s=1.0, q3_s=1.0, samples=1,
               calls_per_sample=1, roofline_percent=roofline, ceiling_percent=ceiling,
               memory=memory, speedups={k: Ratio(v) for k, v in (speedups or {}).items()})


def test_no_row_slower_than_pytorch():
    target = TARGETS[0]
    rows = [_row("cpu", "forward-eval", (32, 16), {"torch": 1.4}),
            _row("cpu-out", "backward", (32, 16), {"torch": 0.8}),
            _row("numpy", "backward", (32, 16), {"torch": 0.1})]   # a reference: not judged
    verdict = target.evaluate(rows)
    assert verdict["status"] == "FAIL" and verdict["value"] == 0.8
    assert "cpu-out backward" in verdict["detail"] and "numpy" not in verdict["detail"]
    assert target.evaluate(rows[:1])["status"] == "PASS"
    skipped = target.evaluate([_row("cpu", "backward", (32, 16), {"numpy": 3.0})])
    assert skipped["status"] == "SKIP" and skipped["detail"] == NO_TORCH
    assert target.evaluate([])["detail"] == "the pass section did not run"


def test_roofline_targets_say_when_a_miss_is_under_its_ceiling():
    """A row that misses a roofline target shows its ceiling; when every miss has a ceiling
    under the threshold the detail says the target was out of reach. It still FAILs."""
    target = next(t for t in TARGETS if t.metric == "roofline" and t.operations == ("moments",))
    capped = _row("cpu", "moments", (9, 9), roofline=66.0, memory="dram", ceiling=71.0)
    verdict = target.evaluate([capped])
    assert verdict["status"] == "FAIL" and verdict["beyond_ceiling"] == 1
    assert "66 % (ceiling 71 %)" in verdict["detail"]
    assert "so the target was out of reach in this run" in verdict["detail"]
    reachable = _row("cpu", "moments", (8, 8), roofline=70.0, memory="dram", ceiling=95.0)
    verdict = target.evaluate([capped, reachable])
    assert verdict["status"] == "FAIL" and verdict["beyond_ceiling"] == 1
    assert "1 of them have a ceiling under the target" in verdict["detail"]
    assert "out of reach" not in verdict["detail"]
    unknown = _row("cpu", "moments", (7, 7), roofline=70.0, memory="dram")
    verdict = target.evaluate([unknown])
    assert verdict["beyond_ceiling"] == 0 and "ceiling" not in verdict["detail"]
    passed = _row("cpu", "moments", (6, 6), roofline=90.0, memory="dram", ceiling=80.0)
    assert target.evaluate([passed])["status"] == "PASS"


def test_stream_mix_adds_up_to_each_operations_streams():
    assert set(STREAM_MIX) == set(STREAMS)
    for operation, (reads, pairs) in STREAM_MIX.items():
        assert reads + 2 * pairs == STREAMS[operation], operation


def test_ceiling_of_a_fused_step_counts_its_reads_at_the_read_rate():
    b = Bandwidth(read_gb_s=35.0, read_write_gb_s=50.0, array_bytes=1, runs=1, threads=1)
    # bn-relu-step: 4 reads and 2 read+write pairs, 8 streams, judged against 50 GB/s
    assert b.attainable_percent("bn-relu-step") == pytest.approx(
        100 * (8 / 50) / (4 / 35 + 4 / 50))
    assert b.attainable_percent("moments") == pytest.approx(70.0)
    assert set(b.to_dict()["attainable_percent"]) == set(STREAMS)


def test_dram_roofline_targets_ignore_cache_resident_rows():
    target = next(t for t in TARGETS if t.metric == "roofline" and t.operations == ("backward",))
    rows = [_row("cpu", "backward", (8, 8), roofline=300.0, memory="cache"),
            _row("cpu", "backward", (9, 9), roofline=79.0, memory="dram")]
    assert target.evaluate(rows)["status"] == "FAIL"
    assert target.evaluate(rows[:1])["status"] == "SKIP"


def test_layer_targets_split_by_shape():
    fast, slow = {"torch": 3.5, "numpy-layer": 5.0}, {"torch": 2.5, "numpy-layer": 5.0}
    rows = [_row("fastbn", "train-step", (64, 128), fast, section="layer"),
            _row("fastbn", "train-step", (256, 512), slow, section="layer")]
    verdicts = {v["target"]: v["status"] for v in evaluate(rows, None)}
    assert verdicts["layer train step >= 3x PyTorch at 64x128, 32x16x8x8, 16x64x16x16"] == "PASS"
    assert verdicts["layer train step >= 2x PyTorch at 256x512, 256x1024"] == "PASS"
    assert verdicts["layer train step >= 4x the CS231n-style NumPy layer"] == "PASS"
    assert Target("x", "layer", "torch", 3.0, shapes=((256, 512),)).evaluate(rows)["status"] \
        == "FAIL"


def test_compile_time_verdict():
    assert compile_time_verdict(None)["status"] == "SKIP"
    assert compile_time_verdict({"warm_first_result_s": 0.4})["status"] == "PASS"
    assert compile_time_verdict({"warm_first_result_s": 0.7})["status"] == "FAIL"
    # the floor is reported, and a floor above the target says so
    above = compile_time_verdict({"warm_first_result_s": 0.7, "numba_floor_s": 0.55})
    assert above["status"] == "FAIL" and "0.55 s" in above["detail"]
    assert "trivial cached @njit function" in above["detail"]
    assert "out of fastbn's reach" in above["detail"]
    below = compile_time_verdict({"warm_first_result_s": 0.7, "numba_floor_s": 0.3})
    assert "0.30 s" in below["detail"] and "reach" not in below["detail"]
    # results recorded before the floor timed a first call name what their floor timed
    old = compile_time_verdict({"warm_first_result_s": 0.68, "import_floor_s": 0.37})
    assert "only imports NumPy, Numba and scipy.linalg takes 0.37 s" in old["detail"]


def test_timed_children_get_both_caches(monkeypatch):
    # Numba's cache where asked, and Python's bytecode cache on even where the shell turned it
    # off: a warm child must not compile fastbn's sources again.
    from fastbn.bench import compile_time
    monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", "1")
    env = compile_time.child_env("/some/cache")
    assert env["NUMBA_CACHE_DIR"] == "/some/cache"
    assert "PYTHONDONTWRITEBYTECODE" not in env
    assert os.environ["PYTHONDONTWRITEBYTECODE"] == "1"  # this process's own is untouched


def test_numba_floor_times_a_first_call_loaded_from_the_cache(tmp_path):
    # The floor is only a floor if its timed run loads its function from the cache and, like
    # any first call, loads Numba's registries (numba.np's lowering, scipy.linalg for BLAS).
    from fastbn.bench import compile_time
    module_dir = tmp_path / "module"
    module_dir.mkdir()
    compile_time.write_floor_kernel(str(module_dir))
    env = compile_time.child_env(str(tmp_path / "cache"))
    probe = (compile_time._FLOOR_CHILD
             + "; print(sum(floor_kernel.first_element.stats.cache_hits.values()), "
               "all(m in sys.modules for m in ('numba.np.arrayobj', 'scipy.linalg.cython_blas')))")
    runs = [subprocess.run([sys.executable, "-c", probe, str(module_dir)], env=env,
                           capture_output=True, text=True, check=True).stdout.split()
            for _ in range(2)]
    assert runs == [["0", "True"], ["1", "True"]]  # compiled, then loaded from the cache
    assert compile_time._numba_floor_s(str(tmp_path / "floor-cache")) > 0.0


def test_row_round_trips_through_json():
    row = _row("cpu", "backward", (4, 3), {"torch": 1.2}, roofline=50.0, memory="dram")
    row.times_s = (1.0, 2.0)
    back = Row.from_dict(json.loads(json.dumps(row.to_dict())))
    assert back == row and back.times_s == () and "times_s" not in row.to_dict()


def test_console_table_flags_rows_slower_than_pytorch():
    rows = [_row("cpu", "backward", (4, 3), {"torch": 0.5}, roofline=50.0, memory="cache",
                 ceiling=77.0),
            _row("cpu", "moments", (4, 3), {"torch": 2.0}, roofline=90.0, memory="dram",
                 ceiling=71.0)]
    rows[0].bytes = rows[1].bytes = 1
    lines = render.format_table(rows).splitlines()
    assert "% ceiling" in lines[0]
    assert render.SLOWER_FLAG in lines[2] and "cache" in lines[2] and "77 %" not in lines[2]
    assert render.SLOWER_FLAG not in lines[3] and "90 %" in lines[3] and "71 %" in lines[3]


# ----------------------------------------------------------------------------- CLI
TINY_RUN = ["--shapes", "4x3x5x5", "6x3", "--layer-shapes", "8x4", "--layer-calls", "20",
            "--dtypes", "float32", "--repeats", "2", "--min-sample-time", "0.0001",
            "--bandwidth-mib", "4", "--no-compile-time"]


def test_warm_only_child_calls_fastbn_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    calls = []
    real = measure.warm_timer

    def counting_timer():
        timer = real()

        def wrapped(makers):
            calls.extend(name for name in makers if name not in measure.NOT_FASTBN)
            return timer(makers)
        return wrapped
    monkeypatch.setattr(measure, "warm_timer", counting_timer)
    out = io.StringIO()
    assert cli.main([*TINY_RUN, "--warm-only"], out=out, progress=None) == 0
    assert out.getvalue() == "" and not any(tmp_path.iterdir())
    assert {"cpu", "cpu-out", "fastbn"} <= set(calls)
    assert "numpy" not in calls and "torch" not in calls


def test_report_cli_end_to_end(tmp_path):
    out = io.StringIO()
    status = cli.main([*TINY_RUN, "--backends", "numpy", "cpu", "cuda", "--out",
                       str(tmp_path / "results")], out=out, progress=None)
    assert status == 0
    text = out.getvalue()
    written = {line.split()[0]: Path(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if " written to " in line}
    json_path = written["results"]
    assert json_path.parent == (tmp_path / "results").resolve()
    results = json.loads(json_path.read_text())
    assert results["schema"] == SCHEMA
    for key in ("created", "command", "machine", "versions", "bandwidth", "bandwidth_probes",
                "settings", "rows", "skipped", "failures", "targets", "compile_time"):
        assert key in results
    assert {"cpu", "usable_cpus", "numba_threads", "numba_threading_layer",
            "thread_pools"} <= set(results["machine"])
    assert isinstance(results["machine"]["thread_pools"], (list, str))
    assert {"python", "numpy", "numba", "scipy", "torch"} <= set(results["versions"])
    # 2 shapes x 1 dtype x every pass, and every fused operation when fastbn has them
    fused_runs = fused.fused_api_missing() is None
    groups = 2 * len(PASSES) + (2 * len(fused.OPERATIONS) if fused_runs else 0)
    assert len(results["bandwidth"]["per_group_roofline_gb_s"]) == groups
    assert len(results["bandwidth_probes"]) == groups + 1  # start, between the groups, end
    assert len(results["bandwidth"]["per_group_peak_gb_s"]) == groups
    assert len(results["bandwidth_side_by_side"]) == groups
    assert all(b is not None for b in results["bandwidth_side_by_side"])
    rows = [Row.from_dict(r) for r in results["rows"]]
    pass_rows = [r for r in rows if r.section == "pass"]
    assert len(pass_rows) == 2 * len(PASSES) * 2  # 2 shapes, numpy and cpu
    skipped = {(s["section"], s["implementation"]) for s in results["skipped"]}
    assert ("pass", "cuda") in skipped                                   # never faked
    for row in pass_rows:
        assert row.median_s > 0 and row.memory == "cache"
        assert row.bytes == bytes_moved(row.operation, 4 * math.prod(row.shape))
        per_group = results["bandwidth"]["per_group_roofline_gb_s"]
        assert row.roofline_gb_s == per_group[row.bandwidth_group]
        assert row.roofline_percent == pytest.approx(roofline_percent(
            row.bytes, row.median_s, row.roofline_gb_s))
        peaks = results["bandwidth"]["per_group_peak_gb_s"]
        assert row.peak_roofline_gb_s == peaks[row.bandwidth_group]
        assert 0.0 < row.ceiling_percent <= 100.0 + 1e-9
        if row.implementation == "cpu":
            assert row.speedups["numpy"].low is not None
    fused_rows = [r for r in rows if r.section == "fused"]
    assert {r.implementation for r in fused_rows} >= ({"fused", "unfused"} if fused_runs
                                                       else set())
    assert all(r.bytes == bytes_moved(r.operation, 4 * math.prod(r.shape)) for r in fused_rows)
    layer_rows = [r for r in rows if r.section == "layer"]
    assert {r.implementation for r in layer_rows} >= {"fastbn", "numpy-layer"}
    assert all(r.samples == 20 and r.bytes is None for r in layer_rows)
    assert "% roofline" in text and "% ceiling" in text and "% peak" in text
    assert "pass cuda rows skipped" in text and "SKIP" in text
    if all(r.implementation != "torch" for r in rows):
        assert NO_TORCH in text

    png = written.get("chart")
    if png is not None:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    markdown = io.StringIO()
    assert cli.main(["--markdown", str(json_path), "--passes", "backward"], out=markdown) == 0
    lines = markdown.getvalue().splitlines()
    assert len([line for line in lines if line.startswith("| backward")]) == 2
    assert any(line.startswith("| 8x4 | float32 | train-step") for line in lines)
    assert "Reproduce: `python -m fastbn bench" in markdown.getvalue()


def test_markdown_refuses_other_schemas(tmp_path, capsys):
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"schema": "fastbn-bench/1", "rows": []}))
    with pytest.raises(SystemExit):
        cli.main(["--markdown", str(old)])
    assert SCHEMA in capsys.readouterr().err


def test_cuda_rows_use_the_gpu_roofline():
    """The cuda plumbing, in the simulator (the real report refuses simulator rows)."""
    reason = registry.unavailable_reason("cuda", allow_simulator=True)
    if reason is not None:
        pytest.skip(reason)
    from fastbn.bench.roofline import measure_gpu_bandwidth
    gpu = measure_gpu_bandwidth(8 * 1024, runs=1)
    host = Bandwidth(read_gb_s=10.0, read_write_gb_s=8.0, array_bytes=1, runs=1, threads=1)
    schedule = BandwidthSchedule(measure=lambda array_bytes, runs: host)
    rows, failures = measure.run_section(
        measure.SECTIONS["pass"], [cases.TINY_CASES[0]], ["float32"], ["numpy", "cuda"],
        ["forward-eval"], measure.round_robin_timer(1, 1e-4), schedule, progress=None)
    assert failures == []
    measure.apply_roofline(rows, schedule.finish(), gpu)
    by_impl = {r.implementation: r for r in rows}
    assert by_impl["cuda"].roofline_gb_s == gpu.roofline_gb_s
    assert by_impl["numpy"].roofline_gb_s == host.roofline_gb_s
    assert by_impl["cuda"].bandwidth_group is None


# ----------------------------------------------------------------------------- entry points
def _run_module(*args):
    return subprocess.run([sys.executable, "-m", "fastbn", *args], capture_output=True,
                          text=True, cwd=REPO)


def test_module_entry_point():
    done = _run_module("bench", "--help")
    assert done.returncode == 0 and "--quick" in done.stdout and "--out" in done.stdout


def test_version_comes_from_the_package_metadata():
    done = _run_module("--version")
    assert done.returncode == 0
    try:
        expected = metadata.version("fastbn")
    except metadata.PackageNotFoundError:
        expected = "unknown"
    assert done.stdout.startswith(f"fastbn {expected}")


def test_gpu_check_command_is_guarded():
    done = _run_module("gpu-check", "--help")
    if importlib.util.find_spec("fastbn.gpu_check") is None:
        assert done.returncode == 2 and "gpu-check is not available" in done.stderr
    else:
        assert "gpu-check is not available" not in done.stderr


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
