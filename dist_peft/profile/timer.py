"""Phase timers of a training step: exclusive times that add up to the step.

A step is a timeline of marks. ``with timer.phase("forward"):`` pushes a phase on entry and pops it on exit;
every push and pop is a mark, and the time between two consecutive marks belongs to the phase on top of the
stack then (the innermost open one). So nested ranges never count twice (megatron's ``forward-compute`` inside
our ``schedule``), and the phases of a step plus the time when no phase was open ("unaccounted") equal the
step's time by construction.

Clocks (decision, issue 11; Megatron's timers synchronize in start/stop, ours do not):
  CUDA: each mark is a ``torch.cuda.Event`` recorded on the current stream: no ``synchronize`` and no barrier in
        the step. Events are resolved (``collect``) after the step, out of the hot path; the times are the
        stream's: the span between two marks is what the GPU spent between them (host work that the GPU
        overlaps, e.g. data loading while kernels run, shows as the kernels' phase).
  CPU:  ``time.perf_counter`` at each mark (wall clock).
``exact=True`` synchronizes the device at every mark (and times the host then): the phases are then host-side
intervals that include the waits; for debugging, not for throughput figures.

When profiling is off the loop holds ``NULL_TIMER``, whose ``phase`` returns one shared ``nullcontext``: the
cost is one attribute look-up and one call per range.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

UNACCOUNTED = "unaccounted"
"""The label of step time when no phase was open."""

STEP_PHASES = ("data", "forward", "backward", "grad_reduce", "hooks_before_step", "clip", "optimizer",
               "hooks_after_step", "calibrate", "checkpoint", "schedule", "pipeline_p2p", "log")
"""Phase names the engines use, in report order (others are reported after them)."""


@dataclass
class StepTimes:
    """One step on one rank: its time and the exclusive time of each phase (seconds)."""

    step: int
    time_s: float
    phases: dict[str, float] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)

    @property
    def unaccounted_s(self) -> float:
        return self.phases.get(UNACCOUNTED, 0.0)

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "time_s": self.time_s, "phases": dict(self.phases), "calls": dict(self.calls)}


class _NullTimer:
    """The timer of a run that is not profiled: every range is the same no-op context."""

    enabled = False
    _null = contextlib.nullcontext()

    def phase(self, name: str) -> contextlib.AbstractContextManager:
        return self._null

    def step(self, index: int) -> contextlib.AbstractContextManager:
        return self._null


NULL_TIMER = _NullTimer()


class PhaseTimer:
    """Exclusive phase times per step (module docstring). ``with timer.step(i):`` brackets one step;
    ``collect()`` resolves the finished steps into ``StepTimes``."""

    enabled = True

    def __init__(self, device: torch.device | str = "cpu", exact: bool = False):
        self.cuda = torch.device(device).type == "cuda"
        self.exact = exact
        self._stack: list[str] = []
        self._marks: list[tuple[Any, str]] = []  # (clock, label of the span that ends here)
        self._calls: dict[str, int] = {}
        self._step: int | None = None
        self._pending: list[tuple[int, list[tuple[Any, str]], dict[str, int]]] = []

    def _clock(self) -> Any:
        if self.cuda and not self.exact:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def _mark(self) -> None:
        self._marks.append((self._clock(), self._stack[-1] if self._stack else UNACCOUNTED))

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the block as ``name`` (exclusive of phases opened inside it). Outside a step it is not timed."""
        if self._step is None:
            yield
            return
        self._mark()
        self._stack.append(name)
        self._calls[name] = self._calls.get(name, 0) + 1
        try:
            yield
        finally:
            self._mark()
            self._stack.pop()

    def push(self, name: str) -> None:
        """Open ``name`` without a block (for callers with start/stop calls, such as megatron's timers)."""
        if self._step is not None:
            self._mark()
            self._stack.append(name)
            self._calls[name] = self._calls.get(name, 0) + 1

    def pop(self, name: str) -> None:
        """Close the innermost open ``name`` (and anything opened inside it that was left open)."""
        if self._step is not None and name in self._stack:
            self._mark()
            while self._stack and self._stack.pop() != name:
                pass

    @contextlib.contextmanager
    def step(self, index: int) -> Iterator[None]:
        """Bracket step ``index``: its first and last marks define the step time."""
        self._step, self._stack, self._marks, self._calls = index, [], [], {}
        self._marks.append((self._clock(), UNACCOUNTED))
        try:
            yield
        finally:
            self._stack = []
            self._mark()
            self._pending.append((index, self._marks, self._calls))
            self._step = None

    def collect(self) -> list[StepTimes]:
        """The steps finished since the last call. On CUDA this waits for their last event (one synchronize
        per call, after the steps, never inside one)."""
        out = []
        for index, marks, calls in self._pending:
            if self.cuda and not self.exact:
                marks[-1][0].synchronize()
                spans = [(b.elapsed_time(e) / 1e3, label) for (b, _), (e, label) in zip(marks, marks[1:])]
            else:
                spans = [(e - b, label) for (b, _), (e, label) in zip(marks, marks[1:])]
            phases: dict[str, float] = {}
            for seconds, label in spans:
                phases[label] = phases.get(label, 0.0) + seconds
            out.append(StepTimes(index, sum(s for s, _ in spans), phases, dict(calls)))
        self._pending = []
        return out


class MegatronTimers:
    """megatron-core's ``config.timers`` interface (``timers(name, log_level).start() / .stop()``) feeding a
    PhaseTimer: its schedules then mark forward / backward compute and pipeline send / receive for us.

    Names (megatron-core 0.16 ``pipeline_parallel/schedules.py`` and ``p2p_communication.py``):
    ``forward-compute`` → forward, ``backward-compute`` → backward, every ``*-send`` / ``*-recv`` combination →
    pipeline_p2p (transfer plus the wait for the peer stage: the pipeline bubble shows here), and the whole
    ``forward-backward`` → schedule (its exclusive rest: the schedule's own work)."""

    NAMES = {"forward-compute": "forward", "backward-compute": "backward", "forward-backward": "schedule"}

    def __init__(self, timer: PhaseTimer):
        self.timer = timer

    def _phase(self, name: str) -> str:
        return self.NAMES.get(name, "pipeline_p2p" if ("send" in name or "recv" in name) else name)

    def __call__(self, name: str, log_level: int | None = None) -> "_MegatronTimer":
        return _MegatronTimer(self.timer, self._phase(name))


@dataclass
class _MegatronTimer:
    timer: PhaseTimer
    phase: str

    def start(self, barrier: bool = False) -> None:
        self.timer.push(self.phase)

    def stop(self, barrier: bool = False) -> None:
        self.timer.pop(self.phase)
