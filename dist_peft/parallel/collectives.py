"""Traced collectives: the one way dist_peft code talks to torch.distributed.

Every call is recorded in ``TRACE`` (calls and bytes per operation), so a test or the profiler can state how
much a method communicates per step instead of guessing. A group of one rank (or no initialised process group)
is the identity and records nothing: single-process code pays nothing.

Reductions of many small tensors go through ``all_reduce_coalesced``: one flat buffer, one call, whatever the
number of layers. Host tensors (step counts, norms) work under nccl too: they are staged through the current
CUDA device (``_on_backend``; written for GPU clusters, not run on one yet).
"""

from __future__ import annotations

import contextlib
import json
import struct
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor


_UNOBSERVED = contextlib.nullcontext()


@dataclass
class CollectiveTrace:
    calls: Counter = field(default_factory=Counter)
    bytes: Counter = field(default_factory=Counter)
    observer: Callable[[str, int, Any], contextlib.AbstractContextManager] | None = None
    """Set by the profiler (``dist_peft.profile.comm``): called with (op, bytes, group) around each collective
    to time it per operation and group; None (the default) costs nothing."""
    last: tuple[str, int, Any, float] | None = None
    """(op, bytes, group, ``time.monotonic()`` at entry) of the latest collective entered: the step watchdog's
    hang report names it (``train/guards.py``). Always kept: one tuple per call."""

    def record(self, op: str, nbytes: int, group: Any = None) -> contextlib.AbstractContextManager:
        """Count one call of ``op`` moving ``nbytes``; the returned context brackets the communication."""
        self.calls[op] += 1
        self.bytes[op] += nbytes
        self.last = (op, nbytes, group, time.monotonic())
        return _UNOBSERVED if self.observer is None else self.observer(op, nbytes, group)

    def reset(self) -> dict[str, dict[str, int]]:
        """Return the counts since the last reset and start again (call once per step)."""
        snap = {"calls": dict(self.calls), "bytes": dict(self.bytes)}
        self.calls.clear()
        self.bytes.clear()
        return snap


TRACE = CollectiveTrace()


def group_size(group: Any = None) -> int:
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def group_rank(group: Any = None) -> int:
    return dist.get_rank(group) if dist.is_available() and dist.is_initialized() else 0


def _on_backend(t: Tensor, group: Any) -> Tensor:
    """``t`` where the group's backend can reach it: nccl takes only CUDA tensors, so host values (a step's target
    count, a norm) go through the current CUDA device; gloo takes either."""
    if t.device.type == "cpu" and dist.get_backend(group) == "nccl":
        return t.cuda()
    return t


def all_reduce(t: Tensor, group: Any = None, op: str = "sum") -> Tensor:
    """In-place reduction of ``t`` over ``group``; ``op`` is sum, avg or max (avg = sum / size: gloo has no AVG)."""
    size = group_size(group)
    if size == 1:
        return t
    work = _on_backend(t, group)
    with TRACE.record("all_reduce", t.numel() * t.element_size(), group):
        dist.all_reduce(work, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM, group=group)
    if work is not t:
        t.copy_(work)
    if op == "avg":
        t.div_(size)
    return t


def failed_rank(error: BaseException | None, group: Any = None) -> tuple[int, int] | None:
    """(group rank, errno or 0) of a rank of ``group`` whose ``error`` is not None, the same on every rank, or None
    when no rank failed: one all-reduce (max) of one integer, (rank + 1) · 1024 + errno. Used in place of a barrier
    after work one rank may fail alone (a checkpoint write), so every rank ends at once instead of waiting out the
    group timeout in its next collective. The highest failed rank is named when several fail."""
    code = 0 if error is None else (group_rank(group) + 1) * 1024 + min(getattr(error, "errno", None) or 0, 1023)
    flag = all_reduce(torch.tensor([code], dtype=torch.int64), group, op="max")
    code = int(flag.item())
    return None if code == 0 else (code // 1024 - 1, code % 1024)


def all_reduce_coalesced(tensors: Sequence[Tensor], group: Any = None, op: str = "sum") -> None:
    """Reduce many tensors in place with one collective per dtype (flatten, reduce, copy back)."""
    if group_size(group) == 1 or not tensors:
        return
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for same in by_dtype.values():
        flat = all_reduce(torch.cat([t.reshape(-1) for t in same]), group, op)
        offset = 0
        for t in same:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()


def broadcast(t: Tensor, src: int = 0, group: Any = None) -> Tensor:
    """In-place broadcast from group rank ``src``."""
    if group_size(group) == 1:
        return t
    work = _on_backend(t, group)
    with TRACE.record("broadcast", t.numel() * t.element_size(), group):
        dist.broadcast(work, src=dist.get_global_rank(group, src) if group is not None else src, group=group)
    if work is not t:
        t.copy_(work)
    return t


def all_gather_cat(t: Tensor, dim: int, group: Any = None) -> Tensor:
    """Concatenate every rank's ``t`` along ``dim`` (all shards must have the same shape)."""
    size = group_size(group)
    if size == 1:
        return t
    work = _on_backend(t.contiguous(), group)
    parts = [torch.empty_like(work) for _ in range(size)]
    with TRACE.record("all_gather", t.numel() * t.element_size() * size, group):
        dist.all_gather(parts, work, group=group)
    return torch.cat(parts, dim=dim).to(t.device)


def reduce_scatter(t: Tensor, group: Any = None) -> Tensor:
    """Sum ``t`` over ``group`` and return this rank's slice of the sum along dim 0 (which the size divides)."""
    size = group_size(group)
    if size == 1:
        return t
    work = _on_backend(t.contiguous(), group)
    out = work.new_empty((work.shape[0] // size, *work.shape[1:]))
    with TRACE.record("reduce_scatter", t.numel() * t.element_size(), group):  # torch < 2.13: reduce_scatter_tensor
        (getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor)(out, work, group=group)
    return out.to(t.device)


def all_gather_object(obj: Any, group: Any = None) -> list[Any]:
    """Every rank's ``obj`` in group rank order (small metadata: names, digests, records; CPU tensors too). Sent as
    JSON plus a safetensors blob (``_encode``), never pickled: one all-gather of the sizes, one of the bytes, as
    ``torch.distributed.all_gather_object`` does. Bytes are counted as the encoded size times the group size."""
    size = group_size(group)
    if size == 1:
        return [obj]
    data = torch.frombuffer(bytearray(_encode(obj)), dtype=torch.uint8)
    with TRACE.record("all_gather_object", data.numel() * size, group):
        sizes = [_on_backend(torch.zeros(1, dtype=torch.int64), group) for _ in range(size)]
        dist.all_gather(sizes, _on_backend(torch.tensor([data.numel()]), group), group=group)
        longest = int(max(int(n.item()) for n in sizes))
        padded = _on_backend(torch.nn.functional.pad(data, (0, longest - data.numel())), group)
        parts = [torch.empty_like(padded) for _ in range(size)]
        dist.all_gather(parts, padded, group=group)
    return [_decode(part[: int(n.item())].cpu().numpy().tobytes()) for part, n in zip(parts, sizes)]


def _encode(obj: Any) -> bytes:
    """None, bool, int, float, str, list, tuple, dict (any of these as keys) and CPU tensors, as an 8-byte header
    length, a JSON tree (lists, tuples, dicts and tensors tagged by a one-key object) and a safetensors blob."""
    from safetensors.torch import save

    tensors: dict[str, Tensor] = {}

    def tree(x: Any) -> Any:
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        if isinstance(x, (list, tuple)):
            return {"t" if isinstance(x, tuple) else "l": [tree(v) for v in x]}
        if isinstance(x, dict):
            return {"d": [[tree(k), tree(v)] for k, v in x.items()]}
        if isinstance(x, Tensor):
            tensors[str(len(tensors))] = x.detach().cpu().contiguous()
            return {"x": str(len(tensors) - 1)}
        if hasattr(x, "item") and hasattr(x, "dtype"):  # a numpy scalar
            return x.item()
        raise TypeError(f"all_gather_object: cannot send a {type(x).__name__} (no pickle; send plain values)")

    head = json.dumps(tree(obj)).encode()
    return struct.pack("<Q", len(head)) + head + (save(tensors) if tensors else b"")


def _decode(data: bytes) -> Any:
    from safetensors.torch import load

    (n,) = struct.unpack("<Q", data[:8])
    tensors = load(data[8 + n:]) if len(data) > 8 + n else {}

    def value(x: Any) -> Any:
        if not isinstance(x, dict):
            return x
        (tag, v), = x.items()
        if tag == "x":
            return tensors[v]
        if tag == "d":
            return {value(k): value(w) for k, w in v}
        return (tuple if tag == "t" else list)(value(w) for w in v)

    return value(json.loads(data[8: 8 + n]))
