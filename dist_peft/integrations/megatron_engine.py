"""Adapters on the megatron-core GPTModel under TP × PP × DP, driven by megatron's own schedules
(``get_forward_backward_func``: no pipelining or 1F1B). The Trainer runs it when the config has a
``parallel`` section; the methods' math is the same modules as everywhere, through each site's ShardSpec.

One optimizer step, in order (the Trainer's order, so every method's hooks see what they see elsewhere):
  1. the Trainer counts the step's loss targets over the data-parallel group (one scalar all-reduce);
  2. ``forward_backward``: megatron's schedule runs every micro-batch; the last stage's loss is
     Σ masked per-token cross-entropy / (step targets), so accumulation and DP equal one big batch;
  3. the Trainer's step: ``reduce_grads`` (partial gradients of replicated adapter factors summed over the TP
     group, all layers in one coalesced all-reduce, then every adapter gradient over the DP group in one more)
     → controller.before_optimizer_step → ``clip`` by the global norm → optimizer.step →
     controller.after_optimizer_step → zero_grad.
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor

from dist_peft.files import atomic_dir, save_tensors, write_json
from dist_peft.integrations.megatron import Layout, attach_adapters, build_model, hf_tensors
from dist_peft.integrations.transformers import AdaptedLinear, set_merged
from dist_peft.methods.base import Controller, ParamLayout
from dist_peft.parallel import collectives
from dist_peft.parallel.runtime import ensure_process_group
from dist_peft.train.config import ConfigError, RunConfig
from dist_peft.train.data import IGNORE

REPLICATED = ParamLayout(None, False)
FORWARD_ONLY = {"eval", "logits"}
"""Modes of ``_run``, by what the last stage's loss function returns: train (Σ CE / step targets), sum (Σ CE:
calibration backward passes), eval (CE sum and correct argmax count), logits (the logits)."""


def to_megatron_batch(batch: Mapping[str, Tensor], seq_len: int, pad_id: int) -> dict[str, Tensor]:
    """A collated HF-style batch (input_ids, labels with -100, optional task_ids) → megatron's tokens,
    next-token labels and loss mask, padded to ``seq_len`` so that every micro-batch has the shape pipeline p2p
    expects (padding is masked out of the loss and, being after the text, never attended by it). No attention mask:
    the core attention is causal by construction (``megatron.SDPAttention``), so no s×s tensor is built."""
    input_ids, labels = batch["input_ids"], batch["labels"]
    b, s = input_ids.shape
    if s > seq_len:
        raise ValueError(f"a batch of length {s} exceeds data.seq_len {seq_len}")
    dev = input_ids.device
    tokens = torch.full((b, seq_len), pad_id, dtype=torch.long, device=dev)
    tokens[:, :s] = input_ids
    target = torch.full((b, seq_len), IGNORE, dtype=torch.long, device=dev)
    target[:, : s - 1] = labels[:, 1:]
    out = {"tokens": tokens, "labels": target.clamp(min=0), "loss_mask": (target != IGNORE).float(),
           "position_ids": torch.arange(seq_len, device=dev).expand(b, -1), "attention_mask": None}
    if "task_ids" in batch:
        out["task_ids"] = batch["task_ids"]
    return out


class MegatronEngine:
    """This rank's pipeline stage of the model with adapters, and the step of the module docstring."""

    def __init__(self, cfg: RunConfig, hf_folder: str | Path):
        from megatron.core import parallel_state as ps
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        from dist_peft.integrations import megatron_cpu

        p = cfg.parallel
        if p.sequence_parallel and cfg.data.seq_len % p.tensor:
            raise ConfigError(f"data.seq_len: {cfg.data.seq_len} tokens do not split over the {p.tensor} ranks of "
                              f"sequence parallelism (parallel.tensor)")
        megatron_cpu.apply()
        ensure_process_group()
        if not ps.model_parallel_is_initialized():
            ps.initialize_model_parallel(p.tensor, p.pipeline, p.virtual_pipeline if p.virtual_pipeline > 1 else None,
                                         distributed_timeout_minutes=cfg.train.collective_timeout_s / 60)
        model_parallel_cuda_manual_seed(cfg.train.seed)
        self.cfg = cfg
        dtype = torch.bfloat16 if cfg.model.dtype == "bfloat16" else torch.float32
        self.chunks, self.hf, self.canonical = build_model(hf_folder, dtype, p.sequence_parallel, cfg.recompute)
        for chunk in self.chunks if torch.cuda.is_available() else ():
            chunk.cuda(torch.cuda.current_device())
        self.min_microbatches = p.pipeline if len(self.chunks) > 1 else 1
        """The interleaved schedule runs micro-batches in groups of pipeline size: shorter runs (eval, logits,
        calibration) are padded with copies whose loss mask is zero."""
        m = cfg.method
        self.sites: dict[str, AdaptedLinear] = attach_adapters(self.canonical, m.name, m.options, m.target_modules,
                                                               cfg.train.seed)
        self.layout = Layout.current()
        self.dp_group, self.mp_group = ps.get_data_parallel_group(), ps.get_model_parallel_group()
        self.pp_group = ps.get_pipeline_model_parallel_group()
        self.data_rank, self.data_world = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        self.last_stage = ps.is_pipeline_last_stage()
        self.part_name = f"tp{self.layout.tp_rank:02d}_pp{self.layout.pp_rank:02d}_dp{self.data_rank:03d}"
        """This rank's part of a checkpoint (``checkpoint.save_parts``)."""
        self.params = {f"{name}.adapter.{p}": t for name, s in self.sites.items()
                       for p, t in s.adapter.named_parameters() if t.requires_grad}
        self.device = next(iter(self.params.values())).device
        self._mode, self._targets, self._controller = "train", 1.0, Controller({})
        self._replays = cfg.recompute is not None and cfg.recompute.granularity == "full" and p.pipeline > 1
        """Full recompute under a pipeline schedule re-runs a micro-batch's layers in its backward, after later
        micro-batches' forwards have run on this stage: ``controller.on_batch`` is called again with that
        micro-batch just before (a hook on the stage output), so per-micro-batch adapter state (FO-LoRA's task ids)
        is the forward's. on_batch sets state, it does not count: calling it twice changes nothing else."""

    @property
    def adapters(self) -> dict[str, Any]:
        return {name: s.adapter for name, s in self.sites.items()}

    def _forward_step(self, data_iterator, model):
        b = next(data_iterator)
        self._controller.on_batch(b)
        labels = None if self._mode in FORWARD_ONLY else b["labels"]  # logits, for the argmax too
        out = model(b["tokens"], b["position_ids"], b["attention_mask"], labels=labels)
        if self._replays and out.requires_grad:
            out.register_hook(lambda grad: self._controller.on_batch(b))
        return out, functools.partial(self._loss, b)

    def _loss(self, b: Mapping[str, Tensor], output: Tensor):
        mask = b["loss_mask"]
        if self._mode == "logits":
            return output.sum() * 0, mask.sum().int(), {"logits": output}
        if self._mode == "eval":
            from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

            ce = vocab_parallel_cross_entropy(output.float(), b["labels"])
            correct = (self._argmax(output) == b["labels"]).float() * mask
            return output.sum() * 0, mask.sum().int(), {"loss_sum": (ce * mask).sum(), "correct": correct.sum()}
        loss_sum = (output.float() * mask).sum()
        return loss_sum / self._targets, mask.sum().int(), {"loss_sum": loss_sum.detach()}

    def _argmax(self, logits: Tensor) -> Tensor:
        """Argmax over the whole vocabulary of vocab-parallel logits (two small all-gathers over TP)."""
        value, index = logits.float().max(-1)
        if self.layout.tp_size == 1:
            return index
        index = index + self.layout.tp_rank * logits.shape[-1]
        values = collectives.all_gather_cat(value[None], 0, self.layout.tp_group)
        indices = collectives.all_gather_cat(index[None], 0, self.layout.tp_group)
        return indices.gather(0, values.argmax(0, keepdim=True))[0]

    def _run(self, batches: list[dict[str, Tensor]], mode: str, controller: Controller | None = None) -> list[dict]:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        b, s = batches[0]["tokens"].shape
        if len(batches) < self.min_microbatches:
            pad = {**batches[-1], "loss_mask": torch.zeros_like(batches[-1]["loss_mask"])}
            batches = batches + [pad] * (self.min_microbatches - len(batches))
        self._mode, self._controller = mode, controller or Controller({})
        for chunk in self.chunks:
            chunk.train(mode not in FORWARD_ONLY)
        data = [iter(batches) for _ in self.chunks] if len(self.chunks) > 1 else iter(batches)
        with torch.no_grad() if mode in FORWARD_ONLY else contextlib.nullcontext():
            return get_forward_backward_func()(
                forward_step_func=self._forward_step, data_iterator=data, model=self.chunks,
                num_microbatches=len(batches), seq_length=s, micro_batch_size=b, forward_only=mode in FORWARD_ONLY)

    def _stage_sum(self, out: list[dict[str, Tensor]], keys: tuple[str, ...]) -> Tensor:
        """Σ over the micro-batches of each key's value, known on the last stage (zeros elsewhere), on every rank:
        float64 on the device, one all-reduce over the PP group, no host synchronisation."""
        t = torch.zeros(len(keys), dtype=torch.float64, device=self.device)
        if out:
            t += torch.stack([torch.stack([o[k] for o in out]).double().sum() for k in keys])
        return collectives.all_reduce(t, self.pp_group)

    def forward_backward(self, batches: list[dict[str, Tensor]], targets: float | Tensor,
                         controller: Controller) -> Tensor:
        """Forward/backward of this DP rank's micro-batches; returns their CE sum (on every rank of the replica) as
        a float64 device scalar: nothing in the schedule reads a value on the host."""
        self._targets = targets
        out = self._run(batches, "train", controller)
        return self._stage_sum(out, ("loss_sum",))[0]

    def backward_sum(self, batch: dict[str, Tensor]) -> None:
        """Backpropagate one micro-batch's summed loss (FO-LoRA's calibration passes: the controller has set
        the task, so no on_batch)."""
        self._run([batch], "sum")

    def eval_sums(self, batch: dict[str, Tensor], controller: Controller) -> tuple[float, float]:
        """(CE sum, correct next-token predictions) of one batch, on every rank of the replica."""
        out = self._run([batch], "eval", controller)
        loss, correct = self._stage_sum(out, ("loss_sum", "correct")).tolist()
        return loss, correct

    def reduce_grads(self) -> None:
        """TP partial sums of replicated factors, then DP sums of every adapter gradient: one coalesced
        all-reduce each, for all layers."""
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

    def grad_sq(self) -> Tensor:
        """Σ g² over this rank's adapter gradients, each element of the model once (sharded tensors on every TP rank,
        replicated ones on TP rank 0), float64 on the device: summed over TP and PP it is the global norm²."""
        sq = torch.zeros((), dtype=torch.float64, device=self.device)
        for s in self.sites.values():
            for name, layout in s.adapter.param_layouts().items():
                g = getattr(s.adapter, name).grad
                if g is not None and (layout.shard_dim is not None or self.layout.tp_rank == 0):
                    sq += g.double().pow(2).sum()
        return sq

    def clip(self, max_norm: float | None) -> Tensor:
        """Global gradient norm as the single-process run computes it (``grad_sq`` summed over TP and PP);
        clip in place when above max_norm, as ``clip_grad_norm_`` does (every gradient times min(1, max_norm /
        (norm + 1e-6)), on the device). Returns the norm before clipping, a device scalar."""
        norm = collectives.all_reduce(self.grad_sq(), self.mp_group).sqrt()
        if max_norm:
            coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
            grads = [p.grad for p in self.params.values() if p.grad is not None]
            if grads:
                torch._foreach_mul_(grads, coef.to(grads[0].dtype))
        return norm

    def full_adapter_state(self) -> dict[str, Tensor]:
        """Every adapter tensor (trainable and buffers) unsplit, keyed like the transformers engine's adapter
        files, on every rank: TP shards are gathered along their shard_dim, then pipeline stages exchange their
        layers (a collective)."""
        local = {}
        for name, s in self.sites.items():
            a = s.adapter
            buffers = a.buffer_layouts()
            for p, layout in {**a.param_layouts(), **{b: buffers.get(b, REPLICATED) for b in a.buffer_names}}.items():
                t = getattr(a, p).detach()
                if layout.shard_dim is not None:
                    t = collectives.all_gather_cat(t, layout.shard_dim, self.layout.tp_group)
                local[f"{name}.{a.file_key(p)}"] = t.cpu()
        return {k: v for part in collectives.all_gather_object(local, self.pp_group) for k, v in part.items()}

    def export_hf(self, out_dir: str | Path, tokenizer: Any, is_main: bool) -> Path:
        """The trained model as a merged Hugging Face folder (a collective): the first data-parallel replica
        merges its adapters into its weight shards and gathers each weight over TP in turn, keeping it on the host
        of the stage's first TP rank, which writes the stage's safetensors file; rank 0 adds the index, config and
        tokenizer and moves it all into ``out_dir`` at once. The adapters are unmerged again afterwards."""
        out_dir = Path(out_dir)
        staging = out_dir.parent / f".{out_dir.name}.parts"
        files = [f"model-{p + 1:05d}-of-{self.layout.pp_size:05d}.safetensors" for p in range(self.layout.pp_size)]
        writer = self.layout.tp_rank == 0 and self.data_rank == 0
        if self.data_rank == 0:
            for chunk in self.chunks:
                set_merged(chunk, True)
            try:
                state = {k: t for k, t in hf_tensors(self.chunks, self.canonical, self.hf, self.layout) if writer}
            finally:
                for chunk in self.chunks:
                    set_merged(chunk, False)
            if writer:
                staging.mkdir(parents=True, exist_ok=True)
                save_tensors(staging / files[self.layout.pp_rank], state, metadata={"format": "pt"})
        written = collectives.all_gather_object((self.layout.pp_rank, sorted(state), sum(t.nbytes for t in state.values()))
                                                if writer else None)  # after it, every stage's file is written
        if is_main:
            stages = [w for w in written if w is not None]
            index = {"metadata": {"total_size": sum(size for _, _, size in stages)},
                     "weight_map": {k: files[p] for p, keys, _ in stages for k in keys}}
            with atomic_dir(out_dir) as tmp:
                for f in files:
                    (staging / f).rename(tmp / f)
                write_json(tmp / "model.safetensors.index.json", index)
                self.hf.save_pretrained(tmp)
                tokenizer.save_pretrained(tmp)
            staging.rmdir()
        return out_dir

    def logits(self, batch: dict[str, Tensor]) -> Tensor | None:
        """Full-vocabulary logits [b, s, V] of one batch on the last stage (None elsewhere)."""
        out = self._run([batch], "logits")
        if not self.last_stage:
            return None
        return collectives.all_gather_cat(out[0]["logits"], -1, self.layout.tp_group)
