"""Memory of one rank: the device allocator (or the process on CPU), and where the bytes go.

Measured, not predicted:
  CUDA: the caching allocator's peak allocated and reserved bytes since the last reset (reset before the
        measured steps), allocation retries (cudaMalloc failures the allocator recovered from by freeing its
        cache: a sign of fragmentation) and out-of-memory errors.
  CPU:  the process's peak resident set (Linux VmHWM, reset with the allocator's peaks; elsewhere
        ``getrusage``'s lifetime high-water mark) and the current one.
  Both: bytes saved for backward (``SavedTensorMeter``), the allocators' peak over one call (``allocation_peak``),
        and the tensors the run holds by category: frozen weights, adapter parameters, gradients, optimizer state
        and method buffers (each tensor counted once, by storage; under ZeRO the local partitions).
"""

from __future__ import annotations

import contextlib
import resource
import sys
import weakref
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import Tensor, nn


def _local_nbytes(t: Tensor) -> int:
    """Bytes this rank holds for ``t`` (a ZeRO-3 parameter's own partition, not its empty placeholder)."""
    part = getattr(t, "ds_tensor", None)
    t = part if part is not None else t
    return t.numel() * t.element_size()


def _storage_key(t: Tensor) -> tuple[int, str]:
    return t.untyped_storage().data_ptr(), str(t.device)


def unique_nbytes(tensors: Iterable[Tensor | None], seen: set | None = None) -> int:
    """Bytes of ``tensors`` with each storage counted once (shared bases, tied weights); ``seen`` carries the
    storages already counted in another category."""
    seen = set() if seen is None else seen
    total = 0
    for t in tensors:
        if t is None or not isinstance(t, Tensor):
            continue
        key = _storage_key(getattr(t, "ds_tensor", None) if getattr(t, "ds_tensor", None) is not None else t)
        if key[0] and key in seen:
            continue
        seen.add(key)
        total += _local_nbytes(t)
    return total


def tensor_categories(modules: Iterable[nn.Module], adapters: Iterable[nn.Module], optimizer: Any,
                      grad_bytes: int) -> dict[str, int]:
    """Bytes by category on this rank. ``modules`` hold the model (its frozen weights), ``adapters`` the adapter
    modules (trainable tensors and method buffers), ``optimizer`` a torch optimizer (its state after a step),
    ``grad_bytes`` the gradient bytes measured before the optimizer step (``GradientMeter``)."""
    seen: set = set()
    adapters = list(adapters)
    trainable = [p for a in adapters for p in a.parameters() if p.requires_grad]
    trainable += [p for m in modules for p in m.parameters() if p.requires_grad]
    out = {"adapter_params": unique_nbytes(trainable, seen),
           "method_buffers": unique_nbytes((b for a in adapters for b in a.buffers()), seen),
           "frozen_weights": unique_nbytes((p for m in modules for p in m.parameters() if not p.requires_grad), seen)}
    out["frozen_weights"] += unique_nbytes((b for m in modules for b in m.buffers()), seen)
    state = getattr(optimizer, "state", {}) or {}
    out["optimizer_state"] = unique_nbytes((v for s in state.values() for v in s.values()), seen)
    out["gradients"] = grad_bytes
    return out


class GradientMeter:
    """Bytes of the gradients the optimizer steps on, read by an optimizer step pre-hook (the largest seen)."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.bytes = 0
        self._handle = optimizer.register_step_pre_hook(self._hook)

    def _hook(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        grads = (p.grad for g in optimizer.param_groups for p in g["params"])
        self.bytes = max(self.bytes, unique_nbytes(grads))

    def remove(self) -> None:
        self._handle.remove()


class SavedTensorMeter:
    """Bytes of tensors autograd saves for backward (``torch.autograd.graph.saved_tensors_hooks``), live at once.

    Each storage counts once while any tensor saved on it is alive (x saved by a base linear and by its adapter
    is one buffer); a storage is released when the saved tensors that hold it are freed (after their backward).
    Parameters are left out: they are weights, not activations. ``peak`` is the most bytes alive at once;
    ``total`` every distinct storage saved (a step's micro-batches added up)."""

    def __init__(self, exclude: Iterable[Tensor] = ()):
        self._exclude = {_storage_key(t) for t in exclude}
        self._live: dict[tuple[int, str], list] = {}  # storage -> [bytes, live tensor count]
        self.live = self.peak = self.total = 0

    def _release(self, key: tuple[int, str]) -> None:
        entry = self._live.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.live -= entry[0]
            del self._live[key]

    def _pack(self, t: Tensor) -> Tensor:
        if not isinstance(t, Tensor) or isinstance(t, nn.Parameter) or t.layout != torch.strided:
            return t
        key = _storage_key(t)
        if key in self._exclude or not key[0]:
            return t
        entry = self._live.get(key)
        if entry is None:
            nbytes = t.untyped_storage().nbytes()
            entry = self._live[key] = [nbytes, 0]
            self.live += nbytes
            self.total += nbytes
            self.peak = max(self.peak, self.live)
        entry[1] += 1
        weakref.finalize(t, self._release, key)
        return t

    @staticmethod
    def _unpack(t: Tensor) -> Tensor:
        return t

    @contextlib.contextmanager
    def measuring(self) -> Iterator["SavedTensorMeter"]:
        with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
            yield self


def allocator_stats(device: torch.device) -> dict[str, Any]:
    """Peak allocated / reserved (CUDA, since ``reset_peaks``) or peak / current RSS (CPU), in bytes."""
    if device.type == "cuda":
        s = torch.cuda.memory_stats(device)
        return {"kind": "cuda", "peak_allocated": s.get("allocated_bytes.all.peak", 0),
                "peak_reserved": s.get("reserved_bytes.all.peak", 0),
                "alloc_retries": s.get("num_alloc_retries", 0), "ooms": s.get("num_ooms", 0),
                "device_total": torch.cuda.get_device_properties(device).total_memory}
    return {"kind": "cpu", "peak_rss": peak_rss(), "rss": _current_rss()}


def _current_rss() -> int:
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except ImportError:  # psutil is a dependency of deepspeed, so this is rare
        return 0


def reset_peaks(device: torch.device) -> None:
    """Start the allocator's peaks again (CUDA), and the process's peak RSS where Linux allows (``peak_rss``)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:  # Linux: writing 5 to clear_refs resets VmHWM, the resident high-water mark (proc(5))
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def allocation_peak(fn: Callable[[], Any], device: torch.device = torch.device("cpu")) -> int:
    """The most bytes allocated on ``device`` inside ``fn()`` and not yet freed, at any moment of it: the running
    sum over the profiler's allocation events in their order, a free counted only when its address was allocated
    inside the call (tensors from before the call count neither way, whatever the allocator reports of them).
    Unlike the RSS, a heap that keeps freed memory (or a caching allocator) does not hide what is reused, so it
    compares configurations that share one process. Costs one profiled call."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    nodes, events = list(prof.profiler.kineto_results.experimental_event_tree()), []
    while nodes:
        node = nodes.pop()
        nodes.extend(node.children)
        if node.tag == _EventType.Allocation and node.extra_fields.device == device:
            events.append((node.start_time_ns, node.extra_fields.ptr, node.extra_fields.alloc_size))
    live: dict[int, int] = {}
    total = peak = 0
    for _, ptr, size in sorted(events, key=lambda e: e[0]):
        if size > 0:
            live[ptr] = size
            total += size
            peak = max(peak, total)
        else:
            total -= live.pop(ptr, 0)
    return peak


def peak_rss() -> int:
    """The process's resident high-water mark in bytes since ``reset_peaks`` (Linux: VmHWM; elsewhere the
    lifetime peak from ``getrusage``)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
