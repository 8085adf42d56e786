"""The benchmark registry: ``{pass: {implementation: setup}}``, shared by every benchmark driver.

A *setup* takes :class:`Inputs` and returns a zero-argument *body* that runs the pass once and
returns its outputs (already synchronized, for GPU implementations). Converting the inputs to the
implementation's arrays happens in the setup, so the body times only the work. The CLI report,
the pytest-benchmark suite (``bench/``) and the smoke test (``tests/test_bench_smoke.py``) all
iterate this one registry, so what the suite times is what the smoke test checks.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable

import numba
import numpy as np

import fastbn

from .roofline import PASSES

Body = Callable[[], Any]
Setup = Callable[["Inputs"], Body]

EPS = 1e-5
MOMENTUM = 0.1
DTYPES: tuple[str, ...] = ("float32", "float64")


# ----------------------------------------------------------------------------- cases
@dataclass(frozen=True)
class Case:
    """A tensor shape and the axis its features lie on."""

    name: str
    shape: tuple[int, ...]
    axis: int

    @property
    def layout(self) -> str:
        ndim = len(self.shape)
        axis = self.axis % ndim
        if ndim == 2 and axis == 1:
            return "NC"
        if ndim == 4:
            return {1: "NCHW", 3: "NHWC"}.get(axis, f"axis={self.axis}")
        return f"axis={self.axis}"

    @property
    def label(self) -> str:
        return f"{'x'.join(map(str, self.shape))} {self.layout}"

    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


def _case(shape: tuple[int, ...], axis: int, kind: str) -> Case:
    return Case(f"{kind}-{'x'.join(map(str, shape))}", shape, axis)


CASES: dict[str, Case] = {c.name: c for c in (
    _case((256, 64, 56, 56), 1, "nchw"),
    _case((64, 256, 14, 14), 1, "nchw"),
    _case((8192, 1024), 1, "nc"),
    _case((64, 56, 56, 64), -1, "nhwc"),
    _case((32, 16, 8, 8), 1, "small"),
)}
DEFAULT_CASES: tuple[str, ...] = tuple(CASES)

# Tiny stand-ins for each layout the kernels distinguish (planar, NC, channels-last 4-D).
TINY_CASES: tuple[Case, ...] = (
    Case("tiny-nchw", (4, 3, 5, 5), 1),
    Case("tiny-nc", (10, 3), 1),
    Case("tiny-nhwc", (2, 3, 4, 5), -1),
)

_SHAPE_PATTERN = re.compile(r"^\d+(x\d+)+(:-?\d+)?$")


def parse_case(text: str) -> Case:
    """A case by name (see ``CASES``) or as ``AxBx...[:axis]`` (axis 1 when omitted)."""
    if text in CASES:
        return CASES[text]
    if not _SHAPE_PATTERN.match(text):
        raise ValueError(f"unknown shape {text!r}: use one of {', '.join(CASES)} "
                         "or a shape such as 128x64x28x28 or 32x28x28x64:-1")
    dims, _, axis = text.partition(":")
    shape = tuple(int(d) for d in dims.split("x"))
    axis_value = int(axis) if axis else 1
    if not -len(shape) <= axis_value < len(shape):
        raise ValueError(f"axis {axis_value} is out of range for shape {shape}")
    return Case(text, shape, axis_value)


# ----------------------------------------------------------------------------- inputs
@dataclass
class Inputs:
    """Host (NumPy) inputs of one case and dtype, plus per-implementation converted copies."""

    case: Case
    dtype: np.dtype
    x: np.ndarray
    dy: np.ndarray
    gamma: np.ndarray
    beta: np.ndarray
    running_mean: np.ndarray
    running_var: np.ndarray
    mean: np.ndarray      # batch mean and invstd of x, as the backward receives them
    invstd: np.ndarray
    converted: dict[str, Any] = field(default_factory=dict)

    @property
    def tensor_bytes(self) -> int:
        return int(self.x.nbytes)


def make_inputs(case: Case, dtype: str | np.dtype, seed: int = 0) -> Inputs:
    """Random inputs for ``case`` (features with distinct means and scales, like activations)."""
    dtype = np.dtype(dtype)
    rng = np.random.default_rng(seed)
    features = case.shape[case.axis]
    feature_shape = [1] * len(case.shape)
    feature_shape[case.axis] = features
    x = rng.standard_normal(case.shape, dtype=dtype)
    x *= rng.uniform(0.5, 2.0, features).astype(dtype).reshape(feature_shape)
    x += rng.uniform(-1.0, 1.0, features).astype(dtype).reshape(feature_shape)
    dy = rng.standard_normal(case.shape, dtype=dtype)
    gamma = rng.uniform(0.5, 1.5, features).astype(dtype)
    beta = rng.uniform(-0.5, 0.5, features).astype(dtype)
    mean, var = fastbn.moments(x, axis=case.axis, backend="numpy")
    mean = mean.astype(np.float64)
    invstd = 1.0 / np.sqrt(var.astype(np.float64) + EPS)
    # running statistics for eval: near the batch's own, as after some training
    running_mean, running_var = mean.astype(dtype), (var + 1.0).astype(dtype)
    return Inputs(case, dtype, x, dy, gamma, beta, running_mean, running_var, mean, invstd)


# ----------------------------------------------------------------------------- implementations
def _cuda_simulated() -> bool:
    if os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0"):
        return True
    try:  # numba-cuda keeps its own config; older Numba kept it in numba.config
        from numba.cuda.core import config
        return bool(config.ENABLE_CUDASIM)
    except ImportError:
        return bool(getattr(numba.config, "ENABLE_CUDASIM", 0))


def _fastbn_unavailable(backend: str, allow_simulator: bool = False) -> str | None:
    try:  # what fastbn.available_backends() checks, keeping the backend's own words
        fastbn.backends.load(backend)
    except (ImportError, RuntimeError) as exc:
        return str(exc)
    if backend == "cuda":
        if _cuda_simulated():
            return None if allow_simulator else \
                "the Numba CUDA simulator is enabled (no GPU): CUDA timings would be fake"
        from numba import cuda
        if not cuda.is_available():
            return "no CUDA GPU or driver"
    return None


def _torch_unavailable() -> str | None:
    try:
        import torch  # noqa: F401
    except ImportError:
        return "PyTorch is not installed (pip install 'fastbn[torch]')"
    return None


@dataclass(frozen=True)
class Implementation:
    """How a row is labelled and whether it can run here."""

    name: str
    description: str
    short: str
    unavailable: Callable[[bool], str | None]


IMPLEMENTATIONS: dict[str, Implementation] = {impl.name: impl for impl in (
    Implementation("numpy", "fastbn backend 'numpy', the textbook formulas in whole-array NumPy",
                   "naive NumPy", lambda sim: _fastbn_unavailable("numpy")),
    Implementation("cpu",
                   "fastbn backend 'cpu' (Numba), a new output per call (from its buffer pool)",
                   "fastbn cpu", lambda sim: _fastbn_unavailable("cpu")),
    Implementation("cpu-out", "fastbn backend 'cpu' writing into a preallocated out= array",
                   "fastbn cpu, out=", lambda sim: _fastbn_unavailable("cpu")),
    Implementation("cuda", "fastbn backend 'cuda' on device arrays, synchronized after each call",
                   "fastbn cuda", lambda sim: _fastbn_unavailable("cuda", sim)),
    Implementation("torch", "F.batch_norm, its autograd backward and var_mean on the CPU, with "
                   "Numba's thread count", "PyTorch", lambda sim: _torch_unavailable()),
)}
BASELINE = "numpy"


def unavailable_reason(implementation: str, allow_simulator: bool = False) -> str | None:
    """Why ``implementation`` cannot be benchmarked here, or None when it can.

    ``allow_simulator`` lets the smoke test run the cuda bodies in Numba's simulator; the
    benchmarks never do, because simulator timings would be meaningless.
    """
    return IMPLEMENTATIONS[implementation].unavailable(allow_simulator)


# ----------------------------------------------------------------------------- fastbn bodies
def _fastbn_setups(backend: str, preallocated: bool = False) -> dict[str, Setup]:
    """Setups for one fastbn backend; the cuda one moves inputs to the GPU first.

    With ``preallocated`` the passes write into an ``out=`` array made (and first touched) in
    the setup, which leaves out the page faults of a fresh output; ``moments`` has no large
    output, so that variant has no moments entry.
    """

    def arrays(inputs: Inputs) -> dict[str, Any]:
        key = f"fastbn-{backend}"
        if key not in inputs.converted:
            names = ("x", "dy", "gamma", "beta", "running_mean", "running_var", "mean", "invstd")
            host = {name: getattr(inputs, name) for name in names}
            if backend == "cuda":
                from numba import cuda
                host = {name: cuda.to_device(value) for name, value in host.items()}
            inputs.converted[key] = host
        return inputs.converted[key]

    def synchronize() -> None:
        if backend == "cuda":
            from numba import cuda
            cuda.synchronize()

    def output(inputs: Inputs) -> Any:
        if not preallocated:
            return None
        out = np.zeros_like(inputs.x)  # zeros, not empty: the pages are touched here, untimed
        if backend == "cuda":
            from numba import cuda
            out = cuda.to_device(out)
        return out

    def copy_of(a: Any) -> Any:
        # running statistics are updated in place: each body gets its own
        if backend == "cuda":
            from numba import cuda
            return cuda.to_device(a.copy_to_host())
        return a.copy()

    def forward_train(inputs: Inputs) -> Body:
        a = arrays(inputs)
        running_mean, running_var = copy_of(a["running_mean"]), copy_of(a["running_var"])
        out = output(inputs)

        def body():
            y = fastbn.batch_norm(a["x"], running_mean, running_var, a["gamma"], a["beta"],
                                  training=True, momentum=MOMENTUM, eps=EPS,
                                  axis=inputs.case.axis, backend=backend, out=out)
            synchronize()
            return (y,)
        return body

    def forward_eval(inputs: Inputs) -> Body:
        a = arrays(inputs)
        out = output(inputs)

        def body():
            y = fastbn.batch_norm(a["x"], a["running_mean"], a["running_var"], a["gamma"],
                                  a["beta"], training=False, eps=EPS, axis=inputs.case.axis,
                                  backend=backend, out=out)
            synchronize()
            return (y,)
        return body

    def backward(inputs: Inputs) -> Body:
        a = arrays(inputs)
        out = output(inputs)

        def body():
            grads = fastbn.batch_norm_backward(a["dy"], a["x"], a["gamma"], a["mean"],
                                               a["invstd"], axis=inputs.case.axis,
                                               backend=backend, out=out)
            synchronize()
            return grads
        return body

    def moments(inputs: Inputs) -> Body:
        a = arrays(inputs)

        def body():
            stats = fastbn.moments(a["x"], axis=inputs.case.axis, backend=backend)
            synchronize()
            return stats
        return body

    setups = {"forward-train": forward_train, "forward-eval": forward_eval,
              "backward": backward, "moments": moments}
    if preallocated:
        del setups["moments"]
    return setups


# ----------------------------------------------------------------------------- torch bodies
def torch_threads() -> int:
    """Threads PyTorch gets: Numba's, so both sides of a comparison use the same cores."""
    return numba.get_num_threads()


def _torch_setups() -> dict[str, Setup]:
    """PyTorch on the CPU: F.batch_norm, its autograd backward, and var_mean for moments.

    Tensors share memory with the NumPy inputs. The feature axis is moved to dim 1 as a view,
    so NHWC input reaches F.batch_norm as a channels_last tensor, which PyTorch handles natively.
    """

    def tensors(inputs: Inputs) -> dict[str, Any]:
        import torch
        torch.set_num_threads(torch_threads())
        if "torch" not in inputs.converted:
            axis = inputs.case.axis
            inputs.converted["torch"] = {
                "x": torch.movedim(torch.from_numpy(inputs.x), axis, 1),
                "dy": torch.movedim(torch.from_numpy(inputs.dy), axis, 1),
                **{name: torch.from_numpy(getattr(inputs, name))
                   for name in ("gamma", "beta", "running_mean", "running_var")},
            }
        return inputs.converted["torch"]

    def restore(y: Any, inputs: Inputs) -> Any:
        import torch
        return torch.movedim(y, 1, inputs.case.axis)

    def forward_train(inputs: Inputs) -> Body:
        import torch.nn.functional as F
        t = tensors(inputs)
        running_mean, running_var = t["running_mean"].clone(), t["running_var"].clone()

        def body():
            y = F.batch_norm(t["x"], running_mean, running_var, t["gamma"], t["beta"],
                             training=True, momentum=MOMENTUM, eps=EPS)
            return (restore(y, inputs),)
        return body

    def forward_eval(inputs: Inputs) -> Body:
        import torch.nn.functional as F
        t = tensors(inputs)

        def body():
            y = F.batch_norm(t["x"], t["running_mean"], t["running_var"], t["gamma"],
                             t["beta"], training=False, eps=EPS)
            return (restore(y, inputs),)
        return body

    def backward(inputs: Inputs) -> Body:
        import torch
        import torch.nn.functional as F
        t = tensors(inputs)
        x = t["x"].detach().requires_grad_(True)
        gamma = t["gamma"].detach().clone().requires_grad_(True)
        beta = t["beta"].detach().clone().requires_grad_(True)
        # The forward graph is built once, untimed; autograd.grad (not .backward) returns fresh
        # gradients instead of accumulating into .grad, which would add a pass over x.
        y = F.batch_norm(x, None, None, gamma, beta, training=True, eps=EPS)

        def body():
            dx, dgamma, dbeta = torch.autograd.grad(y, (x, gamma, beta), t["dy"],
                                                    retain_graph=True)
            return restore(dx, inputs), dgamma, dbeta
        return body

    def moments(inputs: Inputs) -> Body:
        import torch
        t = tensors(inputs)
        dims = tuple(d for d in range(t["x"].dim()) if d != 1)

        def body():
            var, mean = torch.var_mean(t["x"], dim=dims, correction=0)
            return mean, var
        return body

    return {"forward-train": forward_train, "forward-eval": forward_eval,
            "backward": backward, "moments": moments}


def _build_registry() -> dict[str, dict[str, Setup]]:
    by_implementation = {
        "numpy": _fastbn_setups("numpy"),
        "cpu": _fastbn_setups("cpu"),
        "cpu-out": _fastbn_setups("cpu", preallocated=True),
        "cuda": _fastbn_setups("cuda"),
        "torch": _torch_setups(),
    }
    return {op: {impl: setups[op] for impl, setups in by_implementation.items() if op in setups}
            for op in PASSES}


REGISTRY: dict[str, dict[str, Setup]] = _build_registry()


def pairs() -> list[tuple[str, str]]:
    """Every (pass, implementation) the registry defines, in registry order."""
    return [(op, impl) for op, setups in REGISTRY.items() for impl in setups]


def to_numpy(value: Any) -> np.ndarray:
    """A host NumPy copy of one body output (NumPy, CUDA device array or torch tensor)."""
    if hasattr(value, "detach"):
        return value.detach().cpu().numpy()
    if hasattr(value, "copy_to_host"):
        return value.copy_to_host()
    return np.asarray(value)
