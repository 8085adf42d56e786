"""Timing a body: warm-up, calibrated inner loop, median of repeats."""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass

from .registry import Body


@dataclass(frozen=True)
class Timing:
    """Seconds per call: median and best over ``repeats`` samples of ``number`` calls each."""

    median_s: float
    min_s: float
    repeats: int
    number: int


def time_body(body: Body, repeats: int = 5, min_sample_s: float = 0.05,
              warmup: int = 1) -> Timing:
    """Time ``body`` after ``warmup`` untimed calls (JIT compilation, cache loads, page faults).

    A sample runs the body ``number`` times, with ``number`` chosen so a sample lasts at least
    ``min_sample_s`` (so the clock's resolution and call overhead of tiny shapes do not
    dominate). The first timed call also calibrates ``number``; when a single call already
    lasts long enough it counts as the first sample, which saves a call on large shapes.
    """
    if repeats < 1:
        raise ValueError("repeats must be at least 1")
    for _ in range(warmup):
        body()
    start = time.perf_counter()
    body()
    first = time.perf_counter() - start
    samples: list[float] = []
    if first >= min_sample_s:
        number = 1
        samples.append(first)
    else:
        number = max(1, math.ceil(min_sample_s / max(first, 1e-9)))
    while len(samples) < repeats:
        start = time.perf_counter()
        for _ in range(number):
            body()
        samples.append((time.perf_counter() - start) / number)
    return Timing(statistics.median(samples), min(samples), repeats, number)
