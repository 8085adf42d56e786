"""``python -m fastbn gpu-check``: verify the cuda backend on this machine's GPU in one command.

Steps, each recorded in one JSON file (``--out DIR``, default ``bench/results``):

1. ``device``: name, compute capability, GPU count, driver and runtime versions, memory.
2. ``bandwidth``: device-memory bandwidth from a copy kernel (read + write), the roofline the
   bench's percentages are read against.
3. ``tests``: the CUDA tests (``tests/test_cuda*.py`` and the cuda cases of the backend
   contract) on the device, in a subprocess.
4. ``interop``: Numba device arrays on a non-default stream; PyTorch and CuPy, where they are
   installed with CUDA: the caller's array type back, memory shared (same pointer), the caller's
   stream, a tensor that requires grad, a second GPU where there is one.
5. ``bench``: ``python -m fastbn bench --backends cuda torch --out DIR/bench`` (its JSON is
   embedded, with the cuda rows' % of roofline per pass).

Without a GPU it runs in Numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``), where only the
plumbing is checked: ``tests/test_cuda_gpu_check.py`` runs it there with tiny sizes. The exit
status is 0 when every step passed (interop checks that cannot run here count as skipped).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import shlex
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import numpy as np
from numba import cuda  # a module global, so the simulator can swap it inside _copy

DEFAULT_OUT = Path("bench/results")
SCHEMA = "fastbn-gpu-check/1"
REPO_ROOT = Path(__file__).resolve().parents[1]
TEST_FILES = ("tests/test_cuda.py", "tests/test_cuda_ptx.py", "tests/test_backend_contract.py")
TEST_SELECTION = "cuda"  # -k: every test of test_cuda*.py, the cuda cases of the contract


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fastbn gpu-check",
        description="Run the CUDA tests, interop checks and the GPU benchmark on this "
                    "machine's GPU and write one JSON report.")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, metavar="DIR",
                        help=f"directory for gpu-check-DATE.json and the bench output "
                             f"(default: {DEFAULT_OUT})")
    parser.add_argument("--bandwidth-mib", type=float, default=1024.0, metavar="MIB",
                        help="array size of the copy kernel (default: 1024)")
    parser.add_argument("--pytest-args", default=f"-k {TEST_SELECTION}", metavar="ARGS",
                        help=f"arguments after the test files (default: '-k {TEST_SELECTION}')")
    parser.add_argument("--bench-args", default="", metavar="ARGS",
                        help="extra arguments for python -m fastbn bench (e.g. '--quick')")
    parser.add_argument("--skip-tests", action="store_true", help="do not run the tests")
    parser.add_argument("--skip-bench", action="store_true", help="do not run the bench")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run every step and write the report; 0 when all passed."""
    args = build_parser().parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    created = dt.datetime.now(dt.timezone.utc)
    report: dict[str, Any] = {"schema": SCHEMA, "created": created.isoformat(),
                              "python": platform.python_version(),
                              "command": " ".join(["python -m fastbn gpu-check", *(argv or [])])}
    started = time.perf_counter()
    report["device"] = _step(device_info)
    report["bandwidth"] = _step(lambda: measure_bandwidth(int(args.bandwidth_mib * 2**20)))
    report["tests"] = ({"skipped": "--skip-tests"} if args.skip_tests
                       else _step(lambda: run_tests(shlex.split(args.pytest_args))))
    report["interop"] = _step(interop_checks)
    report["bench"] = ({"skipped": "--skip-bench"} if args.skip_bench
                       else _step(lambda: run_bench(args.out / "bench",
                                                    shlex.split(args.bench_args))))
    report["seconds"] = round(time.perf_counter() - started, 1)
    report["passed"] = all(_passed(report[step]) for step in
                           ("device", "bandwidth", "tests", "interop", "bench"))
    path = args.out / f"gpu-check-{created:%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    _print_summary(report, path)
    return 0 if report["passed"] else 1


def _step(run: Callable[[], Any]) -> Any:
    """A step's result, or its exception as ``{"error": ...}`` (the other steps still run)."""
    try:
        return run()
    except Exception as exc:  # noqa: BLE001 - a failed step is reported, not raised
        return {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}


def _passed(result: Any) -> bool:
    if isinstance(result, list):  # interop checks
        return all(_passed(check) for check in result)
    if not isinstance(result, dict):
        return True
    if "error" in result or result.get("ok") is False:
        return False
    return result.get("returncode", 0) == 0


def _print_summary(report: dict, path: Path) -> None:
    device = report["device"]
    print(f"device: {device.get('name', device.get('error'))}")
    bandwidth = report["bandwidth"]
    print(f"bandwidth: {bandwidth.get('gb_s', bandwidth.get('error'))} GB/s (copy kernel)")
    tests = report["tests"]
    print(f"tests: {tests.get('summary', tests.get('skipped', tests.get('error')))}")
    interop = report["interop"]
    checks = interop if isinstance(interop, list) else [interop]
    for check in checks:
        state = ("skipped" if "skipped" in check else "ok" if check.get("ok") else "FAILED")
        print(f"interop {check.get('name', '?')}: {state} "
              f"{check.get('skipped') or check.get('detail') or check.get('error') or ''}")
    bench = report["bench"]
    outcome = (bench.get("roofline_percent") or bench.get("skipped") or bench.get("error")
               or f"exit status {bench.get('returncode')}")
    print(f"bench: {outcome}")
    print(f"{'passed' if report['passed'] else 'FAILED'} in {report['seconds']} s; "
          f"report written to {path}")


# ----------------------------------------------------------------------------- device
def device_info() -> dict:
    from .backends import cuda as backend
    if backend.unavailable_reason() is not None:
        return {"error": backend.unavailable_reason()}
    if backend.SIMULATED:
        return {"name": "Numba CUDA simulator", "simulated": True}
    device = cuda.get_current_device()
    name = device.name.decode() if isinstance(device.name, bytes) else str(device.name)
    free, total = cuda.current_context().get_memory_info()
    from numba.cuda.cudadrv import driver, runtime
    return {"name": name, "simulated": False,
            "compute_capability": list(device.compute_capability), "gpus": len(cuda.gpus), "multiprocessors": device.MULTIPROCESSOR_COUNT,
            "driver_version": list(driver.driver.get_version()),
            "runtime_version": list(runtime.runtime.get_version()),
            "memory_bytes": int(total)}


def _copy(source, target):
    for j in range(cuda.grid(1), source.size, cuda.gridsize(1)):
        target[j] = source[j]


def measure_bandwidth(nbytes: int, repeats: int = 20) -> dict:
    """GB/s of a float32 copy kernel over ``nbytes`` (counting the read and the write)."""
    from .backends import cuda as backend
    copy = cuda.jit(_copy)
    n = max(1024, nbytes // 4)
    source = cuda.to_device(np.ones(n, np.float32))
    target = cuda.device_array(n, np.float32)
    threads = backend.THREADS_PER_BLOCK
    blocks = max(1, min(backend.MAX_BLOCKS * 4, -(-n // threads)))
    copy[blocks, threads](source, target)  # compile and warm up
    cuda.synchronize()
    repeats = 1 if backend.SIMULATED else repeats
    start = time.perf_counter()
    for _ in range(repeats):
        copy[blocks, threads](source, target)
    cuda.synchronize()
    seconds = (time.perf_counter() - start) / repeats
    if not np.array_equal(target.copy_to_host()[:4], np.ones(4, np.float32)):
        return {"error": "the copy kernel wrote wrong values"}
    return {"bytes_per_copy": 2 * n * 4, "seconds_per_copy": seconds,
            "gb_s": float(f"{2 * n * 4 / seconds / 1e9:.4g}"), "repeats": repeats}


# ----------------------------------------------------------------------------- tests
def run_tests(pytest_args: list[str]) -> dict:
    files = [f for f in TEST_FILES if (REPO_ROOT / f).exists()]
    if not files:
        return {"error": f"no CUDA tests under {REPO_ROOT} (run from a source checkout)"}
    command = [sys.executable, "-m", "pytest", *files, "-q", "-p", "no:cacheprovider",
               *pytest_args]
    started = time.perf_counter()
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True)
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    return {"command": " ".join(command[1:]), "returncode": result.returncode,
            "summary": lines[-1] if lines else "",
            "seconds": round(time.perf_counter() - started, 1),
            "output_tail": (result.stdout + result.stderr)[-4000:]}


# ----------------------------------------------------------------------------- interop
def interop_checks() -> list[dict]:
    return [_check(name, check) for name, check in (
        ("numba-stream", _numba_stream), ("torch", _torch), ("torch-stream", _torch_stream),
        ("torch-requires-grad", _torch_requires_grad), ("torch-second-gpu", _torch_second_gpu),
        ("cupy", _cupy))]


class _Skip(Exception):
    """A check that cannot run here (a framework or a second GPU missing)."""


def _check(name: str, run: Callable[[], str]) -> dict:
    try:
        return {"name": name, "ok": True, "detail": run()}
    except _Skip as why:
        return {"name": name, "skipped": str(why)}
    except Exception as exc:  # noqa: BLE001 - reported in the JSON
        return {"name": name, "ok": False, "error": f"{type(exc).__name__}: {exc}",
                "traceback": traceback.format_exc()}


def _reference_y(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    mean = x.mean(axis=(0, 2, 3), keepdims=True)
    var = x.var(axis=(0, 2, 3), keepdims=True)
    return (x - mean) / np.sqrt(var + 1e-5)


def _close(y: np.ndarray, x: np.ndarray) -> None:
    error = float(np.abs(np.asarray(y, np.float64) - _reference_y(x)).max())
    if not error < 1e-4:
        raise AssertionError(f"max error {error:.3g} against the float64 reference")


def _numba_stream() -> str:
    from numba import cuda

    from . import batch_norm_forward
    x = np.random.default_rng(0).standard_normal((4, 3, 2, 2)).astype(np.float32)
    stream = cuda.stream()
    device_x = cuda.device_array(x.shape, x.dtype, stream=stream)
    device_x.copy_to_device(x, stream=stream)
    y, mean, invstd = batch_norm_forward(device_x, backend="cuda")
    if getattr(y, "stream", None) is not stream:
        raise AssertionError("the output is not bound to the input's stream")
    _close(y.copy_to_host(stream=stream), x)
    return "results on the input's non-default stream, correct"


def _torch_module():
    try:
        import torch
    except ImportError as exc:
        raise _Skip("torch is not installed") from exc
    if not torch.cuda.is_available():
        raise _Skip("torch has no CUDA device here")
    return torch


def _torch() -> str:
    torch = _torch_module()
    from . import batch_norm_forward
    from .backends import cuda as backend
    x = torch.randn(8, 16, 5, 5, device="cuda")
    y, mean, invstd = batch_norm_forward(x)
    if not (isinstance(y, torch.Tensor) and y.device == x.device):
        raise AssertionError(f"got {type(y).__name__} on {getattr(y, 'device', '?')}")
    _close(y.cpu().numpy(), x.cpu().numpy())
    expected = torch.nn.functional.batch_norm(x, None, None, training=True, eps=1e-5)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    y3 = backend.empty((2, 3, 4), np.float32)
    wrapped = backend.to_output(y3, x)
    if wrapped.data_ptr() != y3.__cuda_array_interface__["data"][0]:
        raise AssertionError("to_output copied instead of sharing memory")
    return "torch tensor back, same device, shares memory, matches torch batch_norm"


def _torch_stream() -> str:
    torch = _torch_module()
    from . import batch_norm_forward
    from .backends import cuda as backend
    side = torch.cuda.Stream()
    base = torch.randn(64, 32, 16, 16, device="cuda")
    torch.cuda.synchronize()
    with torch.cuda.stream(side):
        x = base * 3.0 + 1.0  # queued on the side stream, which does not wait for the default
        imported = backend.asarray(x, "x")
        handle = backend._stream_key(imported.stream)
        if handle != side.cuda_stream:
            raise AssertionError(f"imported on stream {handle}, torch's is {side.cuda_stream}")
        y, _, _ = batch_norm_forward(x)
        expected = torch.nn.functional.batch_norm(x, None, None, training=True, eps=1e-5)
    side.synchronize()
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    return "kernels on torch's current (side) stream, results correct"


def _torch_requires_grad() -> str:
    torch = _torch_module()
    from . import batch_norm_forward
    x = torch.randn(4, 3, 2, 2, device="cuda", requires_grad=True)
    y, _, _ = batch_norm_forward(x)
    _close(y.cpu().numpy(), x.detach().cpu().numpy())
    return "a tensor that requires grad is used through a detached view"


def _torch_second_gpu() -> str:
    torch = _torch_module()
    if torch.cuda.device_count() < 2:
        raise _Skip("one GPU only")
    from . import batch_norm_forward
    x = torch.randn(8, 4, 3, 3, device="cuda:1")
    y, _, _ = batch_norm_forward(x)
    if y.device != x.device:
        raise AssertionError(f"result on {y.device}, input on {x.device}")
    _close(y.cpu().numpy(), x.cpu().numpy())
    return "input on cuda:1 computed and returned on cuda:1"


def _cupy() -> str:
    try:
        import cupy
    except ImportError as exc:
        raise _Skip("cupy is not installed") from exc
    from . import batch_norm_forward
    from .backends import cuda as backend
    with cupy.cuda.Stream(non_blocking=True) as stream:
        x = cupy.random.standard_normal((8, 16, 5, 5), dtype=cupy.float32)
        handle = backend._stream_key(backend.asarray(x, "x").stream)
        if handle != stream.ptr:
            raise AssertionError(f"imported on stream {handle}, cupy's is {stream.ptr}")
        y, _, _ = batch_norm_forward(x)
    stream.synchronize()
    if not isinstance(y, cupy.ndarray):
        raise AssertionError(f"got {type(y).__name__}")
    _close(cupy.asnumpy(y), cupy.asnumpy(x))
    return "cupy array back, on cupy's current stream, correct"


# ----------------------------------------------------------------------------- bench
def run_bench(out: Path, extra: list[str]) -> dict:
    command = [sys.executable, "-m", "fastbn", "bench", "--backends", "cuda", "torch",
               "--out", str(out), *extra]
    started = time.perf_counter()
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True)
    record: dict[str, Any] = {"command": " ".join(["python", *command[1:]]),
                              "returncode": result.returncode,
                              "seconds": round(time.perf_counter() - started, 1),
                              "output_tail": (result.stdout + result.stderr)[-4000:]}
    written = sorted(out.glob("*.json"), key=lambda p: p.stat().st_mtime) if out.exists() else []
    if result.returncode == 0 and written:
        results = json.loads(written[-1].read_text())
        record["json"] = str(written[-1])
        record["results"] = results
        record["roofline_percent"] = roofline_by_pass(results)
    return record


def roofline_by_pass(results: dict) -> dict:
    """The cuda rows' % of roofline, per pass: ``{pass: {"min", "median", "max"}}``."""
    by_pass: dict[str, list[float]] = {}
    for row in results.get("rows", []):
        if row.get("implementation") == "cuda" and row.get("roofline_percent") is not None:
            name = str(row.get("operation", row.get("pass")))
            by_pass.setdefault(name, []).append(float(row["roofline_percent"]))
    return {name: {"min": min(v), "median": float(np.median(v)), "max": max(v)}
            for name, v in by_pass.items()}


if __name__ == "__main__":
    sys.exit(main())
