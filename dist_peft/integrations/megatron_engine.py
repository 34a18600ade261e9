"""Training steps of adapters on the megatron-core GPTModel through megatron's own schedules
(``get_forward_backward_func``: no pipelining, 1F1B, or interleaved), under TP × PP × DP.

One optimizer step (``train_step``), in order:
  1. count the step's loss targets over all micro-batches and data-parallel ranks (one scalar all-reduce);
  2. megatron's schedule runs forward/backward of every micro-batch; the last stage's loss is
     Σ masked per-token cross-entropy / (step targets), so accumulation and DP equal one big batch;
  3. partial gradients of replicated adapter factors are summed over the TP group, all layers in one
     coalesced all-reduce; then every adapter gradient is summed over the DP group in one more;
  4. controller.before_optimizer_step → clip by the global norm (sharded tensors counted once per shard,
     replicated ones once, summed over TP and PP) → optimizer.step → controller.after_optimizer_step.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Iterable

import torch
from torch import Tensor

from dist_peft.integrations.megatron import Layout, attach_adapters, build_model
from dist_peft.integrations.transformers import AdaptedLinear
from dist_peft.methods.base import StepContext
from dist_peft.parallel import collectives


def to_megatron_batch(input_ids: Tensor, labels: Tensor, seq_len: int, pad_id: int) -> dict[str, Tensor]:
    """HF-style (input_ids, labels with -100) → megatron's (tokens, next-token labels, loss mask), padded to
    ``seq_len`` so that every micro-batch has the shape pipeline p2p expects."""
    b, s = input_ids.shape
    if s > seq_len:
        raise ValueError(f"a batch of length {s} exceeds data.seq_len {seq_len}")
    tokens = torch.full((b, seq_len), pad_id, dtype=torch.long)
    tokens[:, :s] = input_ids
    target = torch.full((b, seq_len), -100, dtype=torch.long)
    target[:, : s - 1] = labels[:, 1:]
    mask = (target != -100).float()
    return {"tokens": tokens, "labels": target.clamp(min=0), "loss_mask": mask,
            "position_ids": torch.arange(seq_len).expand(b, -1),
            "attention_mask": torch.triu(torch.ones(seq_len, seq_len, dtype=torch.bool), 1)[None, None]}


class MegatronEngine:
    """This rank's stage of the model with adapters, its optimizer, and the step of the module docstring."""

    def __init__(self, hf_folder: str, method: str, cfg: Any, targets: Iterable[str], *, seed: int,
                 lr: float, betas=(0.9, 0.999), weight_decay: float = 0.0, dtype: torch.dtype = torch.float32):
        from megatron.core import parallel_state as ps

        self.model, self.hf, sites = build_model(hf_folder, dtype)
        self.sites: dict[str, AdaptedLinear] = attach_adapters(sites, method, cfg, targets, seed)
        self.layout = Layout.current()
        self.dp_group, self.mp_group = ps.get_data_parallel_group(), ps.get_model_parallel_group()
        self.params = {f"{name}.adapter.{p}": getattr(s.adapter, p)
                       for name, s in self.sites.items() for p in s.adapter.trainable_names}
        self.optimizer = torch.optim.AdamW(self.params.values(), lr=lr, betas=betas, weight_decay=weight_decay)
        adapters = {name: s.adapter for name, s in self.sites.items()}
        self.controller = next(iter(adapters.values())).controller_cls(adapters)
        self.step = 0
        self._collect_logits = False  # set by logits(): the loss function then hands back the logits

    def _forward_step(self, data_iterator, model):
        b = next(data_iterator)
        out = model(b["tokens"], b["position_ids"], b["attention_mask"], labels=b.get("labels"))
        return out, functools.partial(self._loss, b["loss_mask"])

    def _loss(self, loss_mask: Tensor, output: Tensor):
        if self._collect_logits:
            return output.sum() * 0, torch.tensor(1), {"logits": output.detach()}
        loss_sum = (output.float() * loss_mask).sum()
        return loss_sum / self._targets, loss_mask.sum().int(), {"loss_sum": loss_sum.detach()}

    def _run(self, batches: list[dict[str, Tensor]], forward_only: bool) -> list[dict]:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        b, s = batches[0]["tokens"].shape
        return get_forward_backward_func()(
            forward_step_func=self._forward_step, data_iterator=iter(batches), model=[self.model],
            num_microbatches=len(batches), seq_length=s, micro_batch_size=b, forward_only=forward_only)

    def logits(self, batch: dict[str, Tensor]) -> Tensor | None:
        """Full-vocabulary logits [b, s, V] of one batch (on the last stage; None elsewhere)."""
        from megatron.core import parallel_state as ps

        self._collect_logits = True
        try:
            with torch.no_grad():
                out = self._run([{k: v for k, v in batch.items() if k != "labels"}], forward_only=True)
        finally:
            self._collect_logits = False
        if not ps.is_pipeline_last_stage():
            return None
        return collectives.all_gather_cat(out[0]["logits"], -1, self.layout.tp_group)

    def train_step(self, batches: list[dict[str, Tensor]], lr: float, max_grad_norm: float | None) -> float:
        """One optimizer step over ``batches`` (this DP rank's micro-batches); returns the step's mean loss."""
        self._targets = collectives.all_reduce(torch.tensor(sum(float(b["loss_mask"].sum()) for b in batches)),
                                               self.dp_group)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        out = self._run(batches, forward_only=False)
        self._reduce_grads()
        ctx = StepContext(self.step, lr, self.optimizer)
        self.controller.before_optimizer_step(ctx)
        self._clip(max_grad_norm)
        self.optimizer.step()
        self.controller.after_optimizer_step(ctx)
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        loss = torch.tensor(sum(float(o["loss_sum"]) for o in out), dtype=torch.float64)  # 0 off the last stage
        collectives.all_reduce(loss, self.mp_group)  # every stage learns it (pipeline ranks sum)
        collectives.all_reduce(loss, self.dp_group)
        return float(loss / (self._targets * self.layout.tp_size))

    def _reduce_grads(self) -> None:
        partial, every = [], []
        for s in self.sites.values():
            for name, layout in s.adapter.param_layouts().items():
                g = getattr(s.adapter, name).grad
                if g is not None:
                    every.append(g)
                    if layout.partial_grad and self.layout.tp_size > 1:
                        partial.append(g)
        collectives.all_reduce_coalesced(partial, self.layout.tp_group)
        collectives.all_reduce_coalesced(every, self.dp_group)

    def _clip(self, max_norm: float | None) -> float:
        """Global gradient norm as the single-process run computes it; clip in place when above max_norm."""
        sq = torch.zeros((), dtype=torch.float64)
        for s in self.sites.values():
            for name, layout in s.adapter.param_layouts().items():
                g = getattr(s.adapter, name).grad
                if g is not None and (layout.shard_dim is not None or self.layout.tp_rank == 0):
                    sq += g.double().pow(2).sum()
        collectives.all_reduce(sq, self.mp_group)
        norm = math.sqrt(float(sq))
        if max_norm and norm > max_norm:
            for p in self.params.values():
                if p.grad is not None:
                    p.grad.mul_(max_norm / (norm + 1e-6))
        return norm

    def full_adapter_state(self) -> dict[str, Tensor]:
        """Every adapter tensor unsplit, keyed like the transformers engine's files, on every rank: TP shards
        are gathered along their shard_dim, then pipeline stages exchange their layers."""
        import torch.distributed as dist

        local = {}
        for name, s in self.sites.items():
            for p, layout in s.adapter.param_layouts().items():
                t = getattr(s.adapter, p).detach()
                if layout.shard_dim is not None:
                    t = collectives.all_gather_cat(t, layout.shard_dim, self.layout.tp_group)
                local[f"{name}.{s.adapter.file_key(p)}"] = t.cpu()
        if self.layout.pp_size == 1:
            return local
        from megatron.core import parallel_state as ps

        parts: list = [None] * self.layout.pp_size
        dist.all_gather_object(parts, local, group=ps.get_pipeline_model_parallel_group())
        return {k: v for part in parts for k, v in part.items()}

