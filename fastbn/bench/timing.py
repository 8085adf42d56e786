"""Timing a body: warm-up, then samples whose median is reported.

:func:`time_body` calibrates an inner loop so each sample lasts long enough for the clock.
:func:`time_round_robin` (the pass and fused sections) takes such calibrated samples of several
bodies in turn, one sample of each per round, and :func:`time_interleaved` (the layer section)
times single calls of several bodies in alternating rounds: either way a change of load on a
shared machine (the 2-core development VM ran 2x slower for seconds at a time) falls on every
implementation alike, so their ratio holds even when their times do not.
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
    return time_round_robin({"body": body}, repeats, min_sample_s, warmup)["body"]


def time_round_robin(bodies: dict[str, Body], repeats: int = 5, min_sample_s: float = 0.05,
                     warmup: int = 1) -> dict[str, Timing]:
    """Time several bodies in ``repeats`` rounds of one calibrated sample of each.

    Each body is warmed up and calibrated as in :func:`time_body`; then every round takes one
    sample of every body, starting with a different body each round.
    """
    if repeats < 1:
        raise ValueError("repeats must be at least 1")
    names = list(bodies)
    numbers: dict[str, int] = {}
    samples: dict[str, list[float]] = {name: [] for name in names}
    for name in names:
        body = bodies[name]
        for _ in range(warmup):
            body()
        start = time.perf_counter()
        body()
        first = time.perf_counter() - start
        if first >= min_sample_s:
            numbers[name] = 1
            samples[name].append(first)
        else:
            numbers[name] = max(1, math.ceil(min_sample_s / max(first, 1e-9)))
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            if len(samples[name]) == repeats:
                continue  # its calibration call was its first sample
            body, number = bodies[name], numbers[name]
            start = time.perf_counter()
            for _ in range(number):
                body()
            samples[name].append((time.perf_counter() - start) / number)
    return {name: Timing(tuple(samples[name]), numbers[name]) for name in names}


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
