"""Collectives per operation and process group, timed, with nccl-tests' bus bandwidth.

The meter is the traced collectives layer's observer (``collectives.TRACE.observer``): every collective that
dist_peft issues (TP regions, gradient and controller reductions, step scalars) is counted with its bytes and
timed, keyed by (operation, group). Counts and bytes are therefore the ones ``TRACE`` gives the tests.

Bandwidth (nccl-tests ``doc/PERFORMANCE.md``): algbw = S / t with S the op's whole array (for all-gather the
gathered result, size × the per-rank part, as ``TRACE`` counts it), busbw = algbw × f(n), n the size of the
op's *own* group (DeepSpeed's comms logger uses the world size, wrong for TP and DP sub-groups), f the planner's
``accounting.comms.bus_factor``: all_reduce 2(n−1)/n;  all_gather, reduce_scatter, all_to_all (n−1)/n;  others 1.

Time: a CUDA event pair on the current stream (no synchronize; resolved with the step's phase events) or the
wall clock on CPU; it includes the wait for the slowest peer, as nccl-tests' does.

DeepSpeed's own collectives (ZeRO's gradient reduce-scatter / all-reduce, the all-gather of updated partitions,
its norm and overflow reductions) do not pass through ``collectives``: while installed, the meter also wraps the
methods of DeepSpeed's communication backend (``deepspeed.comm.comm.cdb``, the one object every
``deepspeed.comm`` call reaches) and reports those rows with ``source: deepspeed`` (ours: ``dist_peft``). Their
bytes follow the same conventions; their time is the call's own, which for an ``async_op`` or an overlapped
side stream is the launch only (``overlap_comm`` hides the rest behind backward).
"""

from __future__ import annotations

import contextlib
import functools
import sys
import time
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import torch

from dist_peft.accounting.comms import bus_factor
from dist_peft.parallel import collectives


@dataclass
class OpStats:
    """One (operation, group) over the measured steps."""

    op: str
    group: str
    size: int
    source: str = "dist_peft"
    """Who issued it: ``dist_peft`` (the traced layer) or ``deepspeed`` (its comm backend)."""
    calls: int = 0
    bytes: int = 0
    time_s: float = 0.0

    def to_dict(self, steps: int) -> dict[str, Any]:
        algbw = self.bytes / self.time_s if self.time_s > 0 else None
        return {"op": self.op, "group": self.group, "group_size": self.size, "source": self.source,
                "calls_per_step": self.calls / steps,
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
    def _observe(self, op: str, nbytes: int, group: Any, source: str = "dist_peft") -> Iterator[None]:
        key = (op, _group_key(group), source)
        stats = self._stats.get(key)
        if stats is None:
            stats = self._stats[key] = OpStats(op, self._label(group), collectives.group_size(group), source)
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
            with _deepspeed_observed(self._observe):
                yield self
        finally:
            collectives.TRACE.observer = previous

    def report(self, steps: int) -> list[dict[str, Any]]:
        """Per (operation, group, source), per measured step: calls, bytes, time, algbw and busbw (GB/s)."""
        self.resolve()
        rows = sorted(self._stats.values(), key=lambda s: (-s.time_s, s.op, s.group, s.source))
        return [s.to_dict(max(steps, 1)) for s in rows]


def _nbytes(*tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


DEEPSPEED_OPS: dict[str, tuple[str, tuple[str, ...], Any]] = {
    # TorchBackend method: (op as the traced layer names it, its positional parameters (deepspeed/comm/torch.py;
    # its decorators hide the signature), bytes S from the arguments: all-gather the gathered array,
    # reduce-scatter the array before scattering, as TRACE counts them)
    "all_reduce": ("all_reduce", ("tensor", "op", "group"), lambda a: _nbytes(a["tensor"])),
    "inference_all_reduce": ("all_reduce", ("tensor", "op", "group"), lambda a: _nbytes(a["tensor"])),
    "all_reduce_coalesced": ("all_reduce", ("tensors", "op", "group"), lambda a: _nbytes(*a["tensors"])),
    "reduce": ("reduce", ("tensor", "dst", "op", "group"), lambda a: _nbytes(a["tensor"])),
    "broadcast": ("broadcast", ("tensor", "src", "group"), lambda a: _nbytes(a["tensor"])),
    "reduce_scatter": ("reduce_scatter", ("output", "input_list", "op", "group"),
                       lambda a: _nbytes(*a["input_list"])),
    "reduce_scatter_tensor": ("reduce_scatter", ("output_tensor", "input_tensor", "op", "group"),
                              lambda a: _nbytes(a["input_tensor"])),
    "all_gather": ("all_gather", ("tensor_list", "tensor", "group"), lambda a: _nbytes(*a["tensor_list"])),
    "all_gather_into_tensor": ("all_gather", ("output_tensor", "input_tensor", "group"),
                               lambda a: _nbytes(a["output_tensor"])),
    "all_gather_base": ("all_gather", ("output_tensor", "input_tensor", "group"),
                        lambda a: _nbytes(a["output_tensor"])),
    "all_gather_coalesced": ("all_gather", ("output_tensors", "input_tensors", "group"),
                             lambda a: _nbytes(*a["output_tensors"])),
    "all_to_all_single": ("all_to_all", ("output", "input", "output_split_sizes", "input_split_sizes", "group"),
                          lambda a: _nbytes(a["input"])),
    "all_to_all": ("all_to_all", ("output_tensor_list", "input_tensor_list", "group"),
                   lambda a: _nbytes(*a["input_tensor_list"])),
    "all_gather_object": ("all_gather_object", ("object_list", "obj", "group"), lambda a: 0),  # unsized here
    "broadcast_object_list": ("broadcast_object_list", ("object_list", "src", "group"), lambda a: 0),
    "barrier": ("barrier", ("group",), lambda a: 0),
}


@contextlib.contextmanager
def _deepspeed_observed(observe: Any) -> Iterator[None]:
    """Inside: each call of DeepSpeed's communication backend (``deepspeed.comm.comm.cdb``, when DeepSpeed is
    imported and initialised) goes through ``observe(op, bytes, group, "deepspeed")``; a backend method that
    calls another (a fallback) is counted once, as the outer call. The instance's methods are restored on exit."""
    comm = sys.modules.get("deepspeed.comm.comm")
    cdb = getattr(comm, "cdb", None)
    if cdb is None:
        yield
        return
    depth = [0]

    def wrap(name: str, method: Any) -> Any:
        op, params, size_of = DEEPSPEED_OPS[name]

        @functools.wraps(method)
        def call(*args: Any, **kwargs: Any) -> Any:
            if depth[0]:
                return method(*args, **kwargs)
            bound = {**dict(zip(params, args)), **kwargs}
            depth[0] += 1
            try:
                with observe(op, size_of(bound), bound.get("group"), "deepspeed"):
                    return method(*args, **kwargs)
            finally:
                depth[0] -= 1
        return call

    names = [n for n in DEEPSPEED_OPS if callable(getattr(cdb, n, None)) and n not in vars(cdb)]
    for name in names:
        setattr(cdb, name, wrap(name, getattr(cdb, name)))
    try:
        yield
    finally:
        for name in names:
            delattr(cdb, name)
