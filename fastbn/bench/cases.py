"""What the benchmarks run on: shapes with their feature axis (cases), dtypes, and the inputs.

A *case* is a tensor shape and the axis its features lie on. The pass section (every pass of the
functional API against naive NumPy, PyTorch and the memory roofline) runs :data:`CASES` by
default; the layer section (small training batches, issue 9) runs :data:`LAYER_CASES`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

EPS = 1e-5
MOMENTUM = 0.1
DTYPES: tuple[str, ...] = ("float32", "float64")       # the default matrix
ALL_DTYPES: tuple[str, ...] = ("float16", "float32", "float64")  # what --dtypes accepts


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

    @property
    def num_features(self) -> int:
        return self.shape[self.axis]

    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


def _case(shape: tuple[int, ...], axis: int, kind: str) -> Case:
    return Case(f"{kind}-{'x'.join(map(str, shape))}", shape, axis)


# The default pass matrix. Each layout has a DRAM-sized case (working set of its passes at least
# 8x a 32 MiB last-level cache, see roofline.memory_regime) and the matrix keeps the mid-sized
# and cache-resident shapes where call overhead and cache bandwidth decide.
CASES: dict[str, Case] = {c.name: c for c in (
    _case((256, 64, 56, 56), 1, "nchw"),
    _case((64, 256, 14, 14), 1, "nchw"),
    _case((32768, 1024), 1, "nc"),
    _case((8192, 1024), 1, "nc"),
    _case((256, 56, 56, 64), -1, "nhwc"),
    _case((64, 56, 56, 64), -1, "nhwc"),
    _case((32, 16, 8, 8), 1, "small"),
)}
DEFAULT_CASES: tuple[str, ...] = tuple(CASES)

# Small training batches of NumPy users (issue 9): the layer section's shapes.
LAYER_CASES: tuple[Case, ...] = tuple(_case(shape, 1, kind) for shape, kind in (
    ((64, 128), "nc"), ((256, 512), "nc"), ((256, 1024), "nc"),
    ((32, 16, 8, 8), "nchw"), ((16, 64, 16, 16), "nchw"),
))

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


@dataclass
class Inputs:
    """Host (NumPy) inputs of one case and dtype, plus per-implementation converted copies.

    ``x`` and ``dy`` have the case's shape and dtype; the per-feature arrays have
    :func:`parameter_dtype` (the input's, float32 for float16 input), except ``mean``/``invstd``
    (float64 batch statistics, as the backward takes them).
    ``converted`` caches what an implementation made of them (device copies, tensors).
    """

    case: Case
    dtype: np.dtype
    x: np.ndarray
    dy: np.ndarray
    gamma: np.ndarray
    beta: np.ndarray
    running_mean: np.ndarray
    running_var: np.ndarray
    mean: np.ndarray
    invstd: np.ndarray
    converted: dict[str, Any] = field(default_factory=dict)

    @property
    def tensor_bytes(self) -> int:
        return int(self.x.nbytes)

    @property
    def residual(self) -> np.ndarray:
        """A shortcut tensor like ``x`` for the fused add (made on first use: only the fused
        rows need a third large array)."""
        if "residual" not in self.converted:
            rng = np.random.default_rng(self.x.size)
            self.converted["residual"] = _standard_normal(rng, self.case.shape, self.dtype)
        return self.converted["residual"]


def _standard_normal(rng: np.random.Generator, shape: tuple[int, ...],
                     dtype: np.dtype) -> np.ndarray:
    # float16 has no generator of its own: draw in float32 and round once
    draw_dtype = np.float32 if dtype == np.float16 else dtype
    return rng.standard_normal(shape, dtype=draw_dtype).astype(dtype, copy=False)


def parameter_dtype(dtype: np.dtype) -> np.dtype:
    """Dtype of gamma, beta and the running statistics for inputs of ``dtype``: the input's,
    except float16, whose parameters are float32 (fastbn keeps parameters and running
    statistics in float32 or float64, as mixed-precision training does)."""
    return np.dtype(np.float32) if dtype == np.float16 else dtype


def make_inputs(case: Case, dtype: str | np.dtype, seed: int = 0) -> Inputs:
    """Random inputs for ``case`` (features with distinct means and scales, like activations)."""
    dtype = np.dtype(dtype)
    rng = np.random.default_rng(seed)
    features = case.num_features
    feature_shape = [1] * len(case.shape)
    feature_shape[case.axis] = features
    params = parameter_dtype(dtype)
    x = _standard_normal(rng, case.shape, dtype)
    x *= rng.uniform(0.5, 2.0, features).astype(dtype).reshape(feature_shape)
    x += rng.uniform(-1.0, 1.0, features).astype(dtype).reshape(feature_shape)
    dy = _standard_normal(rng, case.shape, dtype)
    gamma = rng.uniform(0.5, 1.5, features).astype(params)
    beta = rng.uniform(-0.5, 0.5, features).astype(params)
    reduced = tuple(a for a in range(x.ndim) if a != case.axis % x.ndim)
    mean = x.mean(axis=reduced, dtype=np.float64)
    var = x.var(axis=reduced, dtype=np.float64)
    invstd = 1.0 / np.sqrt(var + EPS)
    # running statistics for eval: near the batch's own, as after some training
    running_mean, running_var = mean.astype(params), (var + 1.0).astype(params)
    return Inputs(case, dtype, x, dy, gamma, beta, running_mean, running_var,
                  mean, invstd)
