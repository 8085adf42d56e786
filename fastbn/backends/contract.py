"""The backend contract: what the pipeline (``fastbn/_pipeline.py``) asks of a backend.

A backend is a module (``numpy_backend``, ``cpu``, ``cuda``) that computes on the *canonical
view* of an input: an array of shape ``(outer, C, inner)`` whose middle axis holds the features
(NCHW -> ``(N, C, H*W)``, NHWC and (N, C) -> ``(N*H*W, C, 1)``). The pipeline validates every
argument before it calls a backend, so backends check nothing the pipeline already checked.

Array kinds used below:

``Array3``
    A canonical view (or an output buffer of that shape) in the input's dtype: float16,
    float32 or float64. Backend-native (NumPy for numpy/cpu, a Numba device array for cuda).
``Vector``
    A per-feature array of shape ``(C,)``. Arguments may be float32 or float64 (a layer's
    parameters and buffers are in the layer's dtype); every vector a backend *returns* is
    float64. ``None`` for ``gamma``/``beta`` means 1 and 0.

Numerics every backend but ``numpy`` keeps: statistics accumulated in float64 (one pass over
memory, chunks merged with Chan's formula), per-feature coefficients in float64, each element
loaded in its dtype, combined in float64 and rounded once at the store. The ``numpy`` backend is
the naive textbook reference in the input's dtype (float16 computed in float32).

The math that turns per-feature statistics into per-feature coefficients lives once, in
``feature_math`` (scalar functions compiled for both the CPU and the GPU).

``tests/test_backend_contract.py`` runs every available backend against this contract.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np

Array3 = Any
Vector = Any

#: The functions every backend module defines (the conformance test checks them by name).
OPERATIONS = (
    "unavailable_reason", "asarray", "canonical", "output_view", "empty", "astype", "to_output",
    "to_host",
    "moments", "nonfinite_features", "update_running_stats", "normalize",
    "backward_reduce", "backward_elementwise",
    "forward_train", "backward",
)

#: What :meth:`Backend.forward_train` reports (plain ints: the cpu kernels return them too).
FORWARD_DONE = 0            # statistics, running update and y written
NONFINITE_STATISTICS = 1    # a feature's mean or variance is NaN/Inf: nothing else written
RUNNING_OVERFLOW = 2        # a running statistic would overflow its dtype: nothing else written


@runtime_checkable
class Backend(Protocol):
    """The functions of a backend module (``runtime_checkable``: ``isinstance(module, Backend)``
    checks that they exist)."""

    NAME: str

    # ------------------------------------------------------------------ arrays
    def unavailable_reason(self) -> str | None:
        """None where the backend can run here, else a sentence saying what is missing."""

    def asarray(self, x: Any, name: str) -> Any:
        """``x`` as the backend's array type, without a copy where it already is one.

        Host backends refuse GPU arrays (TypeError naming ``name``); the cuda backend copies
        host arrays to the device. The dtype is checked by the pipeline afterwards.
        """

    def canonical(self, x: Any, shape3: tuple[int, int, int]) -> Array3:
        """The C-contiguous ``(outer, C, inner)`` view of ``x`` (a copy only where no view is
        possible)."""

    def output_view(self, out: Any, shape3: tuple[int, int, int], name: str) -> Array3:
        """The canonical view of a caller's ``out=`` array, which results are written through.

        Raises TypeError/ValueError naming ``name`` unless it is a writeable C-contiguous array
        of the backend's kind (shape and dtype are checked by the pipeline).
        """

    def empty(self, shape3: tuple[int, int, int], dtype: np.dtype) -> Array3:
        """A new uninitialized output (the cpu backend recycles large ones)."""

    def astype(self, a: Any, dtype: np.dtype) -> Any:
        """``a`` (any shape) converted to ``dtype``: ``a`` itself where it already has it,
        else a new array of the backend's kind."""

    def to_output(self, y: Any, like: Any) -> Any:
        """``y`` in the kind of array the caller passed as ``like`` (e.g. back to the host)."""

    def to_host(self, a: Any) -> np.ndarray:
        """A NumPy copy of ``a`` (which the caller may keep and modify)."""

    # ------------------------------------------------------------------ statistics
    def moments(self, x3: Array3) -> tuple[Vector, Vector]:
        """Per-feature ``(mean, var)`` (biased variance) of ``x3``, float64 vectors.

        One pass over memory. NaN/Inf propagate into the result (no exception, no warning).
        """

    def nonfinite_features(self, mean: Vector, var: Vector) -> np.ndarray:
        """Host int64 array of the features whose ``mean`` or ``var`` is NaN or infinite."""

    def update_running_stats(self, running_mean: Vector | None, running_var: Vector | None,
                             mean: Vector, var: Vector, count: int, momentum: float) -> bool:
        """``running = (1 - momentum) * running + momentum * batch`` in place, with the
        unbiased batch variance ``var * count / (count - 1)``, all or nothing.

        Returns False, writing nothing, where a new value would not be finite in the running
        array's dtype; True after the update. ``running_mean``/``running_var`` may be None
        (skipped).
        """

    # ------------------------------------------------------------------ forward
    def normalize(self, x3: Array3, mean: Vector, var: Vector, gamma: Vector | None,
                  beta: Vector | None, eps: float, out3: Array3 | None = None,
                  residual3: Array3 | None = None, relu: bool = False
                  ) -> tuple[Array3, Vector]:
        """``y = act(x * scale + shift + residual)`` with ``scale = gamma * invstd`` and
        ``shift = beta - mean * scale``: one read of x (and of the residual), one write of y.

        ``act`` is ReLU where ``relu``, else the identity. ``out3`` (when given) receives y; it
        may be ``x3`` or ``residual3`` itself. Returns ``(y3, invstd)`` with ``invstd`` the
        float64 ``1 / sqrt(var + eps)``.
        """

    # ------------------------------------------------------------------ backward
    def backward_reduce(self, dy3: Array3, x3: Array3, gamma: Vector | None,
                        beta: Vector | None, mean: Vector, invstd: Vector, relu: bool = False,
                        y3: Array3 | None = None) -> tuple[Vector, Vector]:
        """The reduction pass of the backward: float64 ``(dgamma, dbeta)`` of this input,
        ``dbeta = sum(g)``, ``dgamma = sum(g * (x - mean)) * invstd`` over every axis but the
        features, where ``g = dy`` (``g = dy * (y > 0)`` where ``relu``).

        The ReLU mask is ``y3 > 0`` where ``y3`` (the forward output) is given, else it is
        recomputed from x with the forward's ``scale``/``shift`` (gamma, beta, mean, invstd).
        """

    def backward_elementwise(self, dy3: Array3, x3: Array3, gamma: Vector | None,
                             beta: Vector | None, mean: Vector, invstd: Vector,
                             dgamma: Vector, dbeta: Vector, count: int, batch_stats: bool,
                             out3: Array3 | None = None, relu: bool = False,
                             y3: Array3 | None = None, dresidual3: Array3 | None = None
                             ) -> Array3:
        """The elementwise pass: ``dx = g * dy_scale + x * x_scale + dx_shift`` with the
        coefficients of ``feature_math.backward_coefficients`` (from ``dgamma``/``dbeta``
        summed over all ``count`` values of the batch: the whole batch under MPI).

        ``g`` is masked as in :meth:`backward_reduce`. Where ``dresidual3`` is given it
        receives ``g`` (the gradient of the residual) in the same pass. ``out3`` (when given)
        receives dx and may be ``dy3`` or ``x3``. Returns dx's array.
        """

    # ------------------------------------------------------------------ whole passes
    def forward_train(self, x3: Array3, gamma: Vector | None, beta: Vector | None, eps: float,
                      running_mean: Vector | None, running_var: Vector | None,
                      momentum: float, out3: Array3 | None = None,
                      residual3: Array3 | None = None, relu: bool = False
                      ) -> tuple[Array3 | None, Vector, Vector, Vector | None, int]:
        """The training forward of one process: ``(y3, mean, var, invstd, status)``.

        Exactly :func:`fastbn.backends.composed.forward_train`: :meth:`moments`, the finite
        check, :meth:`update_running_stats` with ``count = outer * inner``, :meth:`normalize`;
        a backend may run them as one call (the cpu backend does). ``status``
        is :data:`FORWARD_DONE`, or :data:`NONFINITE_STATISTICS` / :data:`RUNNING_OVERFLOW`,
        where only ``mean`` and ``var`` are meaningful and nothing else was written.
        """

    def backward(self, dy3: Array3, x3: Array3, gamma: Vector | None, beta: Vector | None,
                 mean: Vector, invstd: Vector, count: int, batch_stats: bool,
                 out3: Array3 | None = None, relu: bool = False, y3: Array3 | None = None,
                 dresidual3: Array3 | None = None) -> tuple[Array3, Vector, Vector]:
        """The backward of one process: ``(dx3, dgamma, dbeta)``.

        Exactly :func:`fastbn.backends.composed.backward`: :meth:`backward_reduce`, then
        :meth:`backward_elementwise` with its sums (one compiled call on the cpu backend).
        """


def conforms(module: Any) -> list[str]:
    """The names of :data:`OPERATIONS` (and ``NAME``) that ``module`` lacks."""
    return [name for name in ("NAME",) + OPERATIONS if not hasattr(module, name)]
