"""Collectives per operation and process group, timed, with nccl-tests' bus bandwidth.

The meter is the traced collectives layer's observer (``collectives.TRACE.observer``): every collective that
dist_peft issues (TP regions, gradient and controller reductions, step scalars) is counted with its bytes and
timed, keyed by (operation, group). Counts and bytes are therefore the ones ``TRACE`` gives the tests.

Bandwidth (nccl-tests ``doc/PERFORMANCE.md``): algbw = S / t with S the op's whole array (for all-gather the
gathered result, size × the per-rank part, as ``TRACE`` counts it), busbw = algbw × f(n), n the size of the
op's *own* group (DeepSpeed's comms logger uses the world size, wrong for TP and DP sub-groups):
  all_reduce 2(n−1)/n;  all_gather, all_gather_object, reduce_scatter, all_to_all (n−1)/n;  broadcast, reduce 1.

Time: a CUDA event pair on the current stream (no synchronize; resolved with the step's phase events) or the
wall clock on CPU; it includes the wait for the slowest peer, as nccl-tests' does.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import torch

from dist_peft.parallel import collectives


def bus_factor(op: str, n: int) -> float:
    """nccl-tests' bus-bandwidth factor of ``op`` in a group of ``n`` ranks."""
    if op == "all_reduce":
        return 2 * (n - 1) / n
    if op in ("all_gather", "all_gather_object", "reduce_scatter", "all_to_all"):
        return (n - 1) / n
    return 1.0


@dataclass
class OpStats:
    """One (operation, group) over the measured steps."""

    op: str
    group: str
    size: int
    calls: int = 0
    bytes: int = 0
    time_s: float = 0.0

    def to_dict(self, steps: int) -> dict[str, Any]:
        algbw = self.bytes / self.time_s if self.time_s > 0 else None
        return {"op": self.op, "group": self.group, "group_size": self.size, "calls_per_step": self.calls / steps,
                "bytes_per_step": self.bytes / steps, "time_per_step_s": self.time_s / steps,
                "algbw_GBps": None if algbw is None else algbw / 1e9,
                "busbw_GBps": None if algbw is None else algbw * bus_factor(self.op, self.size) / 1e9}


def _group_key(group: Any) -> Any:
    return None if group is None else id(group)


class CollectiveMeter:
    """Observer of the traced collectives while installed (``with meter.installed():``, around the measured
    steps only: warm-up and evaluation are left out)."""

    def __init__(self, device: torch.device | str = "cpu", group_names: Mapping[str, Any] | None = None):
        self.cuda = torch.device(device).type == "cuda"
        self._names = {_group_key(g): name for name, g in (group_names or {}).items() if g is not None}
        self._stats: dict[tuple[str, Any], OpStats] = {}
        self._events: list[tuple[OpStats, Any, Any]] = []

    def name_groups(self, group_names: Mapping[str, Any]) -> None:
        """Report these process groups by name (e.g. tp, pp, dp); others as ``world`` or their global ranks."""
        self._names.update({_group_key(g): name for name, g in group_names.items() if g is not None})

    def _label(self, group: Any) -> str:
        key = _group_key(group)
        if key in self._names:
            return self._names[key]
        import torch.distributed as dist

        if group is None or group is dist.group.WORLD:
            return "world"
        ranks = dist.get_process_group_ranks(group)
        return "ranks " + ",".join(map(str, ranks))

    @contextlib.contextmanager
    def _observe(self, op: str, nbytes: int, group: Any) -> Iterator[None]:
        key = (op, _group_key(group))
        stats = self._stats.get(key)
        if stats is None:
            stats = self._stats[key] = OpStats(op, self._label(group), collectives.group_size(group))
        stats.calls += 1
        stats.bytes += nbytes
        if self.cuda:
            start = torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._events.append((stats, start, end))
        else:
            t0 = time.perf_counter()
            yield
            stats.time_s += time.perf_counter() - t0

    def resolve(self) -> None:
        """Add the times of pending CUDA events (after the steps: waits for the last one)."""
        if self._events:
            self._events[-1][2].synchronize()
        for stats, start, end in self._events:
            stats.time_s += start.elapsed_time(end) / 1e3
        self._events = []

    @contextlib.contextmanager
    def installed(self) -> Iterator["CollectiveMeter"]:
        """Observe ``collectives.TRACE`` inside; the previous observer is restored on exit."""
        previous, collectives.TRACE.observer = collectives.TRACE.observer, self._observe
        try:
            yield self
        finally:
            collectives.TRACE.observer = previous

    def report(self, steps: int) -> list[dict[str, Any]]:
        """Per (operation, group), per measured step: calls, bytes, time, algbw and busbw (GB/s)."""
        self.resolve()
        rows = sorted(self._stats.values(), key=lambda s: (-s.time_s, s.op, s.group))
        return [s.to_dict(max(steps, 1)) for s in rows]
