"""Timing a body: warm-up, then samples whose median is reported.

Two schemes. :func:`time_body` (the pass section) calibrates an inner loop so each sample lasts
long enough for the clock, one implementation after the other. :func:`time_interleaved` (the
layer section) times single calls of several bodies in alternating rounds, so that a change of
load on a shared machine falls on every implementation alike.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

Body = Callable[[], Any]


@dataclass(frozen=True)
class Timing:
    """Seconds per call over ``samples``, each the mean of ``number`` consecutive calls."""

    samples: tuple[float, ...]
    number: int

    @property
    def median_s(self) -> float:
        return float(np.median(self.samples))

    @property
    def min_s(self) -> float:
        return float(min(self.samples))

    @property
    def quartiles_s(self) -> tuple[float, float]:
        q1, q3 = np.percentile(self.samples, [25, 75])
        return float(q1), float(q3)

    @property
    def repeats(self) -> int:
        return len(self.samples)


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
    return Timing(tuple(samples), number)


def time_interleaved(bodies: dict[str, Body], calls: int = 1000, rounds: int = 10,
                     warmup: int = 20) -> dict[str, Timing]:
    """Time ``calls`` single calls of each body, in ``rounds`` alternating blocks.

    Each round times ``calls / rounds`` consecutive calls of every body, starting with a
    different body each round; the result per body is its ``calls`` single-call times (so the
    median is a median of calls, as issue 9's targets ask). ``warmup`` untimed calls of each
    body come first.
    """
    if calls < 1 or rounds < 1:
        raise ValueError("calls and rounds must be at least 1")
    names = list(bodies)
    for name in names:
        for _ in range(warmup):
            bodies[name]()
    per_round = math.ceil(calls / rounds)
    times: dict[str, list[float]] = {name: [] for name in names}
    clock = time.perf_counter
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            body, out = bodies[name], times[name]
            for _ in range(per_round):
                start = clock()
                body()
                out.append(clock() - start)
    return {name: Timing(tuple(t), 1) for name, t in times.items()}
