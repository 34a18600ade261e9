"""DeepSpeed ZeRO-1/2/3 for the transformers path: the training loop's engine when a run has a ``deepspeed``
section (pinned: deepspeed 0.19.8).

What each stage partitions over the data-parallel ranks (P ranks, adapter tensors θ, frozen weights W):
  ZeRO-1: the fp32 master copy of θ and its Adam moments (each rank steps 1/P of θ);
  ZeRO-2: also the reduced gradients of θ;
  ZeRO-3: also θ itself and every frozen W of the model (gathered per module for its forward/backward).

Set-up order (``ZeroEngine.__init__``; each step needs the one before):
  1. the model holds its adapters and the client ``torch.optim.AdamW`` exists (``loop.build_optimizer``: one
     group per set of optimizer options, each with its ``initial_lr``);
  2. ``deepspeed.initialize`` wraps both (stage 3 partitions the adapters here: the frozen weights arrive
     partitioned, ``models.load_partitioned``); the client optimizer becomes
     DeepSpeed's inner optimizer over flat fp32 partitions, one per group, and keeps its ``param_groups``, so
     the loop's learning-rate schedule still writes ``group["lr"]``;
  3. ZeRO-3 only: each adapted site's frozen weight is registered as an external parameter of its
     ``AdaptedLinear``, so it stays gathered through the adapter's forward too (``Site.weight`` is whole
     wherever an adapter reads it) at no extra communication: the base layer's forward gathers it anyway.

One optimizer step (``loop.Trainer.train_step``):
  forward/backward of every micro-batch through the engine (DeepSpeed reduces the gradients at the last one)
  → controller.before_optimizer_step → DeepSpeed's step (clip by the global norm, AdamW, zero the gradients)
  → controller.after_optimizer_step.

Decision (issue 7, gradient scale): DeepSpeed averages gradients over the P ranks, while the plain engine sums
them (each rank's loss is already normalised by the whole step's target count). A hook on each trainable
tensor multiplies the gradient flowing into it by P (exact for P a power of two), and accumulation scaling is
off (``scale_wrt_gas=False``): the reduced gradient is then the plain engine's, so losses and weights equal the
single-process run. Scaling the loss instead would also scale every activation gradient that a method records
in its own backward hooks (FO-LoRA's refit), so it is not done.

Decision (issue 7, controllers run unchanged): a controller hook that a method overrides runs inside
``ZeroEngine.controller_view``: each trainable tensor holds its whole current value (gathered under ZeRO-3)
and, before the step, its reduced gradient in ``.grad`` (None when the forward gave it none) as the controller
declares it needs it for that step (``Controller.gradient_access``, issue 16): ``whole`` (gathered), ``local``
(this rank's part, zeros elsewhere: no collective) or ``none`` (``.grad`` untouched); values a
hook writes go back to DeepSpeed's fp32 master copy (``safe_set_full_fp32_param``) and gradients to its
partitions (``safe_set_full_grad``) — only the ones that changed, so a bf16 run never rounds an untouched
master copy. Adam moments are reached through ``ZeroOptimizerState`` (the ``safe_get/set_full_optimizer_state``
accessors). Frozen weights are reached through ``StepContext.gathered`` = ``gathered`` below
(``deepspeed.zero.GatheredParameters``). Every rank must make the same writes (they do: hooks are
deterministic functions of replicated values).

Decision (issue 7, tensors without a gradient): torch's AdamW skips a tensor whose ``.grad`` is None (no
moment decay, no step count, no weight decay); DeepSpeed would step its zero-filled partition. The engine
records which tensors received a gradient in the step and hides the flat partitions of groups that received
none from the inner optimizer's step (a step pre-hook sets their ``.grad`` to None, the post-hook restores
it), which is torch's own skip. A group that is partly without gradient cannot be skipped in part (one flat
tensor, one step counter): that is refused with the remedy (give those tensors their own group through
``Adapter.optimizer_overrides``).

Decision (issue 7, checkpoints): checkpoints hold whole tensors (the fp32 master of every adapter tensor and
its whole Adam moments, gathered with DeepSpeed's accessors), in the plain engine's format: a ZeRO-3 run's
checkpoint loads in one process, exports merged weights, and resumes under any stage or world size.

Decision (cpu_stack.md §5): on the CPU accelerator ``deepspeed.comm`` would JIT-compile a shared-memory op used
only by inference all-reduce (~70 s); it is skipped. The client AdamW means no DeepSpeed optimizer kernel is
ever compiled.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import logging
import os
import warnings
from typing import Any, Iterable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from dist_peft.accounting.memory import reduce_bucket_elements
from dist_peft.integrations.transformers import adapted_sites
from dist_peft.methods.base import Controller, StepContext, declared_access, hook_access
from dist_peft.parallel import collectives
from dist_peft.parallel.runtime import ensure_process_group
from dist_peft.profile.timer import NULL_TIMER
from dist_peft.train import checkpoint as ckpt
from dist_peft.train.config import RunConfig
from dist_peft.train.optim_state import FIRST_MOMENTS, SECOND_MOMENTS, OptimizerState


def ds_config(cfg: RunConfig, world: int, trainable: int | None = None) -> dict[str, Any]:
    """The DeepSpeed config of a run: batch sizes, clipping and ZeRO options from ``cfg``; ``trainable`` (the
    rank's trainable elements, when the adapters exist) sizes the gradient-reduction bucket that
    ``deepspeed.reduce_bucket_size`` leaves unset (``accounting.memory.reduce_bucket_elements``: DeepSpeed's 5e8
    would hold 2 GB on every GPU for adapters' gradients of a few hundred MB at most).

    Decision (issue 17, adapters stay fp32): DeepSpeed's ``bf16``/``fp16`` modes are never turned on. They cast the
    whole module, adapters included, to 16 bits (FRoD's Σ − σ⁰ is then non-zero at init, LoCA's locations
    quantise, gradients are reduced in bf16). Instead the frozen weights keep ``model.dtype`` (bf16 at scale), the
    adapters keep the fp32 their constructors give them, ``train.precision: bf16`` is the loop's autocast (as in
    the plain engine), and DeepSpeed, seeing fp32 trainable tensors, keeps fp32 master weights, fp32 gradients
    and fp32 reductions (``communication_data_type`` stated, not left to the default).

    Decision (ZeRO-3's ``memory_efficient_linear`` off): DeepSpeed installs it by replacing
    ``torch.nn.functional.linear`` process-wide, and it stays after the engine is gone: every later model in the
    process (a plain engine's too) and every adapter's ``F.linear`` would run DeepSpeed's autograd function instead
    of torch's. torch's linear is correct under ZeRO-3 (DeepSpeed gathers a module's parameters again before its
    backward), and saves the same tensors."""
    t, z = cfg.train, cfg.deepspeed
    zero: dict[str, Any] = {"stage": z.zero_stage, "memory_efficient_linear": False}
    for ours, theirs in (("reduce_bucket_size", "reduce_bucket_size"),
                         ("param_persistence_threshold", "stage3_param_persistence_threshold"),
                         ("max_live_parameters", "stage3_max_live_parameters"),
                         ("max_reuse_distance", "stage3_max_reuse_distance"),
                         ("prefetch_bucket_size", "stage3_prefetch_bucket_size")):
        if getattr(z, ours) is not None:
            zero[theirs] = getattr(z, ours)
    if trainable is not None:
        zero["reduce_bucket_size"] = reduce_bucket_elements(z.reduce_bucket_size, trainable)
    return {"train_micro_batch_size_per_gpu": t.micro_batch_size, "gradient_accumulation_steps": t.grad_accum,
            "train_batch_size": t.micro_batch_size * t.grad_accum * world,
            "gradient_clipping": t.max_grad_norm or 0.0, "communication_data_type": "fp32",
            "zero_optimization": zero, "steps_per_print": 2**31 - 1, "wall_clock_breakdown": False}


def _import_deepspeed():
    """Import deepspeed quietly; on the CPU accelerator skip the shared-memory op build (module docstring)."""
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu":
        # ``import deepspeed.comm.torch`` would bind the torch module itself (deepspeed.comm has a ``torch``
        # attribute), so the patch must go through importlib (cpu_stack.md §5).
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    import deepspeed
    from deepspeed.utils import logger

    logger.setLevel(logging.WARNING)
    # DeepSpeed 0.19.8 calls torch's deprecated all_gather_into_tensor / reduce_scatter_tensor on every step.
    warnings.filterwarnings("ignore", category=FutureWarning, message=r".*(all_gather_into|reduce_scatter)_tensor")
    return deepspeed


def gathered(tensors: Iterable[Tensor], modify: bool = False) -> contextlib.AbstractContextManager:
    """The access point to tensors that ZeRO-3 partitions (frozen weights, adapter tensors): inside the context
    each holds its whole value on every rank; with ``modify=True`` the values written inside are partitioned
    back on exit (rank 0's copy is kept, so every rank must write the same). A collective: every rank enters
    it with the same tensors. Tensors no engine partitions pass through unchanged (no communication)."""
    tensors = list(tensors)
    if not any(hasattr(t, "ds_id") for t in tensors):
        return contextlib.nullcontext()
    return _import_deepspeed().zero.GatheredParameters(tensors, modifier_rank=0 if modify else None)


def _flat_groups(zero_opt: Any) -> list[tuple[list[nn.Parameter], Tensor]]:
    """(the model tensors, their flat fp32 partition on this rank) per group of DeepSpeed's ZeRO optimizer."""
    if hasattr(zero_opt, "fp32_partitioned_groups_flat"):  # ZeRO-3 (sub-groups of the param groups)
        return list(zip(zero_opt.fp16_groups, zero_opt.fp32_partitioned_groups_flat))
    return list(zip(zero_opt.bit16_groups, zero_opt.single_partition_of_fp32_groups))  # ZeRO-1/2


class ZeroOptimizerState(OptimizerState):
    """``OptimizerState`` over DeepSpeed's partitioned AdamW state, through the ``safe_get/set_full_*``
    accessors (each a collective: every rank calls them in the same order).

    The inner optimizer keeps one step counter per flat group, and DeepSpeed steps every group at every step,
    so ``step`` is the group's counter and ``clear`` must take whole groups (it refuses part of one)."""

    def __init__(self, zero_optimizer: Any):
        self.zero = zero_optimizer
        self.inner: torch.optim.Optimizer = zero_optimizer.optimizer
        self.groups = _flat_groups(zero_optimizer)
        self.group_of = {id(p): i for i, (ps, _) in enumerate(self.groups) for p in ps}
        self.linked = not hasattr(zero_optimizer, "bit16_groups")  # ZeRO-3 reads the inner state directly

    def _state(self, param: Tensor) -> dict[str, Any]:
        """The inner optimizer's state of ``param``'s flat group ({} before the first step)."""
        state = self.inner.state.get(self.groups[self.group_of[id(param)]][1], {})
        if state and not self.linked:
            self._link()
        return state

    def _link(self) -> None:
        """Point every ZeRO-1/2 tensor's fragment at its group's state. DeepSpeed 0.19.8 links all groups once,
        after the first group's first step, so later groups of a multi-group optimizer stay unlinked and its
        ``safe_*_optimizer_state`` fail on them; linking again is idempotent (views, no copies)."""
        from deepspeed.utils.mixed_precision_linkage import lazy_init_hp_params_optimizer_state

        for params, flat in self.groups:
            if self.inner.state.get(flat):
                lazy_init_hp_params_optimizer_state(params, flat, self.inner.state)
        self.linked = all(self.inner.state.get(flat) for _, flat in self.groups)

    def get(self, param: Tensor, key: str) -> Tensor | None:
        from deepspeed.utils import safe_get_full_optimizer_state

        state = self._state(param)
        if key not in state:
            return None
        if key == "step":
            return state[key]
        return safe_get_full_optimizer_state(param, key).view(_full_shape(param))

    @torch.no_grad()
    def set(self, param: Tensor, key: str, value: Tensor) -> None:
        from deepspeed.utils import safe_set_full_optimizer_state

        state = self._state(param)
        if key not in state:
            raise ValueError(f"optimizer state {key!r} does not exist yet (before the first step, or not AdamW's)")
        if key == "step":
            state[key].fill_(float(value))
        else:
            safe_set_full_optimizer_state(param, value.to(torch.float32), key)

    @torch.no_grad()
    def scale_moments_(self, params: Sequence[Tensor], factors: Sequence[Tensor]) -> None:
        """As ``OptimizerState.scale_moments_``, on this rank's part of each moment only: each factor broadcast to
        its parameter's whole shape is sliced like the state (no collective; issue 17)."""
        from deepspeed.utils import safe_get_local_optimizer_state

        for param, factor in zip(params, factors, strict=True):
            state = self._state(param)  # links the ZeRO-1/2 fragments
            for keys, power in ((FIRST_MOMENTS, 1), (SECOND_MOMENTS, 2)):
                for key in (k for k in keys if k in state):
                    whole = (factor.to(torch.float32) ** power).expand(_full_shape(param)).reshape(-1)
                    if hasattr(param, "ds_id"):
                        local = safe_get_local_optimizer_state(param, key)  # a view of DeepSpeed's state partition
                        local.mul_(_z3_slice(param, whole))
                    elif param._hp_mapping is not None:
                        where = param._hp_mapping.lp_fragment_address
                        param._hp_mapping.get_optim_state_fragment(key).mul_(whole.narrow(0, where.start,
                                                                                          where.numel))

    def step(self, param: Tensor) -> int | None:
        state = self._state(param)
        return int(state["step"]) if "step" in state else None

    @torch.no_grad()
    def clear(self, params: Iterable[Tensor]) -> None:
        wanted = {id(p) for p in params}
        for members, flat in self.groups:
            hit = wanted & {id(p) for p in members}
            if not hit:
                continue
            if len(hit) != len(members):
                raise ValueError(f"clear: under ZeRO the optimizer state of a group is one flat tensor with one step "
                                 f"counter; clear all {len(members)} tensors of the group together (got {len(hit)})")
            for value in self.inner.state.get(flat, {}).values():
                value.zero_()  # moments and step counter as for fresh tensors (torch's lazy init)


def _full_shape(p: Tensor) -> torch.Size:
    return p.ds_shape if hasattr(p, "ds_shape") else p.shape


# ---- this rank's part of one trainable tensor in DeepSpeed's ZeRO storage -------------------------------------
# ZeRO-1/2: ``p._hp_mapping`` (None where this rank holds none of p) maps the elements
# [lp_fragment_address.start, + numel) of the flattened p to its fp32 master fragment, its optimizer-state
# fragments and its reduced-gradient fragment. ZeRO-3: rank r holds elements [r·s, (r+1)·s) of the flattened p
# zero-padded to P·s (s = p.ds_tensor.ds_numel) in its model partition p.ds_tensor and in DeepSpeed's fp32
# master, state and gradient partitions (the ``safe_*_local_*`` accessors).

def _z12_grad_fragment(p: Tensor) -> Tensor:
    """ZeRO-1/2: this rank's fragment of p's reduced gradient (a view); as ``get_full_hp_grad`` reads it."""
    fragment = p._hp_mapping.get_lp_grad_fragment(p._index_in_param_group).reshape(-1)
    where = p._hp_mapping.lp_fragment_address
    return fragment.narrow(0, where.start, where.numel) if fragment.numel() == p.numel() else fragment


def _z3_grad_part(p: Tensor) -> Tensor:
    from deepspeed.utils import safe_get_local_grad

    return safe_get_local_grad(p)


def _z3_slice(p: Tensor, whole: Tensor) -> Tensor:
    """ZeRO-3: this rank's partition of a flattened whole tensor of p's shape, zero-padded to the partition size."""
    size = p.ds_tensor.ds_numel
    start = collectives.group_rank(p.ds_process_group) * size
    part = whole.narrow(0, min(start, whole.numel()), max(0, min(size, whole.numel() - start)))
    return torch.nn.functional.pad(part, (0, size - part.numel()))


def _keep_unless(changed: Tensor | None, new: Tensor, old: Tensor) -> Tensor:
    """``new``, or ``old`` where the tensor did not change (a device-side choice: no host synchronisation)."""
    return new if changed is None else torch.where(changed, new, old)


def _write_value(p: Tensor, new: Tensor, changed: Tensor | None) -> None:
    """This rank's part of p's whole flattened value ``new`` into the fp32 master copy (ZeRO-3 also into its model
    partition); ``changed`` None writes unconditionally (fp32: exact), else only if True."""
    if hasattr(p, "ds_id"):
        from deepspeed.utils import safe_get_local_fp32_param, safe_set_local_fp32_param

        part = _z3_slice(p, new)
        p.ds_tensor.copy_(_keep_unless(changed, part.to(p.ds_tensor.dtype), p.ds_tensor))
        safe_set_local_fp32_param(p, _keep_unless(changed, part.float(), safe_get_local_fp32_param(p)))
    elif p._hp_mapping is not None:
        where, master = p._hp_mapping.lp_fragment_address, p._hp_mapping.hp_fragment
        master.copy_(_keep_unless(changed, new.narrow(0, where.start, where.numel).float(), master))


def _write_grad(p: Tensor, new: Tensor) -> None:
    """This rank's part of p's whole flattened fp32 gradient ``new`` into DeepSpeed's reduced gradient."""
    if hasattr(p, "ds_id"):
        from deepspeed.utils import safe_set_local_grad

        safe_set_local_grad(p, _z3_slice(p, new))
    elif p._hp_mapping is not None:
        where = p._hp_mapping.lp_fragment_address
        fragment = _z12_grad_fragment(p)
        fragment.copy_(new.narrow(0, where.start, where.numel).to(fragment.dtype))


class ZeroEngine:
    """The DeepSpeed engine of one run: forward module, backward, step, controller hooks, whole-tensor state."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, params: Mapping[str, nn.Parameter],
                 cfg: RunConfig):
        deepspeed = _import_deepspeed()
        ensure_process_group()  # DeepSpeed needs one even for a single process
        os.environ.setdefault("LOCAL_RANK", "0")  # and checks for this launcher variable, which one process lacks
        optimizer.state.clear()  # a resumed run's per-tensor state: DeepSpeed keeps its own (restore fills it)
        self.world = collectives.group_size()
        self.cfg, self.params, self.optimizer = cfg, dict(params), optimizer
        # Decision (issue 7): the options of each client group, before DeepSpeed swaps its tensors for flats.
        self.group_params = [[id(p) for p in g["params"]] for g in optimizer.param_groups]
        self._with_grad: set[int] = set()
        for p in self.params.values():  # registered before DeepSpeed's own hooks, so they run first
            p.register_post_accumulate_grad_hook(self._note_grad)
            if self.world > 1:
                p.register_hook(self._sum_not_average)
        trainable = sum(getattr(p, "ds_numel", p.numel()) for p in self.params.values())  # ZeRO-3: whole counts
        self.engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer,
                                               config=ds_config(cfg, self.world, trainable), dist_init_required=False)
        zero = self.engine.optimizer
        if not hasattr(zero, "bit16_groups") and not hasattr(zero, "fp32_partitioned_groups_flat"):
            raise RuntimeError(f"DeepSpeed chose {type(zero).__name__}; dist_peft drives its ZeRO optimizers only")
        self.optim_state = ZeroOptimizerState(zero)
        self.zero3, self.dp_group = cfg.deepspeed.zero_stage == 3, zero.dp_process_group
        if cfg.deepspeed.zero_stage == 3:
            for site in adapted_sites(model).values():
                deepspeed.zero.register_external_parameter(site, site.base_layer.weight)
        self._skip: set[int] = set()
        self._fragments: list[list[tuple[int, int, int]]] | None = None
        """ZeRO-1/2: every data rank's (tensor index, start, length) gradient fragments (``_z12_whole``)."""
        optimizer.register_step_pre_hook(self._hide_skipped)
        optimizer.register_step_post_hook(self._show_skipped)
        self._hidden: dict[Tensor, Tensor | None] = {}
        self.timer = NULL_TIMER
        """Phase ranges of the step (the profiler's PhaseTimer replaces it)."""

    def _sum_not_average(self, grad: Tensor | None) -> Tensor | None:
        """The gradient flowing into a trainable tensor, times P: DeepSpeed's average becomes the sum."""
        return None if grad is None else grad * self.world

    def _note_grad(self, p: nn.Parameter) -> None:
        """Record that ``p`` received a gradient in this step. A custom autograd function that returns None for
        an input still runs its accumulation hooks with ``p.grad`` None (LoCA's inactive tensors); DeepSpeed's
        hooks would fail on it, so it gets a zero gradient here and stays unrecorded (it skips the step)."""
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        else:
            self._with_grad.add(id(p))

    @property
    def module(self) -> Any:
        """What the loop calls for forward passes (the DeepSpeed engine around the model)."""
        return self.engine

    def backward(self, loss: Tensor, last: bool) -> None:
        """Backward of one micro-batch's loss (normalised by the step's targets); the last one of the step
        triggers DeepSpeed's gradient reduction."""
        self.engine.backward(loss, scale_wrt_gas=False)
        if not last:
            self.engine.step()  # DeepSpeed's micro-step bookkeeping; no update before the boundary

    def step_context(self, step: int, lr: float, total_steps: int) -> StepContext:
        """The controllers' view of this engine: DeepSpeed's optimizer state and its gather access point."""
        return StepContext(step, lr, self.optimizer, total_steps=total_steps, optim_state=self.optim_state,
                           gathered=gathered)

    def optimizer_step(self, controller: Controller, ctx: Any) -> None:
        """controller.before_optimizer_step → DeepSpeed's step (clip, AdamW, zero grads) → after."""
        with self.timer.phase("hooks_before_step"):
            self._run_hook(controller, "before_optimizer_step", ctx)
        self._skip = self._skipped_groups()
        self.engine.step()  # clip, AdamW on the partitions, ZeRO-1/2's all-gather of the updated parameters
        self._with_grad.clear()
        with self.timer.phase("hooks_after_step"):
            self._run_hook(controller, "after_optimizer_step", ctx)

    def grad_sq(self) -> Tensor:
        """Σ g² over this rank's part of every reduced gradient (its ZeRO fragments or partitions), float64 on the
        device, no collective: summed over the data ranks it is the global norm² (the loop's step check)."""
        parts = [_z3_grad_part(p) if self.zero3 else _z12_grad_fragment(p) for p in self.params.values()
                 if self.zero3 or p._hp_mapping is not None]
        sq = [g.double().pow(2).sum() for g in parts if g is not None]
        return torch.stack(sq).sum() if sq else torch.zeros((), dtype=torch.float64, device=self.engine.device)

    def skip_step(self) -> None:
        """A step whose loss or gradients are not finite (``train/guards.py``): DeepSpeed's step still runs for its
        bookkeeping (micro-step count, gradient buffers zeroed), with every flat partition hidden from the inner
        optimizer (the hook pair below, torch's own skip), so no master weight, Adam moment or step count changes
        and the re-gathered parameters are the old ones, whether or not DeepSpeed's own check of the global norm
        (0.19: an invalid norm skips its step, logging OVERFLOW) fires too. No controller hook runs."""
        self._skip = {id(flat) for _, flat in self.optim_state.groups}
        self.engine.step()
        self._with_grad.clear()

    def _run_hook(self, controller: Controller, name: str, ctx: Any) -> None:
        if getattr(type(controller), name) is getattr(Controller, name):
            return  # not overridden (LoRA): nothing to gather
        grads, values = hook_access(controller, name, ctx)
        with self.controller_view(grads, values), declared_access(controller, name, ctx, self.params):
            getattr(controller, name)(ctx)

    @contextlib.contextmanager
    def controller_view(self, grads: str, values: bool = True) -> Iterator[None]:
        """Whole values of every trainable tensor inside where ``values`` (``Controller.value_access``), and reduced
        gradients as ``grads`` says (``Controller.gradient_access``: ``whole``, ``local`` or ``none``; None for
        tensors without one); on exit each rank writes its own part of them back into DeepSpeed's partitions.

        Decision (issue 17, coalesced): at most one collective per view for the gradients, whatever the number of
        tensors (``_grads``), plus under ZeRO-3 DeepSpeed's one coalesced all-gather of the values; ``local`` and
        ``none`` need none for the gradients, and a hook that declares no values (``value_access``) needs no gather
        (ZeRO-3) and no write-back (``declared_access`` holds it to that). The write-back is local (no collective: every rank holds the same
        whole values, the contract of every engine; of a ``local`` gradient it writes exactly the part the rank
        was given) and has no host synchronisation: fp32 tensors are written back whole-sale (exact), others only
        where they changed, selected on the device."""
        params = list(self.params.values())
        with torch.no_grad(), self._whole_values(params, "gather" if values else "shape" if grads != "none" else ""):
            before = {id(p): p.detach().clone() for p in params if values and p.dtype != torch.float32}
            if grads != "none":
                flat = self._grads(params, whole=grads == "whole")
                for p, g in zip(params, flat):
                    p.grad = g.view(p.shape).to(p.dtype) if id(p) in self._with_grad else None
            try:
                yield
            finally:
                self._write_back(params, before, values, grads != "none")

    @contextlib.contextmanager
    def _whole_values(self, params: list[nn.Parameter], how: str) -> Iterator[None]:
        """ZeRO-3, ``how`` "gather": every partitioned tensor gathered (DeepSpeed's coalesced all-gather), released
        without DeepSpeed writing anything back; "shape": each holds a NaN placeholder of its whole shape instead
        (no collective: the hook declared no values, and torch attaches a ``.grad`` only of the tensor's shape; a
        read it did not declare gets NaN, which the step's check refuses, not a stale number); "": untouched.
        ZeRO-1/2 keep whole model copies: nothing to do."""
        away = [p for p in params if getattr(p, "ds_status", None) is not None and not p.ds_persist
                and p.ds_status.name == "NOT_AVAILABLE"] if how else []
        empty = [p.data for p in away]
        if away and how == "gather":
            away[0].all_gather_coalesced(away).wait()
        for p in away if how == "shape" else ():
            p.data = torch.full(_full_shape(p), math.nan, dtype=p.dtype, device=p.device)
        try:
            yield
        finally:
            if away and how == "gather":
                away[0].partition(param_list=away, has_been_updated=False)
            for p, data in zip(away, empty) if how == "shape" else ():
                p.data = data

    def _grads(self, params: list[nn.Parameter], whole: bool) -> list[Tensor]:
        """Every tensor's reduced fp32 gradient, flattened: with ``whole`` all of it, from one collective over the
        data ranks; else, without communication, this rank's part (its ZeRO-1/2 fragment or ZeRO-3 partition) and
        zeros elsewhere.

        Decision (issue 16, whole gradients by all-gather): every rank sends its own parts once (ZeRO-3: its
        partitions; ZeRO-1/2: its fragments packed, ``_z12_whole``), about N(P−1)/P elements per rank for N
        adapter elements, where the all-reduce of a zero-filled whole moves 2N(P−1)/P (ring)."""
        if whole and self.zero3:
            return [g[: p.ds_numel] for p, g in zip(params, self._gather_parts([_z3_grad_part(p) for p in params]))]
        numels = [_full_shape(p).numel() for p in params]
        flat = torch.zeros(sum(numels), dtype=torch.float32, device=params[0].device)
        parts = flat.split(numels)
        if whole:
            self._z12_whole(params, parts)
            return list(parts)
        for p, part in zip(params, parts):
            if self.zero3:
                size = p.ds_tensor.ds_numel  # the last ranks' partitions may be padding only
                start = min(collectives.group_rank(p.ds_process_group) * size, part.numel())
                own = _z3_grad_part(p).reshape(-1)[: min(size, part.numel() - start)]
            elif p._hp_mapping is not None:
                start, own = p._hp_mapping.lp_fragment_address.start, _z12_grad_fragment(p)
            else:
                continue
            part.narrow(0, start, own.numel()).copy_(own)
        return list(parts)

    def _z12_whole(self, params: list[nn.Parameter], parts: list[Tensor]) -> None:
        """ZeRO-1/2: each tensor's whole reduced gradient into ``parts`` (flattened), from one all-gather of every
        rank's fragments packed in tensor order. Where each rank's fragments lie (tensor, start, length) is a
        fixed layout, exchanged once (``all_gather_object`` on the first call) from DeepSpeed's public fragment
        addresses: DeepSpeed's own flat partitions could be gathered as they are, but their offsets (alignment
        padding, round-robin order) are private to its optimizer."""
        if self._fragments is None:
            mine = [(i, p._hp_mapping.lp_fragment_address.start, p._hp_mapping.lp_fragment_address.numel)
                    for i, p in enumerate(params) if p._hp_mapping is not None]
            self._fragments = collectives.all_gather_object(mine, self.dp_group)
        width = max(sum(n for _, _, n in frs) for frs in self._fragments)
        own = parts[0].new_zeros(width)
        at = 0
        for i, _, n in self._fragments[collectives.group_rank(self.dp_group)]:
            own.narrow(0, at, n).copy_(_z12_grad_fragment(params[i]))
            at += n
        every = collectives.all_gather_cat(own, 0, self.dp_group).view(-1, width)
        for rank, frs in enumerate(self._fragments):
            at = 0
            for i, start, n in frs:
                parts[i].narrow(0, start, n).copy_(every[rank].narrow(0, at, n))
                at += n

    def _gather_parts(self, parts: list[Tensor]) -> list[Tensor]:
        """ZeRO-3: each tensor's P partitions in rank order (flattened, padded), from one all-gather of this rank's."""
        sizes = [t.numel() for t in parts]
        world = collectives.group_size(self.dp_group)
        every = collectives.all_gather_cat(torch.cat(parts).float(), 0, self.dp_group).view(world, -1)
        return [block.reshape(-1) for block in every.split(sizes, dim=1)]

    def _write_back(self, params: list[nn.Parameter], before: Mapping[int, Tensor], values: bool, grads: bool) -> None:
        """With ``values``, this rank's part of every value into the master copy (and ZeRO-3's model partition), and
        with ``grads`` of every gradient into DeepSpeed's reduced gradient (a hook may also drop one: None)."""
        for p in params if values else ():
            new = p.detach().reshape(-1)
            changed = None if p.dtype == torch.float32 else (new != before[id(p)].reshape(-1)).any()
            _write_value(p, new, changed)
        if not grads:
            return
        for p in params:
            new, p.grad = p.grad, None
            if new is None:
                self._with_grad.discard(id(p))  # a hook may drop a gradient: the tensor skips this step
                continue
            self._with_grad.add(id(p))
            _write_grad(p, new.detach().reshape(-1).float())

    def _skipped_groups(self) -> set[int]:
        """ids of the flat partitions whose tensors all received no gradient this step (refusing partial ones)."""
        skipped = set()
        names = {id(p): n for n, p in self.params.items()}
        for members, flat in self.optim_state.groups:
            without = [names.get(id(p), "?") for p in members if id(p) not in self._with_grad]
            if len(without) == len(members):
                skipped.add(id(flat))
            elif without:
                raise ValueError(f"{', '.join(without[:3])}{'…' if len(without) > 3 else ''}: no gradient this step, "
                                 f"but under ZeRO their optimizer group steps as one flat tensor with others that "
                                 f"have one; give them their own group (Adapter.optimizer_overrides)")
        return skipped

    def _hide_skipped(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        for group in optimizer.param_groups:
            for flat in group["params"]:
                if id(flat) in self._skip:
                    self._hidden[flat], flat.grad = flat.grad, None

    def _show_skipped(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        for flat, grad in self._hidden.items():
            flat.grad = grad
        self._hidden.clear()

    # ---- whole-tensor state for checkpoints and adapter files ----------------------------------------------

    def full_params(self) -> dict[str, Tensor]:
        """The fp32 master value of every trainable tensor, whole (a collective)."""
        from deepspeed.utils import safe_get_full_fp32_param

        return {n: safe_get_full_fp32_param(p).view(_full_shape(p)).clone() for n, p in self.params.items()}

    def full_optimizer(self) -> "WholeOptimizerState":
        """The optimizer's state in ``torch.optim.AdamW.state_dict()`` form with whole tensors (a collective)."""
        index = {id(p): i for i, p in enumerate(self.params.values())}
        state: dict[int, dict[str, Tensor]] = {}
        for p in self.params.values():
            entry = {k: v.clone() for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "step")
                     if (v := self.optim_state.get(p, k)) is not None}
            if entry:
                state[index[id(p)]] = entry
        groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [index[i] for i in ids]}
                  for g, ids in zip(self.optimizer.param_groups, self.group_params)]
        return WholeOptimizerState({"state": state, "param_groups": groups})

    def full_state(self, controller: Controller) -> tuple[dict[str, Tensor], "WholeOptimizerState", "WholeState"]:
        """(trainable tensors, optimizer state, controller state), all whole, for ``checkpoint.save_checkpoint``;
        a collective."""
        state = {}
        for key, value in controller.state_dict().items():  # ScaLoRA's holds its merged frozen W
            with gathered([value]):
                state[key] = value.detach().clone()
        return self.full_params(), self.full_optimizer(), WholeState(state)

    def restore(self, c: ckpt.Checkpoint) -> None:
        """Put a checkpoint of any engine into the partitions: the trainable tensors (model copy and fp32 master),
        the Adam state, and the RNG again (a collective). The Trainer restored the checkpoint into the plain
        model, optimizer and controller before DeepSpeed partitioned them (a controller's state may hold whole
        frozen weights: ScaLoRA's merged W); ``checkpoint.restore`` verifies it once more here."""
        params = {n: torch.empty(_full_shape(p), dtype=torch.float32) for n, p in self.params.items()}
        whole = {id(p): params[n] for n, p in self.params.items()}
        groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [whole[i] for i in ids]}
                  for g, ids in zip(self.optimizer.param_groups, self.group_params)]
        optimizer = WholeOptimizerState(param_groups=groups)  # the live groups a checkpoint is checked against
        ckpt.restore(c, params, optimizer, WholeState())
        self.load_full(params, optimizer.state_dict())

    def gathered_params(self) -> contextlib.AbstractContextManager:
        """Whole trainable tensors inside (for writing adapter files); a collective."""
        return gathered(self.params.values())

    @torch.no_grad()
    def load_full(self, params: Mapping[str, Tensor], optimizer_state: Mapping[str, Any]) -> None:
        """Put whole tensors (a checkpoint's, already verified) into the partitioned engine: the model's copy,
        DeepSpeed's fp32 master, the Adam moments and the step counters (a collective)."""
        from deepspeed.utils import safe_set_full_fp32_param

        with gathered(self.params.values(), modify=True):
            for name, p in self.params.items():
                p.copy_(params[name].view(p.shape).to(p.dtype))
        for name, p in self.params.items():
            safe_set_full_fp32_param(p, params[name].to(torch.float32))
        index = {id(p): i for i, p in enumerate(self.params.values())}
        per_param = {id(p): optimizer_state["state"].get(index[id(p)], {}) for p in self.params.values()}
        for members, _ in self.optim_state.groups:
            steps = {float(per_param[id(p)].get("step", 0)) for p in members}
            if len(steps) > 1:
                raise ValueError(f"the checkpoint's Adam step counts differ within one optimizer group ({sorted(steps)}"
                                 f"); under ZeRO a group has one step counter, so it cannot resume this state")
        self._create_state()
        for p in self.params.values():
            for key, value in per_param[id(p)].items():
                self.optim_state.set(p, key, value)

    def _create_state(self) -> None:
        """AdamW's state as its lazy init makes it (zero moments, step 0) for groups that have none yet."""
        for _, flat in self.optim_state.groups:
            if not self.optimizer.state.get(flat):
                self.optimizer.state[flat] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(flat),
                                              "exp_avg_sq": torch.zeros_like(flat)}


class WholeState:
    """A controller stand-in for ``checkpoint.save_checkpoint`` / ``restore``: saves a state already gathered
    whole (``ZeroEngine.full_state``); loads nothing (the Trainer restores controllers before DeepSpeed
    partitions the model)."""

    def __init__(self, state: Mapping[str, Tensor] | None = None):
        self.state = dict(state or {})

    def state_dict(self) -> dict[str, Tensor]:
        return self.state

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Nothing: see the class docstring."""


class WholeOptimizerState:
    """A ``torch.optim`` stand-in holding a whole-tensor state dict: what ``checkpoint.save_checkpoint`` writes
    and ``checkpoint.restore`` fills, so both serve every engine unchanged."""

    def __init__(self, state: Mapping[str, Any] | None = None, param_groups: list[dict[str, Any]] | None = None):
        self.param_groups = param_groups or []
        """The optimizer's groups over whole-shaped tensors (``ZeroEngine.restore``)."""
        index = {id(p): i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        groups = [{**g, "params": [index[id(p)] for p in g["params"]]} for g in self.param_groups]
        self.loaded: dict[str, Any] = dict(state or {"state": {}, "param_groups": groups})

    def state_dict(self) -> dict[str, Any]:
        return self.loaded

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.loaded = dict(state)


