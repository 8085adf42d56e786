"""The pass section's registry: ``{pass: {implementation: setup}}``, shared by every driver.

A *setup* takes :class:`~fastbn.bench.cases.Inputs` and returns a zero-argument *body* that runs
the pass once and returns its outputs (already synchronized, for GPU implementations).
Converting the inputs to the implementation's arrays happens in the setup, so the body times
only the work. The CLI report, the pytest-benchmark suite (``bench/``) and the smoke test
(``tests/test_bench_smoke.py``) all iterate this one registry, so what the suite times is what
the smoke test checks.

Where an implementation runs is a :class:`Placement` (host or CUDA device): the setups are
written once and ask their placement to move arrays and to synchronize, so there is no
per-device branch in them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

import numba
import numpy as np

import fastbn

from .cases import EPS, MOMENTUM, Inputs
from .roofline import PASSES
from .timing import Body

Setup = Callable[[Inputs], Body]


# ----------------------------------------------------------------------------- placements
@dataclass(frozen=True)
class Placement:
    """Where an implementation's arrays live: how to put a host array there, how to wait for
    queued work (a no-op on the host) and why it cannot be used here (None when it can; the
    argument says whether Numba's CUDA simulator counts)."""

    name: str
    put: Callable[[np.ndarray], Any]
    synchronize: Callable[[], None]
    unavailable: Callable[[bool], str | None]


def _cuda_simulated() -> bool:
    if os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0"):
        return True
    try:  # numba-cuda keeps its own config; older Numba kept it in numba.config
        from numba.cuda.core import config
        return bool(config.ENABLE_CUDASIM)
    except ImportError:
        return bool(getattr(numba.config, "ENABLE_CUDASIM", 0))


def _cuda_put(a: np.ndarray) -> Any:
    from numba import cuda
    return cuda.to_device(a)


def _cuda_synchronize() -> None:
    from numba import cuda
    cuda.synchronize()


def _cuda_unavailable(allow_simulator: bool) -> str | None:
    if _cuda_simulated():
        return None if allow_simulator else \
            "the Numba CUDA simulator is enabled (no GPU): CUDA timings would be fake"
    from numba import cuda
    return None if cuda.is_available() else "no CUDA GPU or driver"


HOST = Placement("host", lambda a: a, lambda: None, lambda allow_simulator: None)
CUDA = Placement("cuda", _cuda_put, _cuda_synchronize, _cuda_unavailable)


def _torch_synchronize(device: str) -> Callable[[], None]:
    def synchronize() -> None:
        import torch
        torch.cuda.synchronize()
    return {"cpu": lambda: None, "cuda": synchronize}[device]


# ----------------------------------------------------------------------------- availability
def _fastbn_unavailable(backend: str, placement: Placement,
                        allow_simulator: bool = False) -> str | None:
    try:  # what fastbn.available_backends() checks, keeping the backend's own words
        fastbn.backends.load(backend)
    except (ImportError, RuntimeError) as exc:
        return str(exc)
    return placement.unavailable(allow_simulator)


def torch_unavailable(device: str = "cpu") -> str | None:
    """Why PyTorch cannot run on ``device`` ("cpu" or "cuda") here, or None."""
    try:
        import torch
    except ImportError:
        return "PyTorch is not installed (pip install 'fastbn[torch]')"
    if device == "cuda" and not torch.cuda.is_available():
        return f"PyTorch {torch.__version__} has no usable CUDA device"
    return None


def torch_threads() -> int:
    """Threads PyTorch gets: Numba's, so both sides of a comparison use the same cores."""
    return numba.get_num_threads()


# ----------------------------------------------------------------------------- fastbn bodies
def fastbn_setups(backend: str, placement: Placement,
                  preallocated: bool = False) -> dict[str, Setup]:
    """Setups for one fastbn backend on ``placement``.

    With ``preallocated`` the passes write into an ``out=`` array made (and first touched) in
    the setup, which leaves out the page faults of a fresh output; ``moments`` has no large
    output, so that variant has no moments entry.
    """
    key = f"fastbn-{backend}-{placement.name}"

    def arrays(inputs: Inputs) -> dict[str, Any]:
        if key not in inputs.converted:
            names = ("x", "dy", "gamma", "beta", "running_mean", "running_var", "mean", "invstd")
            inputs.converted[key] = {name: placement.put(getattr(inputs, name))
                                     for name in names}
        return inputs.converted[key]

    def output(inputs: Inputs) -> Any:
        # zeros, not empty: the pages are touched here, untimed
        return placement.put(np.zeros_like(inputs.x)) if preallocated else None

    def forward_train(inputs: Inputs) -> Body:
        a = arrays(inputs)
        # running statistics are updated in place: each body gets its own
        running_mean = placement.put(inputs.running_mean.copy())
        running_var = placement.put(inputs.running_var.copy())
        out = output(inputs)

        def body():
            y = fastbn.batch_norm(a["x"], running_mean, running_var, a["gamma"], a["beta"],
                                  training=True, momentum=MOMENTUM, eps=EPS,
                                  axis=inputs.case.axis, backend=backend, out=out)
            placement.synchronize()
            return (y,)
        return body

    def forward_eval(inputs: Inputs) -> Body:
        a = arrays(inputs)
        out = output(inputs)

        def body():
            y = fastbn.batch_norm(a["x"], a["running_mean"], a["running_var"], a["gamma"],
                                  a["beta"], training=False, eps=EPS, axis=inputs.case.axis,
                                  backend=backend, out=out)
            placement.synchronize()
            return (y,)
        return body

    def backward(inputs: Inputs) -> Body:
        a = arrays(inputs)
        out = output(inputs)

        def body():
            grads = fastbn.batch_norm_backward(a["dy"], a["x"], a["gamma"], a["mean"],
                                               a["invstd"], axis=inputs.case.axis,
                                               backend=backend, out=out)
            placement.synchronize()
            return grads
        return body

    def moments(inputs: Inputs) -> Body:
        a = arrays(inputs)

        def body():
            stats = fastbn.moments(a["x"], axis=inputs.case.axis, backend=backend)
            placement.synchronize()
            return stats
        return body

    setups = {"forward-train": forward_train, "forward-eval": forward_eval,
              "backward": backward, "moments": moments}
    if preallocated:
        del setups["moments"]
    return setups


# ----------------------------------------------------------------------------- torch bodies
def torch_tensors(inputs: Inputs, device: str) -> dict[str, Any]:
    """The inputs as torch tensors on ``device``, feature axis moved to dim 1 as a view (so
    NHWC input reaches PyTorch as a channels_last tensor, which it handles natively)."""
    import torch
    key = f"torch-{device}"
    if key not in inputs.converted:
        axis = inputs.case.axis

        def tensor(a: np.ndarray) -> Any:
            return torch.from_numpy(a).to(device)

        inputs.converted[key] = {
            "x": torch.movedim(tensor(inputs.x), axis, 1),
            "dy": torch.movedim(tensor(inputs.dy), axis, 1),
            **{name: tensor(getattr(inputs, name))
               for name in ("gamma", "beta", "running_mean", "running_var")},
        }
    return inputs.converted[key]


def torch_setups(device: str) -> dict[str, Setup]:
    """PyTorch on ``device``: F.batch_norm (cuDNN on a GPU), its autograd backward, var_mean."""
    synchronize = _torch_synchronize(device)

    def prepared(inputs: Inputs) -> dict[str, Any]:
        import torch
        torch.set_num_threads(torch_threads())
        return torch_tensors(inputs, device)

    def restore(y: Any, inputs: Inputs) -> Any:
        import torch
        return torch.movedim(y, 1, inputs.case.axis)

    def forward_train(inputs: Inputs) -> Body:
        import torch.nn.functional as F
        t = prepared(inputs)
        running_mean, running_var = t["running_mean"].clone(), t["running_var"].clone()

        def body():
            y = F.batch_norm(t["x"], running_mean, running_var, t["gamma"], t["beta"],
                             training=True, momentum=MOMENTUM, eps=EPS)
            synchronize()
            return (restore(y, inputs),)
        return body

    def forward_eval(inputs: Inputs) -> Body:
        import torch.nn.functional as F
        t = prepared(inputs)

        def body():
            y = F.batch_norm(t["x"], t["running_mean"], t["running_var"], t["gamma"],
                             t["beta"], training=False, eps=EPS)
            synchronize()
            return (restore(y, inputs),)
        return body

    def backward(inputs: Inputs) -> Body:
        import torch
        import torch.nn.functional as F
        t = prepared(inputs)
        x = t["x"].detach().requires_grad_(True)
        gamma = t["gamma"].detach().clone().requires_grad_(True)
        beta = t["beta"].detach().clone().requires_grad_(True)
        # The forward graph is built once, untimed; autograd.grad (not .backward) returns fresh
        # gradients instead of accumulating into .grad, which would add a pass over x.
        y = F.batch_norm(x, None, None, gamma, beta, training=True, eps=EPS)

        def body():
            dx, dgamma, dbeta = torch.autograd.grad(y, (x, gamma, beta), t["dy"],
                                                    retain_graph=True)
            synchronize()
            return restore(dx, inputs), dgamma, dbeta
        return body

    def moments(inputs: Inputs) -> Body:
        import torch
        t = prepared(inputs)
        dims = tuple(d for d in range(t["x"].dim()) if d != 1)

        def body():
            var, mean = torch.var_mean(t["x"], dim=dims, correction=0)
            synchronize()
            return mean, var
        return body

    return {"forward-train": forward_train, "forward-eval": forward_eval,
            "backward": backward, "moments": moments}


# ----------------------------------------------------------------------------- the registry
@dataclass(frozen=True)
class Implementation:
    """One column of the comparison: its label, where it runs and whether it can run here.

    ``device`` ("host" or "gpu") picks the roofline denominator (host or GPU bandwidth) and the
    PyTorch implementation it is compared with (:data:`TORCH_ON`).
    """

    name: str
    description: str
    short: str
    device: str
    unavailable: Callable[[bool], str | None]
    setups: dict[str, Setup]


IMPLEMENTATIONS: dict[str, Implementation] = {impl.name: impl for impl in (
    Implementation("numpy", "fastbn backend 'numpy', the textbook formulas in whole-array NumPy",
                   "naive NumPy", "host", lambda sim: _fastbn_unavailable("numpy", HOST),
                   fastbn_setups("numpy", HOST)),
    Implementation("cpu",
                   "fastbn backend 'cpu' (Numba), a new output per call (from its buffer pool)",
                   "fastbn cpu", "host", lambda sim: _fastbn_unavailable("cpu", HOST),
                   fastbn_setups("cpu", HOST)),
    Implementation("cpu-out", "fastbn backend 'cpu' writing into a preallocated out= array",
                   "fastbn cpu, out=", "host", lambda sim: _fastbn_unavailable("cpu", HOST),
                   fastbn_setups("cpu", HOST, preallocated=True)),
    Implementation("cuda", "fastbn backend 'cuda' on device arrays, synchronized after each call",
                   "fastbn cuda", "gpu", lambda sim: _fastbn_unavailable("cuda", CUDA, sim),
                   fastbn_setups("cuda", CUDA)),
    Implementation("torch", "F.batch_norm, its autograd backward and var_mean on the CPU, with "
                   "Numba's thread count", "PyTorch", "host",
                   lambda sim: torch_unavailable("cpu"), torch_setups("cpu")),
    Implementation("torch-cuda", "F.batch_norm (cuDNN), its autograd backward and var_mean on "
                   "the GPU, synchronized after each call", "PyTorch GPU", "gpu",
                   lambda sim: torch_unavailable("cuda"), torch_setups("cuda")),
)}
IMPLEMENTATION_ORDER: tuple[str, ...] = tuple(IMPLEMENTATIONS)
BASELINE = "numpy"
# The PyTorch implementation each device's rows are compared with.
TORCH_ON: dict[str, str] = {"host": "torch", "gpu": "torch-cuda"}
TORCH_IMPLEMENTATIONS = frozenset(TORCH_ON.values())

REGISTRY: dict[str, dict[str, Setup]] = {
    op: {name: impl.setups[op] for name, impl in IMPLEMENTATIONS.items() if op in impl.setups}
    for op in PASSES}


def unavailable_reason(implementation: str, allow_simulator: bool = False) -> str | None:
    """Why ``implementation`` cannot be benchmarked here, or None when it can.

    ``allow_simulator`` lets the smoke test run the cuda bodies in Numba's simulator; the
    benchmarks never do, because simulator timings would be meaningless.
    """
    return IMPLEMENTATIONS[implementation].unavailable(allow_simulator)


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
