"""The training loop: one YAML config → a model with adapters, AdamW with warmup + cosine, gradient
accumulation and clipping, optional bf16 autocast, periodic evaluation, a JSONL metrics log, atomic
checkpoints and exact resume. Data parallelism: every rank of a torchrun launch takes its own slice of each
global micro-batch and adapter gradients are summed in one coalesced all-reduce per step.

Order of one optimizer step (the methods' hooks depend on it):
  forward/backward of every micro-batch (loss normalised by the step's target count over all ranks)
  → data-parallel gradient reduction → the step check (one all-reduce and the step's one host read: a non-finite
  loss or gradient norm skips the rest on every rank, ``guards.py``) → controller.before_optimizer_step → clip
  → optimizer.step → controller.after_optimizer_step → zero_grad.
Once before the first step (not on resume): controller.calibrate(draw, backward) where the method defines it.
With a ``deepspeed`` section the same order runs on DeepSpeed's ZeRO engine (``integrations/deepspeed.py``: its
backward reduces the gradients, its step clips and updates), built after calibration or resume (both run on
the plain model; a resumed checkpoint's tensors then go into DeepSpeed's partitions). Under ZeRO-3 the model is
loaded partitioned (``models.load_partitioned``) and gathered whole only for that one-time set-up.
Multitask data (``data.tasks``): batches carry per-sample ``task_ids`` (controller.on_batch hands them to the
adapters), each task is evaluated on its own held-out set, and ``controller.step_metrics`` (if any) joins the
step's log record.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from dist_peft.integrations.transformers import adapted_sites, enable_recompute, inject_adapters, save_adapter, \
    trainable_parameters, trainable_summary, write_adapter_files
from dist_peft.methods.base import Adapter, StepContext, declared_access
from dist_peft.parallel import collectives
from dist_peft.parallel.runtime import default_group_timeout, init_runtime
from dist_peft.profile.timer import NULL_TIMER
from dist_peft.train import checkpoint as ckpt, faults, guards
from dist_peft.train.config import ConfigError, RunConfig, TrainConfig, check_world_size
from dist_peft.train.data import IGNORE, build_data, collate
from dist_peft.train.loss import causal_lm_loss
from dist_peft.train.models import load_model, load_partitioned, model_folder


_logger = logging.getLogger(__name__)
RESUMABLE_CHANGES = {"train.steps", "train.progress", "train.threads", "train.eval_every", "train.save_every",
                     "train.collective_timeout_s", "train.resume", "train.step_timeout_s", "train.max_bad_steps"}


def _config_changes(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> set[str]:
    """Dotted keys whose values differ between two config dicts."""
    changes = set()
    for key in old.keys() | new.keys():
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changes |= _config_changes(a, b, f"{prefix}{key}.")
        elif a != b:
            changes.add(f"{prefix}{key}")
    return changes


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup over ``warmup_steps``, then cosine decay from lr to lr · min_lr_ratio at ``steps``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def build_optimizer(params: dict[str, nn.Parameter], adapters: Iterable[Adapter], t: TrainConfig) -> torch.optim.AdamW:
    """AdamW over ``params`` in their fixed order; tensors with adapter ``optimizer_overrides`` get their own
    group. Each group keeps ``initial_lr``; the schedule scales every group's lr by lr_at(step) / train.lr."""
    overrides = {id(getattr(a, name)): opts for a in adapters for name, opts in a.optimizer_overrides().items()}
    groups: dict[tuple, list[nn.Parameter]] = {}
    for p in params.values():
        groups.setdefault(tuple(sorted(overrides.get(id(p), {}).items())), []).append(p)
    return torch.optim.AdamW([{"params": ps, **dict(key), "initial_lr": dict(key).get("lr", t.lr)}
                              for key, ps in groups.items()], lr=t.lr, betas=t.betas, weight_decay=t.weight_decay)


class Trainer:
    def __init__(self, cfg: RunConfig, resume: str | Path | None = None, echo: Callable[[str], None] | None = None):
        """``resume``: None or ``never`` (fresh), ``auto``, ``latest`` or a checkpoint folder
        (``checkpoint.agreed_resume``). ``echo``: where the run's messages go; by default this module's logger on
        every rank (``logs.py`` shows rank 0's on the console, any rank's in its file); a callable given here
        hears rank 0's only."""
        self.cfg, t = cfg, cfg.train
        self.timer = NULL_TIMER  # phase ranges of the step; a profiler puts its PhaseTimer here
        self.rt = init_runtime(t.collective_timeout_s, world_check=lambda world: check_world_size(cfg, world))
        self.echo = _logger.info if echo is None else echo if self.rt.is_main else (lambda _msg: None)
        if t.threads:
            torch.set_num_threads(t.threads)
        self.run_dir = Path(cfg.output.dir)
        warn = _logger.warning if echo is None else (lambda msg: self.echo(f"warning: {msg}"))
        resume = ckpt.agreed_resume(self.run_dir, resume, self.rt.is_main, warn)  # the run's first collective
        self.mg = None  # the megatron-core engine, with a parallel section
        if cfg.parallel is None:
            if cfg.deepspeed is not None and cfg.deepspeed.zero_stage == 3:  # partitioned while it loads
                from dist_peft.integrations.deepspeed import ds_config

                self.model, self.tokenizer = load_partitioned(cfg.model, ds_config(cfg, self.rt.world), self.run_dir,
                                                              self.rt.is_main)
            else:
                self.model, self.tokenizer = load_model(cfg.model)
            torch.manual_seed(t.seed)  # dropout and any trainable head draw from here on
            inject_adapters(self.model, cfg.method.name, cfg.method.options, cfg.method.target_modules,
                            cfg.model.trainable_modules, seed=t.seed)
            if cfg.recompute is not None:
                enable_recompute(self.model, cfg.recompute)
            self.model.to(self.rt.device)
            self.echo(f"{cfg.method.name} on {len(adapted_sites(self.model))} sites; {trainable_summary(self.model)}")
            self.params = trainable_parameters(self.model)
            adapters = {name: s.adapter for name, s in adapted_sites(self.model).items()}
            vocab, self.data_rank, self.data_world = self.model.config.vocab_size, self.rt.rank, self.rt.world
        else:
            from dist_peft.integrations.megatron_engine import MegatronEngine  # megatron only when configured

            folder, self.tokenizer = model_folder(cfg.model, self.run_dir, self.rt.is_main)
            torch.manual_seed(t.seed)
            self.mg = MegatronEngine(cfg, folder)
            self.model, self.params, adapters = None, self.mg.params, self.mg.adapters
            vocab, self.data_rank, self.data_world = self.mg.hf.vocab_size, self.mg.data_rank, self.mg.data_world
            self.echo(f"{cfg.method.name} on megatron-core, tensor {cfg.parallel.tensor} × pipeline "
                      f"{cfg.parallel.pipeline} × data {self.data_world}; rank {self.rt.rank} holds {len(adapters)} "
                      "sites")
        self.optimizer = build_optimizer(self.params, adapters.values(), t)
        self.controller = next(iter(adapters.values())).controller_cls(adapters)
        self.controller.data_group = self.mg.dp_group if self.mg else None
        self.controller.layer_group = self.mg.pp_group if self.mg and self.mg.layout.pp_size > 1 else None
        self.train_ds, self.eval_sets, self.order = build_data(cfg.data, self.tokenizer, vocab,
                                                               self.run_dir / "data-cache", self.echo)
        if cfg.model.num_labels:  # a label past the classification head would index outside it mid-run
            top = max((max(d["labels"]) for d in (self.train_ds, *self.eval_sets.values()) if len(d)), default=0)
            if top >= cfg.model.num_labels:
                raise ConfigError(f"model.num_labels: {cfg.model.num_labels} classes, but the data has label {top}")
        self.step = self.position = 0
        self.bad_steps = self.skipped_steps = 0  # non-finite steps in a row / in this run, resumes included
        self._nan_steps = guards.injected_nan_steps(self.rt.rank)  # test hook, empty unless its variable is set
        self.history: list[dict[str, Any]] = []
        self.ds = None  # calibration and resume run on the plain model (_loss_sum reads self.ds)
        c = self._resume(Path(resume)) if resume is not None else None
        if self.rt.is_main:  # the log continues at this step: what a killed attempt logged after it goes
            ckpt.rewind_metrics(self.run_dir / "metrics.jsonl", self.step, keep_eval=self.step < t.steps)
        if c is None:
            self._calibrate()  # on the plain model: before DeepSpeed takes the gradients over
        self.ds = self._zero_engine()  # partitions the model as calibrated or restored
        if c is not None and self.ds is not None:
            self.ds.restore(c)  # the checkpoint's whole tensors into DeepSpeed's partitions
        from dist_peft.profile.monitor import TrainMonitor

        self.monitor = TrainMonitor(self)  # profile / log sections: profiled figures, TensorBoard, W&B

    def _zero_engine(self):
        """DeepSpeed's ZeRO engine around the model and optimizer when the config has a deepspeed section."""
        if self.cfg.deepspeed is None:
            return None
        from dist_peft.integrations.deepspeed import ZeroEngine  # deepspeed is imported only when configured

        with default_group_timeout(self.cfg.train.collective_timeout_s):  # DeepSpeed's groups take no timeout
            return ZeroEngine(self.model, self.optimizer, self.params, self.cfg)

    def _whole_model(self, modify: bool = False) -> contextlib.AbstractContextManager:
        """The model's frozen weights whole inside, for the one-time set-up that runs before the engine exists
        (calibration, a resumed controller's state). Only a ZeRO-3 run's model is partitioned then
        (``models.load_partitioned``); it is gathered whole for that set-up alone (issue 13's remaining gap: no
        per-module path yet). ``modify``: values written inside are partitioned back (rank 0's)."""
        if self.cfg.deepspeed is None or self.cfg.deepspeed.zero_stage != 3:
            return contextlib.nullcontext()
        from dist_peft.integrations.deepspeed import gathered

        return gathered(self.model.parameters(), modify=modify)

    def _resume(self, path: Path) -> ckpt.Checkpoint:
        c = ckpt.load_checkpoint(path, *((self.mg.part_name, self.rt.world) if self.mg else ()))
        # Decision (issue 7): every engine writes whole tensors in one format, so the deepspeed section may change.
        changed = {k for k in _config_changes(c.config, self.cfg.to_dict())
                   if k.split(".")[0] not in ("deepspeed", "profile", "log")}
        changed -= RESUMABLE_CHANGES
        if changed:
            raise ValueError(f"--resume {path}: the checkpoint was written with a different "
                             f"{', '.join(sorted(changed))}; only {', '.join(sorted(RESUMABLE_CHANGES))} and the "
                             f"deepspeed section may change on resume")
        with self._whole_model(modify=True):  # a controller's state may hold frozen weights (ScaLoRA's merged W)
            ckpt.restore(c, self.params, self.optimizer, self.controller)
        # A checkpoint follows an applied step, so the count of bad steps in a row is 0 there (as after __init__).
        self.step, self.position, self.skipped_steps = c.step, c.data_position, c.meta["skipped_steps"]
        self.echo(f"resumed from {path} at step {self.step}")
        return c

    def _calibrate(self) -> None:
        """One-time data-dependent set-up before the first step, for a method whose controller defines
        ``calibrate(draw, backward)`` (FO-LoRA's frequency allocation): ``draw(task, i)`` is micro-batch i of the
        task's own training stream (this rank's slice), ``backward`` backpropagates its summed loss. A resumed run
        restores the result from the checkpoint's controller state instead."""
        calibrate = getattr(self.controller, "calibrate", None)
        if calibrate is None:
            return
        t = self.cfg.train

        def draw(task: int, i: int) -> dict[str, Tensor]:
            return self._batch(self.order.task_micro_batch(self.train_ds, task, i, t.micro_batch_size,
                                                           self.data_rank, self.data_world))

        def backward(batch: dict[str, Tensor]) -> None:
            if self.mg is not None:
                return self.mg.backward_sum(self._megatron(batch))
            self.model.train()
            self._loss_sum(batch)[0].backward()

        with self._whole_model():
            calibrate(draw, backward)
        self.optimizer.zero_grad(set_to_none=True)

    def _autocast(self):
        if self.cfg.train.precision == "bf16":
            return torch.autocast(self.rt.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _loss_sum(self, batch: dict[str, Tensor], with_correct: bool = False) -> tuple[Tensor, Tensor | None]:
        """(sum of per-target cross-entropies, number of correct argmax predictions or None), on the device. A
        causal LM's loss is chunked over tokens (``train/loss.py``: no micro-batch-sized logits); the accuracy is
        computed only when asked (evaluation)."""
        model = self.model if self.ds is None else self.ds.module
        with self._autocast():
            if batch["labels"].dim() == 2:
                return causal_lm_loss(model, batch, with_correct)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logits, labels = logits.float(), batch["labels"]  # classification: b × num_labels
        loss = F.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="sum")
        return loss, (logits.argmax(-1) == labels).sum() if with_correct else None

    def _batch(self, examples: list[dict]) -> dict[str, Tensor]:
        return {k: v.to(self.rt.device) for k, v in collate(examples, self.tokenizer.pad_token_id).items()}

    def _megatron(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        from dist_peft.integrations.megatron_engine import to_megatron_batch

        return to_megatron_batch(batch, self.cfg.data.seq_len, self.tokenizer.pad_token_id)

    @staticmethod
    def _targets(batch: dict[str, Tensor]) -> Tensor:
        """Loss targets of a batch, as a tensor on its device (no host synchronisation)."""
        labels = batch["labels"]
        return torch.tensor(labels.numel(), device=labels.device) if labels.dim() == 1 else \
            (labels[:, 1:] != IGNORE).sum()

    def train_step(self) -> dict[str, Any]:
        t = self.cfg.train
        faults.point("step", self.step)
        lr = lr_at(self.step, t)
        for group in self.optimizer.param_groups:
            group["lr"] = group["initial_lr"] * lr / t.lr
        with self.timer.phase("data"):
            batches = [self._batch(self.order.micro_batch(self.train_ds, self.position + i, t.micro_batch_size,
                                                           self.data_rank, self.data_world))
                       for i in range(t.grad_accum)]
            # Decision (issue 17): counts, losses and the norm stay on the device; the step reads them once, in its
            # check before the controller hooks (issue 14, ``guards``).
            counts = torch.stack([sum(self._targets(b) for b in batches),
                                  sum(b["attention_mask"].sum() for b in batches)]).float()
            collectives.all_reduce(counts, self.controller.data_group)
        if self.mg is not None:  # megatron's schedule runs every micro-batch (pipelined; it marks its own phases)
            with self.timer.phase("schedule"):
                loss_sum = self._injected(self.mg.forward_backward([self._megatron(b) for b in batches], counts[0],
                                                                   self.controller))
        else:
            self.model.train()
            loss_sum = torch.zeros((), device=self.rt.device)
            for i, batch in enumerate(batches):
                with self.timer.phase("forward"):
                    self.controller.on_batch(batch)
                    loss = self._injected(self._loss_sum(batch)[0])
                with self.timer.phase("backward"):  # ZeRO: DeepSpeed's gradient reduction runs inside
                    if self.ds is not None:
                        self.ds.backward(loss / counts[0], last=i == len(batches) - 1)
                    else:
                        (loss / counts[0]).backward()
                loss_sum += loss.detach()
        if self.ds is None:  # ZeRO reduced the gradients inside the last backward
            with self.timer.phase("grad_reduce"):
                if self.mg is not None:
                    self.mg.reduce_grads()
                else:
                    collectives.all_reduce_coalesced([p.grad for p in self.params.values() if p.grad is not None])
        with self.timer.phase("log"):  # the step's one all-reduce and one read of its device values
            loss_sum, targets, tokens, norm, finite = self._step_check(loss_sum, counts)
        if not finite:
            return self._skip_step(lr, loss_sum / targets, norm, tokens)
        if self.ds is not None:  # hooks, clip, step and zero_grad in the order above, on DeepSpeed's partitions
            with self.timer.phase("optimizer"):  # the engine marks its controller hooks apart
                self.ds.optimizer_step(self.controller, self.ds.step_context(self.step, lr, t.steps))
        else:
            ctx = StepContext(self.step, lr, self.optimizer, total_steps=t.steps)
            with self.timer.phase("hooks_before_step"), declared_access(self.controller, "before_optimizer_step", ctx,
                                                                        self.params):
                self.controller.before_optimizer_step(ctx)
            with self.timer.phase("clip"):
                if self.mg is not None:
                    self.mg.clip(t.max_grad_norm)
                else:
                    grads = [p for p in self.params.values() if p.grad is not None]
                    torch.nn.utils.clip_grad_norm_(grads, t.max_grad_norm if t.max_grad_norm else math.inf)
            with self.timer.phase("optimizer"):
                self.optimizer.step()
            with self.timer.phase("hooks_after_step"), declared_access(self.controller, "after_optimizer_step", ctx,
                                                                       self.params):
                self.controller.after_optimizer_step(ctx)
            with self.timer.phase("optimizer"):
                self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.position += t.grad_accum
        self.bad_steps = 0
        return {"step": self.step, "loss": loss_sum / targets, "lr": lr, "grad_norm": norm, "tokens": int(tokens),
                "skipped_steps": self.skipped_steps, **getattr(self.controller, "step_metrics", {})}

    def _injected(self, loss: Tensor) -> Tensor:
        """``loss`` times NaN in the attempted steps that ``guards.NAN_ENV`` names for this rank (a test hook)."""
        return loss * math.nan if self.position // self.cfg.train.grad_accum in self._nan_steps else loss

    def _step_check(self, loss_sum: Tensor, counts: Tensor) -> tuple[float, float, float, float, bool]:
        """(loss sum, targets, tokens, gradient norm, finite) of the step, from one all-reduce over the world and
        one host read, after the gradient reduction and before any controller hook (``guards``).

        The reduced vector holds the loss sum (each data-parallel replica's once: under megatron its TP 0 / PP 0
        rank's), the squared norm of the reduced gradients (each element once: rank 0's whole gradients on the plain
        engine, every rank's ZeRO partitions, the first data replica's TP/PP shards under megatron) and the number of
        ranks whose own loss or gradients are not finite. Every rank reads the same three numbers, so all skip the
        step or none. The logged ``grad_norm`` is this norm: the loss gradient's, before the hooks and clipping."""
        if self.ds is not None:
            sq, loss_counts, sq_counts = self.ds.grad_sq(), True, True
        elif self.mg is not None:
            layout = self.mg.layout
            sq, loss_counts, sq_counts = self.mg.grad_sq(), layout.tp_rank == layout.pp_rank == 0, self.data_rank == 0
        else:
            grads = [p.grad for p in self.params.values() if p.grad is not None]
            sq = torch.stack(torch._foreach_norm(grads)).double().pow(2).sum() if grads else loss_sum.new_zeros(())
            loss_counts, sq_counts = True, self.rt.rank == 0
        zero = torch.zeros((), dtype=torch.float64, device=loss_sum.device)
        bad = (~torch.isfinite(loss_sum) | ~torch.isfinite(sq)).double()
        check = torch.stack([loss_sum.double() if loss_counts else zero, sq.double() if sq_counts else zero, bad])
        collectives.all_reduce(check)
        loss, sq_total, bad_ranks, targets, tokens = torch.cat([check, counts.double()]).tolist()
        finite = bad_ranks == 0 and math.isfinite(loss) and math.isfinite(sq_total)
        return loss, targets, tokens, math.sqrt(sq_total) if sq_total >= 0 else math.nan, finite

    def _skip_step(self, lr: float, loss: float, norm: float, tokens: float) -> dict[str, Any]:
        """Skip a step whose loss or gradient norm is not finite, on every rank (``guards``): its gradients are
        dropped and its batch is passed; weights, optimizer state, the step counter (so the schedules) and the
        method state stay. ``train.max_bad_steps`` of them in a row end the run."""
        t = self.cfg.train
        if self.ds is not None:
            self.ds.skip_step()
        else:
            self.optimizer.zero_grad(set_to_none=True)
        self.controller.on_skipped_step(StepContext(self.step, lr, self.optimizer, total_steps=t.steps))
        self.position += t.grad_accum
        self.bad_steps += 1
        self.skipped_steps += 1
        if self.bad_steps >= t.max_bad_steps:
            raise guards.StepFaultError(
                f"train.max_bad_steps: {self.bad_steps} steps in a row had a non-finite loss or gradient norm (the "
                f"last after step {self.step}: loss {loss}, gradient norm {norm}); each was skipped and nothing was "
                f"updated. Lower train.lr or check the data before position {self.position}, then resume")
        return {"step": self.step, "skipped": True, "loss": loss if math.isfinite(loss) else None, "lr": lr,
                "grad_norm": norm if math.isfinite(norm) else None, "tokens": int(tokens),
                "skipped_steps": self.skipped_steps}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Held-out metrics. Multitask data: each task's metrics as ``eval_<task>_<metric>`` and ``eval_loss``
        the unweighted mean of the tasks' losses."""
        if "" in self.eval_sets:
            return self._evaluate_set(self.eval_sets[""])
        out = {f"eval_{name}_{k[5:]}": v for name, ds in self.eval_sets.items()
               for k, v in self._evaluate_set(ds).items()}
        return {"eval_loss": sum(out[f"eval_{name}_loss"] for name in self.eval_sets) / len(self.eval_sets), **out}

    def _evaluate_set(self, eval_ds) -> dict[str, float]:
        """Mean loss over one held-out set (perplexity for LMs, accuracy for classification); each rank
        takes every world-th batch and the sums are reduced."""
        t = self.cfg.train
        n_batches = math.ceil(len(eval_ds) / t.micro_batch_size)
        if t.eval_batches:
            n_batches = min(n_batches, t.eval_batches)
        sums = torch.zeros(3, dtype=torch.float64, device=self.rt.device)  # loss, targets, correct
        # ZeRO-3 gathers weights inside every forward (collectives): then all ranks run as many forwards, the
        # ranks past the last batch repeating it without counting it.
        lockstep = self.ds is not None and self.cfg.deepspeed.zero_stage == 3
        rank, world = self.data_rank, self.data_world
        for i in range(rank, math.ceil(n_batches / world) * world if lockstep else n_batches, world):
            b = min(i, n_batches - 1)
            rows = eval_ds.select(range(b * t.micro_batch_size, min((b + 1) * t.micro_batch_size, len(eval_ds))))
            batch = self._batch(list(rows))
            if self.mg is not None:
                loss, correct = self.mg.eval_sums(self._megatron(batch), self.controller)
            else:
                self.model.eval()
                self.controller.on_batch(batch)
                loss, correct = self._loss_sum(batch, with_correct=True)
            if i < n_batches:
                sums += torch.stack([torch.as_tensor(v, dtype=torch.float64, device=self.rt.device)
                                     for v in (loss, self._targets(batch), correct)])
        collectives.all_reduce(sums, self.controller.data_group)
        mean = (sums[0] / sums[1]).item()
        out = {"eval_loss": mean, "eval_accuracy": (sums[2] / sums[1]).item()}
        if self.cfg.model.task == "causal_lm":
            out["eval_ppl"] = math.exp(mean)
        return out

    def save(self) -> Path | None:
        """Write a checkpoint from rank 0 (None elsewhere); every rank must call it. Under DeepSpeed the whole
        tensors are gathered from the partitions first; under megatron-core every rank writes its own part, its
        shards and RNG states (``checkpoint.save_parts``)."""
        folder = ckpt.checkpoint_dir(self.run_dir, self.step)
        state = (self.params, self.optimizer, self.controller) if self.ds is None else \
            self.ds.full_state(self.controller)
        meta = {"step": self.step, "data_position": self.position, "skipped_steps": self.skipped_steps,
                "config": self.cfg.to_dict()}
        if self.mg is not None:
            path = ckpt.save_parts(folder, self.mg.part_name, self.rt.is_main, **meta, params=state[0], optimizer=state[1],
                                   controller=state[2], rng=ckpt.local_rng_states())
        else:
            rng = ckpt.gathered_rng_states()  # a collective: every rank's generators to the writer
        with ckpt.written_together(folder):  # a failed write ends every rank at once, with its cause
            if self.rt.is_main:
                if self.mg is None:
                    path = ckpt.save_checkpoint(folder, **meta, params=state[0], optimizer=state[1],
                                                controller=state[2], rng=rng)
                ckpt.prune(self.run_dir, self.cfg.train.keep_checkpoints, path)
        return path if self.rt.is_main else None

    def save_adapter(self, adapter_dir: Path) -> Path:
        """Write the adapter files (HF PEFT layout) from rank 0; every rank must call it: under DeepSpeed and
        megatron-core the whole tensors are gathered first."""
        if self.mg is not None:  # whole tensors gathered over TP and PP, in the transformers engine's files
            state = self.mg.full_adapter_state()
            with ckpt.written_together(adapter_dir, "adapter files"):
                if self.rt.is_main:
                    first = next(iter(self.mg.adapters.values()))
                    write_adapter_files(adapter_dir, state, first, sorted(self.cfg.method.target_modules), [],
                                        base_model=self.cfg.model.source)
            return adapter_dir
        with contextlib.nullcontext() if self.ds is None else self.ds.gathered_params():
            with ckpt.written_together(adapter_dir, "adapter files"):
                if self.rt.is_main:
                    task = "SEQ_CLS" if self.cfg.model.task == "classification" else "CAUSAL_LM"
                    save_adapter(self.model, adapter_dir, base_model=self.cfg.model.source, task_type=task)
        return adapter_dir

    def _log(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        if self.rt.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
        self.monitor.write(record)

    def run(self) -> dict[str, Any]:
        """Train to ``train.steps``; return the summary (eval before/after, tokens/s, where files went)."""
        t = self.cfg.train
        before = self.evaluate()
        if self.step == 0:  # a resumed run's log already holds its step's records (rewind_metrics)
            self._log({"step": self.step, **before})
        self.echo("held-out before: " + _fmt(before))
        bar = tqdm(total=t.steps, initial=self.step, disable=not (t.progress and self.rt.is_main), desc="train",
                   unit="step", dynamic_ncols=True)
        tokens, seconds = 0, 0.0
        ckpt_path = ckpt.latest_checkpoint(self.run_dir) if self.step >= t.steps else None
        watchdog = guards.StepWatchdog(t.step_timeout_s, self.run_dir, self.rt.rank, lambda: collectives.TRACE.last) \
            if t.step_timeout_s else None
        while self.step < t.steps:
            start = time.perf_counter()
            with self.monitor.step(), watchdog.watch(self.step) if watchdog else contextlib.nullcontext():
                record = self.train_step()
            seconds += time.perf_counter() - start
            tokens += record["tokens"]
            record["tokens_per_s"] = tokens / seconds
            self.monitor.add(record)
            self._log(record)
            if record.get("skipped"):  # no update: no progress, evaluation or checkpoint
                bar.set_postfix(skipped=self.skipped_steps)
                continue
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}", tok_s=f"{tokens / seconds:.0f}",
                            **({"skipped": self.skipped_steps} if self.skipped_steps else {}))
            if t.eval_every and self.step % t.eval_every == 0 and self.step < t.steps:
                self._log({"step": self.step, **self.evaluate()})
            if self.step == t.steps or t.save_every and self.step % t.save_every == 0:
                ckpt_path = self.save()
        bar.close()
        if watchdog:
            watchdog.close()
        after = self.evaluate()
        self._log({"step": self.step, **after})
        self.monitor.close()
        adapter_dir = self.save_adapter(self.run_dir / "adapter")
        summary = {"eval_before": before, "eval_after": after, "tokens_per_s": tokens / seconds if seconds else None,
                   "threads": torch.get_num_threads(), "adapter_dir": str(adapter_dir),
                   "checkpoint": str(ckpt_path) if ckpt_path else None, "steps": self.step}
        self.echo("held-out after:  " + _fmt(after))
        self.echo(f"training throughput: {summary['tokens_per_s'] or 0:.1f} tokens/s "
                  f"({summary['threads']} threads, {self.rt.world} rank(s))")
        self.echo(f"adapter saved to {adapter_dir} (HF PEFT layout); checkpoint {ckpt_path}")
        return summary


def _fmt(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k[5:]} {v:.4f}" for k, v in metrics.items())
