"""Speedups with confidence intervals: the ratio of two medians, bootstrapped with scipy.stats.

A speedup is ``median(baseline times) / median(candidate times)`` (above 1: the candidate is
faster). Its 95 % interval comes from :func:`scipy.stats.bootstrap` over both samples
(independent, not paired), so a reader can tell a 1.05x that is noise from one that is not.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
RESAMPLES = 2000


@dataclass(frozen=True)
class Ratio:
    """A speedup and its confidence interval (``low``/``high`` None when a side has fewer than
    two samples, e.g. a single timed call of a large shape)."""

    value: float
    low: float | None = None
    high: float | None = None

    def to_dict(self) -> dict:
        return {"value": self.value, "low": self.low, "high": self.high}

    @classmethod
    def from_dict(cls, d: dict | None) -> "Ratio | None":
        return None if d is None else cls(d["value"], d.get("low"), d.get("high"))

    def text(self, digits: int = 2) -> str:
        if self.low is None or self.high is None:
            return f"{self.value:.{digits}f}x"
        return f"{self.value:.{digits}f}x [{self.low:.{digits}f}, {self.high:.{digits}f}]"


def _ratio_of_medians(baseline, candidate, axis=-1):
    return np.median(baseline, axis=axis) / np.median(candidate, axis=axis)


def speedup(baseline_s: Sequence[float], candidate_s: Sequence[float],
            confidence: float = CONFIDENCE, seed: int = 0) -> Ratio:
    """How many times faster the candidate is than the baseline, from their timing samples."""
    baseline, candidate = np.asarray(baseline_s, float), np.asarray(candidate_s, float)
    value = float(_ratio_of_medians(baseline, candidate))
    if baseline.size < 2 or candidate.size < 2:
        return Ratio(value)
    result = stats.bootstrap((baseline, candidate), _ratio_of_medians, vectorized=True,
                             paired=False, confidence_level=confidence, n_resamples=RESAMPLES,
                             method="percentile", rng=np.random.default_rng(seed))
    low, high = result.confidence_interval
    return Ratio(value, float(low), float(high))
