"""Counting host synchronisations, and one method step on a toy stack of linears to count them in.

A call counts as a sync when, on a GPU, it would make the host wait for the device: reading a value
(``item``, ``float()``, ``int()``, ``bool()``: aten's ``_local_scalar_dense``), copying to the host (``tolist``,
``cpu``, ``numpy``), or an op whose output shape depends on the data (``nonzero``, ``unique``, ``masked_select``,
boolean-mask indexing, ``bincount``, ``repeat_interleave`` without a size) or that checks a LAPACK status on the
host (``linalg.eigh``, ``linalg.pinv``). The count is the same on CPU, so CI can assert it.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from dist_peft.integrations.transformers import inject_adapters
from dist_peft.methods.base import StepContext

aten = torch.ops.aten
_SYNCING = {aten._local_scalar_dense, aten.nonzero, aten._unique2, aten.unique_dim, aten.unique_consecutive,
            aten.masked_select, aten.bincount, aten._linalg_eigh, aten.linalg_pinv}
_BOOL_INDEXED = {aten.index, aten.index_put_, aten.index_put}


class _Counter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func.overloadpacket
        if packet in _SYNCING or func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None or (
                packet in _BOOL_INDEXED and any(i is not None and i.dtype == torch.bool for i in args[1])):
            self.count += 1
        return func(*args, **kwargs)


@contextlib.contextmanager
def count_host_syncs():
    """``with count_host_syncs() as counter:`` … ``counter.count``: the syncs of the code inside."""
    counter = _Counter()
    saved = {name: getattr(torch.Tensor, name) for name in ("tolist", "cpu", "numpy")}

    def counted(original):
        def call(self, *args, **kwargs):
            counter.count += 1
            return original(self, *args, **kwargs)
        return call

    try:
        for name, original in saved.items():
            setattr(torch.Tensor, name, counted(original))
        with counter:
            yield counter
    finally:
        for name, original in saved.items():
            setattr(torch.Tensor, name, original)


class ToyStack(nn.Module):
    """``layers`` blocks x ← x + down_proj(tanh(q_proj(x))) of width w (q_proj: w → 2w, down_proj: 2w → w)."""

    def __init__(self, layers: int, width: int = 16):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.layers = nn.ModuleList(nn.ModuleDict({"q_proj": nn.Linear(width, 2 * width, bias=False),
                                                   "down_proj": nn.Linear(2 * width, width, bias=False)})
                                    for _ in range(layers))
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.layers:
            x = x + block["down_proj"](torch.tanh(block["q_proj"](x)))
        return x


def syncs_per_step(method: str, cfg, layers: int, micro_batches: int, steps: int, tasks: int = 0,
                   width: int = 16) -> list[int]:
    """Host syncs of each of ``steps`` optimizer steps of ``method`` on a ``ToyStack``: the controller's hooks and
    every micro-batch's forward and backward (the loss Σ y·h syncs nothing; the optimizer's own update is not
    counted). With ``tasks``, each micro-batch carries per-sample ``task_ids``."""
    torch.manual_seed(0)
    model = ToyStack(layers, width)
    adapters = {n: s.adapter for n, s in inject_adapters(model, method, cfg, ["q_proj", "down_proj"]).items()}
    ctrl = next(iter(adapters.values())).controller_cls(adapters)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    counts = []
    for step in range(steps):
        ctx = StepContext(step, 1e-2, opt)
        batches = [{"x": torch.randn(4, 3, width, generator=gen), "h": torch.randn(4, 3, width, generator=gen),
                    "task_ids": torch.arange(4) % max(tasks, 1)} for _ in range(micro_batches)]
        with count_host_syncs() as counter:
            for b in batches:
                ctrl.on_batch(b if tasks else {})
                (model(b["x"]) * b["h"]).sum().backward()
            ctrl.before_optimizer_step(ctx)
        opt.step()
        with count_host_syncs() as after:
            ctrl.after_optimizer_step(ctx)
        opt.zero_grad(set_to_none=True)
        counts.append(counter.count + after.count)
    return counts
