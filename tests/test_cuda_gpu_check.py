"""``python -m fastbn gpu-check`` end to end with tiny sizes (in the simulator without a GPU)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from fastbn import gpu_check

cb = pytest.importorskip("fastbn.backends.cuda")
if cb.unavailable_reason() is not None:
    pytest.skip(f"cuda backend unavailable: {cb.unavailable_reason()}", allow_module_level=True)


def _bench_takes_out() -> bool:
    help_text = subprocess.run([sys.executable, "-m", "fastbn", "bench", "--help"],
                               capture_output=True, text=True, cwd=gpu_check.REPO_ROOT).stdout
    return "--out" in help_text


def test_gpu_check_writes_one_report_of_every_step(tmp_path, capsys):
    status = gpu_check.main([
        "--out", str(tmp_path), "--bandwidth-mib", "0.01",
        "--pytest-args", "-x -k 'cuda and (launch_counts or stream)'",
        "--bench-args", "--quick --sections pass --shapes 8x4 --passes forward-train "
                        "--repeats 1 --no-plot "
                        "--no-compile-time --bandwidth-mib 1 --min-sample-time 0.001"])
    written = list(tmp_path.glob("gpu-check-*.json"))
    assert len(written) == 1
    report = json.loads(written[0].read_text())
    assert report["schema"] == gpu_check.SCHEMA
    assert report["device"]["name"]
    assert report["bandwidth"]["gb_s"] > 0
    tests = report["tests"]
    assert tests["returncode"] == 0, tests["output_tail"]
    assert " passed" in tests["summary"] and "failed" not in tests["summary"]
    interop = {check["name"]: check for check in report["interop"]}
    assert interop["numba-stream"]["ok"] is True, interop["numba-stream"]
    for name in ("torch", "torch-stream", "torch-requires-grad", "torch-second-gpu", "cupy"):
        assert "skipped" in interop[name] or interop[name]["ok"], interop[name]
    bench = report["bench"]
    assert "--backends cuda torch --out" in bench["command"]
    if _bench_takes_out():
        assert bench["returncode"] == 0, bench["output_tail"]
        assert status == 0 and report["passed"] is True
    printed = capsys.readouterr().out
    assert str(written[0]) in printed and "interop numba-stream: ok" in printed
