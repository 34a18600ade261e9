"""ScaLoRA — "ScaLoRA: Optimally Scaled Low-Rank Adaptation for Efficient High-Rank Fine-Tuning" (anonymous ICLR
submission; specs/scalora.md). LoRA whose product is merged into the frozen weight and re-factored every I steps.

    y = W x + s · B (A x)                                      (the LoRA forward, unchanged)
    every I steps, after the gradients are final and before the optimizer step (§2.3):
      W ← W + s · B diag(1 − α⊙β) A,   B ← B diag(α),   A ← diag(β) A                                   (Eq. 3)
      grad B ← grad B · diag(β),  grad A ← diag(α) · grad A;  Adam m, v of B ← · β, β²;  of A ← · α, α²  (Lemma 4)
    so W + s B A is unchanged (the model's function is preserved) while W accumulates a rank-r piece per step.

Notation map (ours: HF PEFT, y = Wx + s B A x, A = lora_A: r x n, B = lora_B: m x r; paper: W = W^pt + A_p B_pᵀ):
    paper A_p (m x r, output side) = lora_B          paper B_p (n x r, input side) = lora_Aᵀ
    paper P = G B_p  ∝ lora_B.grad (m x r)            paper Q = Gᵀ A_p ∝ lora_A.gradᵀ (n x r)    (factor s)
    paper α scales the columns of A_p = columns of lora_B; paper β scales the columns of B_p = rows of lora_A.
    A_pᵀA_p = BᵀB,  B_pᵀB_p = A Aᵀ,  PᵀP = gBᵀ gB,  QᵀQ = gA gAᵀ,  K = A_pᵀ P = Qᵀ B_p = Bᵀ gB = gA Aᵀ.
The optimal α, β come from ``ops.small_solve``: M v = λ (2r x 2r, Theorem 5 with the erratum S^B = [GᵀA, B]), column
scaling α = √(v_A / c), β = √(v_B / c) when v >= 0; otherwise (issue 18) solver ``nnls`` takes the exact minimiser of
Eq. 10 over v >= 0 (Lawson–Hanson) and solver ``paper`` the scalar scaling of Theorem 3; c = L η s² (Decision G4:
with W = W^pt + s A_p B_pᵀ the GD step on W is η s² (G B_p B_pᵀ + A_p A_pᵀ G), so s² joins L η). The gradients
carry the factor s too; v is invariant to scaling G, so they serve as P and Q directly.

Decisions:
  Decision (issue; specs/scalora.md G3): η is the current scheduled learning rate (``StepContext.lr``). At η = 0
  (or a non-finite η) the optimum is undefined (c = 0: the objective no longer depends on α, β) and the optimizer
  step changes nothing, so the transform is skipped that step (counted warning ``lr_zero``). A warm-up makes c
  small, i.e. column norms large (|column|² ≈ v/c), early in the run: choose L with the schedule in mind.
  Decision (G12): ScaLoRA-I transforms when ``step % I == 0`` (including step 0); I = 0 means never (I = ∞): LoRA.
  Decision (G5): PEFT's init (lora_B = 0), so M is singular at step 0; the pseudo-inverse gives α = 0 for the zero
  factor and rescales the other one (G6).
  Decision (G9, G7, Assumption 2): see ``ops.small_solve.optimal_scaling``; a layer whose gradients are zero, or
  whose factors, gradients or system are not finite, is skipped (α = β = 1, no merge; counted warning).
  Decision (G10): order accumulate → data-parallel/TP gradient reduction → ScaLoRA → clip → step (the loop's).
  Decision (G11): the merge is in place in the base weight's dtype; ``fp32_merge`` keeps an fp32 master of each
  adapted weight that is not fp32 (+4 bytes/weight), so bf16 weights do not drop increments below their ulp.
  Decision (G17, issue): checkpoints carry the merged part. ``Controller.state_dict`` holds each layer's merges as
  a replay log of factor pairs (left = s B diag(1 − α⊙β): m x r, right = A: r x n), replayed on the fresh W with
  the same kernels (on W's device, in the live merge's dtype), so a resumed run rebuilds W bitwise. Decision
  (issue 17): the logs are bounded by bytes, ``merge_log_mib`` for all layers of a rank together (each layer its
  share, and at most half of W's bytes); a layer whose log would pass it drops the log and its checkpoint holds the
  merged weight instead (dense, still exact). Adapter files hold A and B only: they do not reproduce a ScaLoRA
  model; export the merged model from a checkpoint. Each layer's merge runs inside its own
  ``StepContext.gathered([W], modify=True)`` (under ZeRO-3 one whole W at a time); the checkpoint replay in
  ``load_state_dict`` needs none: the Trainer restores before an engine partitions the model.
  Decision (issue 17, ``fp32_merge``): the master is one fp32 copy of each adapted weight *as this rank holds W*
  (its TP/PP shard; replicated over data-parallel ranks, like W). It must persist between transforms (it carries
  the sub-ulp increments), and every rank must write its whole W from it without communication, so it cannot be
  one layer at a time. Sharding it over the data-parallel ranks needs the engine: under ZeRO-3 each rank would
  keep the fp32 master of its own partition of W and merge into that partition directly (no gather at all),
  which needs a partition accessor in ``integrations/deepspeed.py``; elsewhere it would cost an all-gather of W
  per transform. So with ``fp32_merge`` under ZeRO-3 a rank holds 4 bytes per adapted weight element (see
  docs/methods/scalora.md); leave it off there unless that fits.

Sharding (the LoRA layout; specs/scalora.md §6.1): column (m split): lora_B (= A_p) holds local rows, so BᵀB and
gBᵀgB are partial sums; row (n split): lora_A (= B_pᵀ) holds local columns, so AAᵀ and gA gAᵀ are partial. K is
always formed from the replicated pair. The partial r x r Grams of every layer go into one coalesced all-reduce per
transform; every rank then solves the same 2r x 2r systems and merges its own shard of W locally.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import Tensor

from dist_peft.methods.base import Controller, SiteShape, StepContext, register_method
from dist_peft.methods.lora import LoraAdapter, LoraConfig
from dist_peft.ops.small_solve import ACTIVE, COLUMN, SCALAR, SKIP, optimal_scaling, scaling_system
from dist_peft.parallel.grams import sum_partial_grams
from dist_peft.parallel.shard import ShardKind


@dataclass(frozen=True, kw_only=True)
class ScaLoraConfig(LoraConfig):
    """LoRA's keys (r: paper 8 for LLMs, 4 for DeBERTa; lora_alpha 16 is the paper's "scaling 16", G16; with
    dropout the gradients used are the dropped-input ones, G14) and the transform's."""

    interval: int = 1
    """I: transform every I optimizer steps (1: ScaLoRA, 10: the paper's ScaLoRA-I); 0: never (plain LoRA)."""
    lipschitz: float = 1000.0
    """L of Assumption 1 (never reported by the paper, G2): c = L η s²; the column norms after a transform are
    ≈ √(v / c). The default puts c ≈ 0.4 … 4 at η = 1e-4 … 1e-3 with s = 2."""
    column_scaling: bool = True
    """Use the column scaling of Theorem 5 where v >= 0 (False: the scalar scaling only, the paper's ablation)."""
    nonneg_tol: float = 1e-6
    """v counts as non-negative when v >= -nonneg_tol · max|v| (G7)."""
    fp32_merge: bool = False
    """Merge into an fp32 master copy of each adapted weight that is not stored in fp32 (G11)."""
    solver: str = "nnls"
    """How the column scaling meets α², β² >= 0 (issue 18): ``nnls``, the exact minimiser of Eq. 10 in every layer
    (Lawson–Hanson; equal to ``paper`` where v >= 0 and never worse); ``paper``, Theorem 5 where v >= 0, else
    Theorem 3's scalar fallback (to reproduce the paper)."""
    merge_log_mib: float = 64.0
    """Memory budget (MiB per rank) of the replay logs of all adapted weights together: each weight's log may hold
    its share (budget / weights, and at most half of W's bytes) before that weight's checkpoint becomes dense."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.interval < 0:
            raise ValueError(f"interval: must be >= 0 (0: never), got {self.interval}")
        if not (self.lipschitz > 0 and math.isfinite(self.lipschitz)):
            raise ValueError(f"lipschitz: must be a positive finite number, got {self.lipschitz}")
        if not 0.0 <= self.nonneg_tol < 1.0:
            raise ValueError(f"nonneg_tol: must be in [0, 1), got {self.nonneg_tol}")
        if self.solver not in ("nnls", "paper"):
            raise ValueError(f"solver: must be 'nnls' or 'paper', got {self.solver!r}")
        if not (self.merge_log_mib >= 0 and math.isfinite(self.merge_log_mib)):
            raise ValueError(f"merge_log_mib: must be a finite number >= 0, got {self.merge_log_mib}")


class MergedDelta:
    """What has been merged into one frozen weight W (local shard): W = W0 + Σ_k left_k right_k, applied in place
    with ``addmm_`` and kept as a replay log for checkpoints, or, once the log would pass ``log_bytes`` (capped at
    half of W's bytes), as the merged weight itself. Every tensor it holds or replays is put on W's device; the
    replay runs in the live merge's dtype (W's, or the fp32 master's), so it rebuilds W bitwise."""

    def __init__(self, weight: Tensor, fp32_master: bool, log_bytes: int):
        self.weight = weight
        self.use_master = fp32_master and weight.dtype != torch.float32
        self.master: Tensor | None = None
        self.lefts: list[Tensor] = []
        self.rights: list[Tensor] = []
        numel = getattr(weight, "ds_numel", weight.numel())  # W's whole size, also when ZeRO-3 partitions it
        self.log_bytes = min(log_bytes, numel * weight.element_size() // 2)
        self.dense = False  # True once the log was dropped: the checkpoint holds the merged weight

    @torch.no_grad()
    def add(self, left: Tensor, right: Tensor) -> None:
        if self.use_master and self.master is None:
            self.master = self.weight.float()  # exact copy of W0 (bf16/fp16 → fp32 is exact)
        target = self.master if self.master is not None else self.weight
        left = left.to(device=target.device)
        right = right.to(device=target.device, copy=True)  # the caller rescales its factor next
        target.addmm_(left.to(target.dtype), right.to(target.dtype))
        if self.master is not None:
            self.weight.copy_(self.master)
        if not self.dense:
            self.lefts.append(left)
            self.rights.append(right)
            if sum(t.numel() * t.element_size() for t in self.lefts + self.rights) > self.log_bytes:
                self.lefts, self.rights, self.dense = [], [], True

    def state_dict(self) -> dict[str, Tensor]:
        if self.dense:
            return {"weight": self.master if self.master is not None else self.weight}
        if not self.lefts:
            return {}
        return {"left": torch.cat(self.lefts, 1), "right": torch.cat(self.rights, 0)}

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, Tensor], r: int) -> None:
        """Rebuild W from the fresh W0 (checkpoint tensors arrive on the CPU): copy the merged weight, or replay the
        log with the live kernels, both on W's device."""
        if "weight" in state:
            merged = state["weight"].to(device=self.weight.device)
            if self.use_master:
                self.master = merged.to(torch.float32, copy=True)
            self.weight.copy_(merged)
            self.dense = True
        elif "left" in state:
            for left, right in zip(state["left"].split(r, 1), state["right"].split(r, 0)):
                self.add(left, right)


_PARTIAL = {ShardKind.COLUMN: (0, 2), ShardKind.ROW: (1, 3), ShardKind.REPLICATED: ()}
"""Which of (A_pᵀA_p, B_pᵀB_p, PᵀP, QᵀQ, K) are partial sums over the split, per layout (§6.1)."""


def layer_grams(adapters: Sequence[LoraAdapter]) -> list[list[Tensor]]:
    """For each adapter, the five r x r matrices of its system in paper notation, from this shard's factors and
    gradients: [A_pᵀA_p = BᵀB, B_pᵀB_p = AAᵀ, PᵀP = gBᵀgB, QᵀQ = gA gAᵀ, K] (K from the replicated pair).
    Decision (specs/scalora.md §6.4): the products accumulate in the factors' fp32 (one batched matmul per group of
    equal shapes and layout, since many tiny per-layer GEMMs cost more than their FLOPs); the system is fp64."""
    out: list[list[Tensor]] = [[] for _ in adapters]
    groups: dict[tuple, list[int]] = {}
    for i, a in enumerate(adapters):
        groups.setdefault((a.spec.kind, tuple(a.lora_A.shape), tuple(a.lora_B.shape)), []).append(i)
    for (kind, _, _), idx in groups.items():
        a = torch.stack([adapters[i].lora_A.detach() for i in idx])
        b = torch.stack([adapters[i].lora_B.detach() for i in idx])
        ga = torch.stack([_grad(adapters[i].lora_A) for i in idx])
        gb = torch.stack([_grad(adapters[i].lora_B) for i in idx])
        k = ga @ a.mT if kind is ShardKind.COLUMN else b.mT @ gb
        mats = [t.double() for t in (b.mT @ b, a @ a.mT, gb.mT @ gb, ga @ ga.mT, k)]
        for j, i in enumerate(idx):
            out[i] = [m[j] for m in mats]
    return out


def _grad(p: Tensor) -> Tensor:
    return p.grad if p.grad is not None else torch.zeros_like(p)


class ScaLoraController(Controller):
    """Solves, merges and rescales every I steps in ``before_optimizer_step`` (all layers batched)."""

    def __init__(self, adapters: Mapping[str, LoraAdapter]):
        super().__init__(adapters)
        self.cfg: ScaLoraConfig = next(iter(self.adapters.values())).cfg
        self.counts: Counter = Counter()
        """Layers scaled column-wise (v >= 0) / at the NNLS optimum with a binding bound (``active``) / by the
        scalar fallback (``scalar``), skipped layers (``skipped``), skipped steps (``lr_zero``); this run's."""
        self.step_metrics: dict[str, int] = {}
        """``counts`` as ``scalora_<kind>``, joined to every step's log record by the loop."""
        self.partial_sum = sum_partial_grams
        """Sums partial Grams over their split (tests substitute a sum over virtual shards)."""
        share = int(self.cfg.merge_log_mib * 2 ** 20) // len(self.adapters)
        self.merged = {name: MergedDelta(a.site.weight, self.cfg.fp32_merge, share)
                       for name, a in self.adapters.items()}

    def _warn(self, kind: str, count: int, what: str) -> None:
        self.counts[kind] += count
        warnings.warn(f"scalora: {what}; {kind} so far: {self.counts[kind]}", RuntimeWarning, stacklevel=3)

    def gradient_access(self, step: int) -> str:
        """``whole`` every ``interval`` steps (the Grams read whole gradients; the rescale writes them), else ``none``."""
        interval = self.cfg.interval
        return "whole" if interval and step % interval == 0 else "none"

    def value_access(self, hook: str, ctx: StepContext) -> bool:
        """The transform's steps (every ``interval``): it rescales the factors."""
        return self.gradient_access(ctx.step) == "whole"

    def before_optimizer_step(self, ctx: StepContext) -> None:
        interval = self.cfg.interval
        if interval == 0 or ctx.step % interval:
            return
        if not (ctx.lr > 0 and math.isfinite(ctx.lr)):
            self._warn("lr_zero", 1, f"step {ctx.step}: learning rate {ctx.lr} (no optimal scaling); skipped")
        else:
            self.transform(ctx)
        self.step_metrics = {f"scalora_{k}": v for k, v in sorted(self.counts.items())}

    @torch.no_grad()
    def transform(self, ctx: StepContext) -> None:
        """One ScaLoRA step for every layer: Grams → one reduction → batched solve → merge and rescale."""
        items = list(self.adapters.items())
        grams = layer_grams([a for _, a in items])
        self.partial_sum([((a.site.name, i), a.spec, g[i]) for (_, a), g in zip(items, grams)
                          for i in _PARTIAL[a.spec.kind]])
        m, lam = scaling_system(*(torch.stack([g[i] for g in grams]) for i in range(5)))
        cfg = self.cfg
        c = cfg.lipschitz * ctx.lr * cfg.scale ** 2
        alpha, beta, kind = optimal_scaling(m, lam, c, cfg.nonneg_tol, cfg.column_scaling, cfg.solver)
        kinds = kind.tolist()  # a host sync (the solve adds a few: ops.small_solve.nnls_solution)
        kept = [i for i, k in enumerate(kinds) if k != SKIP]
        if kept:
            self._merge_and_rescale([items[i] for i in kept], kept, alpha, beta, ctx)
        for label, code in (("column", COLUMN), ("active", ACTIVE), ("scalar", SCALAR)):
            self.counts[label] += kinds.count(code)
        skipped = [name for (name, _), k in zip(items, kinds) if k == SKIP]
        if skipped:
            self._warn("skipped", len(skipped), f"step {ctx.step}: {len(skipped)} layer(s) skipped (zero gradient, "
                       f"non-finite factors/system or an unconverged solve: {', '.join(skipped[:3])}"
                       f"{'…' if len(skipped) > 3 else ''})")

    def _merge_and_rescale(self, items: list[tuple[str, LoraAdapter]], rows: list[int], alpha: Tensor, beta: Tensor,
                           ctx: StepContext) -> None:
        """Merge s B diag(1 − α⊙β) A into each layer's W, then B ← B diag α, A ← diag β A, their gradients (swapped
        factors) and their Adam moments (Lemma 4); layer ``items[j]`` takes row ``rows[j]`` of ``alpha``, ``beta``
        (layers, r). Decision (issue 17): W is gathered for its own merge only, so under ZeRO-3 one adapted weight at
        a time is whole on a rank (one gather per weight, not the model at once). Decision: the factors, gradients
        and moments are rescaled by multi-tensor multiplies over all layers (five with AdamW), each layer's factor
        expanded to its tensor's shape (a few ops per group of equal shapes), not ~20 small ops per layer: at 70B
        under TP8 (560 adapted weights per rank) those would be ~11,000 kernel launches per step. The rows are
        taken in group order by one index tensor before the merges (a host list as an index is copied to the
        device, which waits for the stream), and each group reads a contiguous slice of them."""
        groups: dict[tuple, list[int]] = {}
        for j, (_, a) in enumerate(items):
            groups.setdefault((a.lora_A.shape, a.lora_A.dtype, a.lora_B.shape, a.lora_B.dtype), []).append(j)
        pick = torch.tensor([rows[j] for idx in groups.values() for j in idx], device=alpha.device)
        al, be = alpha[pick], beta[pick]
        co = self.cfg.scale * (1 - al * be)
        scales: list[Tensor | None] = [None] * len(items)  # each layer's s (1 − α⊙β), in B's dtype
        params, value_factors, grad_factors = [], [], []  # [B, A] of each layer
        start = 0
        for (shape_a, dtype_a, shape_b, dtype_b), idx in groups.items():
            part = slice(start, start + len(idx))
            start = part.stop
            al_b, be_b, co_b = (t[part].to(dtype_b) for t in (al, be, co))
            al_a, be_a = al[part].to(dtype_a), be[part].to(dtype_a)
            b_al, b_be = (v[:, None, :].expand(len(idx), *shape_b).contiguous().unbind(0) for v in (al_b, be_b))
            a_be, a_al = (v[:, :, None].expand(len(idx), *shape_a).contiguous().unbind(0) for v in (be_a, al_a))
            for k, j in enumerate(idx):
                scales[j] = co_b[k]
                params += [items[j][1].lora_B, items[j][1].lora_A]
                value_factors += [b_al[k], a_be[k]]
                grad_factors += [b_be[k], a_al[k]]
        for (name, a), c in zip(items, scales):
            with ctx.gathered([a.site.weight], modify=True):
                self.merged[name].add(a.lora_B * c, a.lora_A.detach())
        torch._foreach_mul_(params, value_factors)
        grads = [(p.grad, f) for p, f in zip(params, grad_factors) if p.grad is not None]
        if grads:
            torch._foreach_mul_(*(list(c) for c in zip(*grads)))
        ctx.optim_state.scale_moments_(params, grad_factors)

    def state_dict(self) -> dict[str, Tensor]:
        """The merged part of every layer: ``<site>/merge_left``, ``<site>/merge_right`` (replay log) or
        ``<site>/merge_weight`` (the merged weight once the log grew past its byte budget)."""
        return {f"{name}/merge_{k}": v for name, delta in self.merged.items() for k, v in delta.state_dict().items()}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Rebuild every merged weight; the model must hold the fresh base weights (as ``Trainer`` builds it)."""
        per_layer: dict[str, dict[str, Tensor]] = {}
        for key, t in state.items():
            name, _, field = key.rpartition("/merge_")
            if name not in self.merged or field not in ("left", "right", "weight") or not torch.isfinite(t).all():
                raise ValueError(f"scalora state: unexpected or non-finite entry {key!r}")
            per_layer.setdefault(name, {})[field] = t
        for name, fields in per_layer.items():
            self.merged[name].load_state_dict(fields, self.cfg.r)


@register_method("scalora", ScaLoraConfig)
class ScaLoraAdapter(LoraAdapter):
    """The LoRA adapter (same init, forward, layouts and file keys); the method lives in its controller."""

    controller_cls = ScaLoraController

    @staticmethod
    def peft_config(cfg: ScaLoraConfig, target_modules: list[str]) -> None:
        """No PEFT equivalent: A and B alone miss the merged part of W."""
        return None

    @classmethod
    def buffer_bytes(cls, shape: SiteShape, cfg: ScaLoraConfig) -> tuple[int, int]:
        """Per site the fp32 master copy (4 bytes per element) with ``fp32_merge`` on a non-fp32 weight; shared, the
        replay logs' budget (``merge_log_mib`` per rank over all weights, at most half of the weights' bytes):
        counted once per module type, an upper bound."""
        mn = shape.m_local * shape.n_local
        if not cfg.interval:
            return 0, 0
        master = 4 * mn if cfg.fp32_merge and shape.weight_bytes != 4 else 0
        return master, min(int(cfg.merge_log_mib * 2**20), shape.layers * mn * shape.weight_bytes // 2)

    @classmethod
    def step_flops(cls, shape: SiteShape, cfg: ScaLoraConfig) -> int:
        """Every ``interval`` steps: the merge W += L R (2 m n r), five r x r Grams of the factors and gradients
        (10 r² (m + n)) and the 2r x 2r solve (≈ 8 (2r)³ / 3)."""
        if not cfg.interval:
            return 0
        m, n, r = shape.m_local, shape.n_local, cfg.r
        return (2 * m * n * r + 10 * r * r * (m + n) + 8 * (2 * r) ** 3 // 3) // cfg.interval

    @classmethod
    def width_costs(cls, shape: SiteShape, cfg: ScaLoraConfig) -> tuple[str, ...]:
        if not cfg.interval:
            return ()
        master = ", an fp32 master copy of W (4 B per element)" if cfg.fp32_merge and shape.weight_bytes != 4 else ""
        return (f"{shape.module_type}: ScaLoRA merges into W (2·m·n·r FLOPs every {cfg.interval} step(s)){master}",)
