"""Test hook for the fault-tolerance tests: ``DIST_PEFT_FAULT=ACTION:POINT:STEP:RANK`` makes global rank RANK do
ACTION when it reaches POINT at step STEP, on a launch's first attempt only (``TORCHELASTIC_RESTART_COUNT``, set
by torchrun, or ``DIST_PEFT_RESTART_COUNT``, set by the restart loops of launch/deepspeed.sh and mpirun.sh, is
unset or 0), so the restarted job runs clean.

- ACTION ``kill``: SIGKILL this process (a crashed rank); ``kill-node``: SIGKILL its parent (the launcher's agent
  on this node) and then itself (a lost node); ``enospc``: raise ``OSError(ENOSPC)`` (a full disk).
- POINT ``step``: the loop is about to run optimizer step STEP + 1 (STEP steps are done and logged);
  ``ckpt-write``: the checkpoint of step STEP has its tensors written, its metadata and manifest not yet.

Unset, a call costs one environment lookup. Read nowhere else.
"""

from __future__ import annotations

import errno
import os
import signal

from dist_peft.parallel import collectives


def point(where: str, step: int, path: object = None) -> None:
    """The fault ``DIST_PEFT_FAULT`` names, if this rank is at its point and step on a first attempt."""
    spec = os.environ.get("DIST_PEFT_FAULT")
    if not spec:
        return
    action, at, at_step, rank = spec.split(":")
    if action not in ("kill", "kill-node", "enospc") or at not in ("step", "ckpt-write"):
        raise ValueError(f"DIST_PEFT_FAULT={spec}: expected (kill|kill-node|enospc):(step|ckpt-write):STEP:RANK")
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT") or os.environ.get("DIST_PEFT_RESTART_COUNT") or "0"
    if (at, int(at_step), int(rank), attempt) != (where, step, collectives.group_rank(), "0"):
        return
    if action == "enospc":
        raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (injected by DIST_PEFT_FAULT)", str(path))
    if action == "kill-node":
        os.kill(os.getppid(), signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)
