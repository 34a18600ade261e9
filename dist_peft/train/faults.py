"""Test hook for the fault-tolerance tests: ``DIST_PEFT_FAULT=ACTION:POINT:STEP:RANK[:ATTEMPT]`` makes global rank
RANK do ACTION when it reaches POINT at step STEP, on the launch's attempt ATTEMPT only (default 0, the first:
``TORCHELASTIC_RESTART_COUNT``, set by torchrun, or ``DIST_PEFT_RESTART_COUNT``, set by the restart loops of
launch/deepspeed.sh and mpirun.sh; unset is 0), so a restarted job runs clean. Several faults, one per attempt or
rank, are separated by commas (``kill:step:3:1,hang:step:5:0:1``: a killed rank, then a hang in the restarted job).

- ACTION ``kill``: SIGKILL this process (a crashed rank); ``kill-node``: SIGKILL its parent (the launcher's agent
  on this node) and then itself (a lost node); ``enospc``: raise ``OSError(ENOSPC)`` (a full disk); ``hang``: sleep
  inside the next collective this rank enters (its peers wait in it; the step watchdog, ``train.step_timeout_s``,
  ends the rank). The sleeper says so on stderr with the wall-clock time it fell asleep.
- POINT ``step``: the loop is about to run optimizer step STEP + 1 (STEP steps are done and logged);
  ``ckpt-write``: the checkpoint of step STEP has its tensors written, its metadata and manifest not yet.

Unset, a call costs one environment lookup. Read nowhere else.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import sys
import time

from dist_peft.parallel import collectives

ACTIONS = ("kill", "kill-node", "enospc", "hang")
POINTS = ("step", "ckpt-write")
HANG_S = 3600.0
"""How long ``hang`` sleeps: past any test's bound, so only the watchdog (or the launcher) ends it."""


def _parse(spec: str) -> list[tuple[str, str, int, int, int]]:
    faults = []
    for one in spec.split(","):
        fields = one.split(":")
        try:
            action, at, numbers = fields[0], fields[1], [int(x) for x in fields[2:]]
        except (IndexError, ValueError):
            numbers, action, at = [], "", ""
        if action not in ACTIONS or at not in POINTS or len(numbers) not in (2, 3):
            raise ValueError(f"DIST_PEFT_FAULT={spec}: expected {'|'.join(ACTIONS)}:{'|'.join(POINTS)}:STEP:RANK"
                             "[:ATTEMPT], several separated by commas")
        faults.append((action, at, numbers[0], numbers[1], numbers[2] if len(numbers) == 3 else 0))
    return faults


def _sleep_in_next_collective(step: int) -> None:
    """Sleep inside the next collective this rank enters, after ``collectives.TRACE`` has recorded it as entered
    (the hang report names it); any observer already set (the profiler's) is put back first."""
    previous = collectives.TRACE.observer

    def asleep(op: str, nbytes: int, group: object) -> contextlib.AbstractContextManager:
        collectives.TRACE.observer = previous
        print(f"DIST_PEFT_FAULT: rank {collectives.group_rank()} asleep inside {op} after step {step} at "
              f"{time.time():.3f}", file=sys.stderr, flush=True)
        time.sleep(HANG_S)
        return contextlib.nullcontext()

    collectives.TRACE.observer = asleep


def point(where: str, step: int, path: object = None) -> None:
    """The fault ``DIST_PEFT_FAULT`` names, if this rank is at its point and step on the attempt it names."""
    spec = os.environ.get("DIST_PEFT_FAULT")
    if not spec:
        return
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT") or os.environ.get("DIST_PEFT_RESTART_COUNT") or 0)
    here = (where, step, collectives.group_rank(), attempt)
    for action, *at in _parse(spec):
        if tuple(at) != here:
            continue
        if action == "enospc":
            raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (injected by DIST_PEFT_FAULT)", str(path))
        if action == "hang":
            _sleep_in_next_collective(step)
            return
        if action == "kill-node":
            os.kill(os.getppid(), signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)
