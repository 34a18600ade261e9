"""Guards of the training step: a non-finite step is skipped by every rank, a hung rank ends itself (issue 14).

Numerical faults. Decision (issue 14): a step whose loss or gradient norm is not finite is skipped by every rank
together. The step's one all-reduce (``Trainer._step_check``: the loss sum, the gradient norm² and a per-rank
"not finite" flag, all in one float64 vector over the world) gives every rank the same three numbers, read in the
step's one host read, so no rank can decide otherwise than the others. It runs after the gradient reduction and
before the controller hooks, so a skipped step runs no hook (no ScaLoRA solve, OD-LoRA refresh, LoCA location
step or FO-LoRA refit: the controller only hears ``on_skipped_step``), no clip and no optimizer update; its
gradients are dropped. The skipped batch is consumed (the data position advances) but the optimizer step counter
does not, so the learning-rate schedule and every step-driven method schedule continue as in a run whose data
never held that batch, and the run still makes ``train.steps`` updates. Only the RNG streams differ from such a
run (dropout drew masks for the skipped batch). ``train.max_bad_steps`` skipped steps in a row end the run with one
``StepFaultError`` on every rank. Decision: the step's one host read moves from the end of the step to this check,
because the update, the hooks and the optimizer cannot wait on a device-side decision without making each of them
conditional on the device; on a GPU the launches of the (adapter-sized) hooks and update no longer overlap the
backward's tail. DeepSpeed (0.19) skips a step whose global norm is invalid by itself too, but inside its step,
after the controller hooks have run; so this check decides on every engine, and in a step it skips DeepSpeed's own
skip fires as well (it logs OVERFLOW) while the partitions are hidden from the optimizer (``ZeroEngine.skip_step``).

Hangs: ``StepWatchdog`` (``train.step_timeout_s``) ends a rank whose training step runs longer than the timeout,
after writing every thread's stack and the last collective it entered to ``output.dir/hang-rank{R}.txt``; the
exit code (``HANG_EXIT_CODE``) makes torchrun's agent restart the worker group. Per step it costs two attribute
writes; a daemon thread polls the deadline. It is separate from ``train.collective_timeout_s`` (the process groups'
own timeout, which must cover long lone work such as a checkpoint write) and covers training steps only.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

NAN_ENV = "DIST_PEFT_INJECT_NAN"
"""Test hook, ``RANK:K[,K...]``: rank RANK multiplies its loss by NaN in its K-th attempted step (0-based, skipped
steps counted: the data position divided by ``train.grad_accum``)."""
HANG_EXIT_CODE = 124
"""Exit code of a rank its watchdog ended (coreutils ``timeout``'s)."""


class StepFaultError(RuntimeError):
    """The run cannot step over a fault (``train.max_bad_steps`` non-finite steps in a row)."""


def injected_nan_steps(rank: int) -> frozenset[int]:
    """The attempted steps in which this rank's loss is made NaN (``NAN_ENV``; empty when unset)."""
    spec = os.environ.get(NAN_ENV, "").strip()
    if not spec:
        return frozenset()
    target, _, steps = spec.partition(":")
    try:
        return frozenset(int(k) for k in steps.split(",")) if int(target) == rank else frozenset()
    except ValueError:
        raise ValueError(f"{NAN_ENV}={spec!r}: expected RANK:STEP[,STEP...], e.g. 1:3,4") from None


def _group_name(group: Any) -> str:
    if group is None:
        return "world"
    try:
        import torch.distributed as dist

        return f"ranks {dist.get_process_group_ranks(group)}"
    except (RuntimeError, ValueError):
        return repr(group)


def describe_collective(last: tuple[str, int, Any, float] | None) -> str:
    """One line for ``collectives.TRACE.last`` (op, bytes, group, monotonic time it was entered)."""
    if last is None:
        return "last collective: none entered yet"
    op, nbytes, group, entered = last
    return (f"last collective entered: {op} of {nbytes} bytes over {_group_name(group)}, "
            f"{time.monotonic() - entered:.1f} s ago")


class StepWatchdog:
    """Ends this rank when a step runs past ``timeout_s``: ``with watchdog.watch(step):`` around each step.

    The report holds the rank, the step, how long it has run, the last collective that dist_peft's traced layer
    entered (``last()``; DeepSpeed's and megatron's own collectives show in the stacks only) and every Python
    thread's stack (``faulthandler``). A hang that holds the GIL in native code keeps this thread from running; the
    process group's ``train.collective_timeout_s`` still ends such a rank."""

    def __init__(self, timeout_s: float, run_dir: Path, rank: int,
                 last: Callable[[], tuple[str, int, Any, float] | None]):
        self.timeout_s, self.rank, self.last = timeout_s, rank, last
        self.path = Path(run_dir) / f"hang-rank{rank}.txt"
        self._deadline: float | None = None
        self._step = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="dist_peft-step-watchdog", daemon=True)
        self._thread.start()

    @contextlib.contextmanager
    def watch(self, step: int) -> Iterator[None]:
        """Arm the deadline for the step inside (two attribute writes), disarm it on the way out."""
        self._step, self._deadline = step, time.monotonic() + self.timeout_s
        try:
            yield
        finally:
            self._deadline = None

    def close(self) -> None:
        self._stop.set()
        self._thread.join()

    def _watch(self) -> None:
        poll = min(1.0, self.timeout_s / 10)
        while not self._stop.wait(poll):
            deadline = self._deadline
            if deadline is not None and time.monotonic() > deadline:
                self._report_and_exit(deadline)

    def _report_and_exit(self, deadline: float) -> None:
        ran = time.monotonic() - deadline + self.timeout_s
        head = (f"rank {self.rank}: step {self._step} has run {ran:.1f} s, past train.step_timeout_s = "
                f"{self.timeout_s:g} s\n{describe_collective(self.last())}\n\nstacks of every thread:\n")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "w") as f:
            f.write(head)
            f.flush()
            faulthandler.dump_traceback(file=f, all_threads=True)
            f.flush()
            os.fsync(f.fileno())
        print(f"error: rank {self.rank} hung in step {self._step} (over train.step_timeout_s = {self.timeout_s:g} s); "
              f"stacks and the last collective in {self.path}", file=sys.stderr, flush=True)
        os._exit(HANG_EXIT_CODE)
