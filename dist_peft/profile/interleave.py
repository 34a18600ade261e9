"""The one timing harness of the profiler's comparison mode and ``tools/bench_methods.py``: configurations run
one step at a time, round-robin, in one process, so that machine noise (other jobs, clock changes, thermal
state) hits every configuration alike; compare ratios from one run, never absolute times across runs."""

from __future__ import annotations

import statistics
from typing import Callable, Sequence, TypeVar

T = TypeVar("T")


def interleave(subjects: Sequence[T], warmup: int, rounds: int, step: Callable[[T, bool], None]) -> None:
    """``warmup + rounds`` rounds; round r calls ``step(subject, measured=r >= warmup)`` for every subject, in
    order on even rounds and reversed on odd ones (no configuration always follows the same one). Every rank of
    a distributed run calls the same sequence (the steps hold collectives)."""
    for r in range(warmup + rounds):
        for subject in subjects if r % 2 == 0 else reversed(subjects):
            step(subject, r >= warmup)


def paired_ratio(steps: Sequence[float], base: Sequence[float]) -> float:
    """The median over rounds of ``steps[i] / base[i]``: two subjects' measured steps of one ``interleave`` run lie
    within one round of each other, so the ratio cancels the machine's drift between rounds (this CPU's speed
    moved 12% between two runs of one invocation), which a ratio of medians does not."""
    return statistics.median(a / b for a, b in zip(steps, base, strict=True))
