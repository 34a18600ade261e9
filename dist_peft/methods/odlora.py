"""OD-LoRA — "OD-LoRA: Overcoming the Dilemma between Weight Representation and Gradient Approximation in
Low-Rank Adaptation" (anonymous ICLR submission, OpenReview Icte1N6WQK; specs/odlora.md). One frozen linear W.

    y = W x + s (Q_B A + B Q_Aᵀ) x = W x + s [Q_B | B] [A ; Q_Aᵀ] x                                       (Eq. 4)
    Aᵀ = Q_A R_A,  B = Q_B R_B     (sign-fixed thin QR, diag(R) > 0; bases held constant in autograd)
    ∂L/∂A = s Q_Bᵀ G,   ∂L/∂B = s G Q_A,   so  G̃ = s² (G Q_A Q_Aᵀ + Q_B Q_Bᵀ G)                      (Thm 3.1)

Symbols (HF PEFT layout, as LoRA): A = lora_A (r x n), B = lora_B (m x r), Q_A (n x r) orthonormal basis of the row
space of A, Q_B (m x r) of the column space of B, s = lora_alpha / √r (rsLoRA scale; the paper uses α = 4), G = ∂L/∂W.
Only A and B are trained; Q_A, Q_B are buffers, written to adapter files (``buffer_names``) and to checkpoints.

Schedule (Algorithm 1; t counts optimizer steps from 1; the controller acts after ``optimizer.step()``):
  Phase I, t = 1 … N·T: round 1 in the LoRA form y = Wx + s B A x, rounds 2 … N in the OD form with fixed Q's.
    After every T-th step: U_r Σ_r V_rᵀ = truncated SVD of ΔW; Q_A ← V_r, Q_B ← U_r; A ← 0, B ← 0; clear the
    optimizer state of A and B ("reset").
  Phase II, t' = t − N·T = 1 … T_total (T_total = run steps − N·T):
    t' = T: A ← Σ_r V_rᵀ / (2s), B ← U_r Σ_r / (2s), Q_A ← V_r, Q_B ← U_r, clear the state ("resplit", Eq. 5);
    t' > T and t' mod ⌈5 t' / T_total⌉ = 0: Q_A, Q_B ← sign-fixed QR of Aᵀ, B ("refresh"; intervals 1 … 5 over
    five equal phases).
The SVD never forms ΔW: ΔW = s L Rᵀ with thin factors (LoRA form L = B, R = Aᵀ; OD form L = [Q_B | B],
R = [Aᵀ | Q_A]), QR of both, SVD of the 2r x 2r core (``ops.qr.low_rank_svd``).

Decisions:
  Decision (specs/odlora.md G3, erratum): every QR is sign-fixed (diag R > 0): ``ops.qr``.
  Decision (G1): the refresh condition is ``t' mod ⌈refresh_phases · t' / T_total⌉ == 0``; T_total is the run's
  ``train.steps`` minus the N·T Phase-I steps (``StepContext.total_steps``; 0 = unknown → refresh every step).
  Decision (G5): Phase I steps are part of ``train.steps`` and the data stream simply continues into Phase II.
  Decision (G6): the run's own learning-rate schedule applies in both phases (no method-specific schedule); a long
  warm-up makes the 10-step rounds learn little, so the configs use a short one.
  Decision (G7): "clear all optimizer states" empties the state of A and B (moments and step counter).
  Decision (G17): a factor that is rank-deficient or not finite keeps its old basis at a refresh (counted
  warning). At an SVD event a non-finite layer is skipped (counted) and a rank-deficient factor takes the
  eigenbasis of its Gram (``ops.qr.eigen_basis``); where ΔW itself has rank < r the bases may get zero columns
  (counted warning); they regrow at the next refresh once A and B have full rank.
  Decision (G18): the adapter files hold Q_A, Q_B and the form flag, so ``load_adapter`` restores ΔW exactly.
  Decision (G2): a refresh is not compensated (paper-faithful); with sign-fixed QR its jump is O(η).

Sharding (the LoRA layout; Q has its factor's sharding along the long dimension, specs/odlora.md §6.1, §6.2):
  column: B, Q_B hold local rows of m; A, Q_A replicated; A's gradient is a partial sum (as LoRA). Q_B's QR is a
          Cholesky-QR2 whose r x r Grams are all-reduced; Q_A's is local.
  row:    A holds local columns of n, Q_A local rows of n; B, Q_B replicated; B's gradient is a partial sum and the
          output a partial sum that the base layer's all-reduce completes. Q_A's QR reduces its Grams.
  Each refresh/SVD event reduces the Grams of every layer in one coalesced all-reduce per Cholesky-QR pass.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Mapping

import torch
from torch import Tensor

from dist_peft.methods.base import Controller, ParamLayout, Site, SiteShape, StepContext, register_method
from dist_peft.methods.lora import LoraAdapter, LoraConfig, add_product
from dist_peft.ops.qr import Reduce, cholesky_qr2, low_rank_svd
from dist_peft.parallel.grams import sum_partial_grams
from dist_peft.parallel.shard import ShardKind, ShardSpec


@dataclass(frozen=True, kw_only=True)
class OdLoraConfig(LoraConfig):
    """LoRA's keys (r is also the bases' rank; dropout is unstated in the paper, G10, so off by default) with the
    paper's scale, and the schedule's."""

    lora_alpha: float = 4.0
    """Numerator of the scale s; the paper uses α = 4 with s = α / √r."""
    use_rslora: bool = True
    """s = lora_alpha / √r (paper); False gives lora_alpha / r."""
    init_rounds: int = 5
    """N: basis-initialisation rounds of Phase I (paper: 5)."""
    init_steps: int = 10
    """T: steps per Phase-I round, and the Phase-II step of the Eq. 5 re-split (paper: 10)."""
    refresh_phases: int = 5
    """Phase II is cut into this many equal phases with refresh intervals 1, 2, … (paper: 5)."""
    rank_tol: float = 1e-6
    """A factor is rank-deficient when min diag(R) <= rank_tol · max diag(R) of its QR (G17)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("init_rounds", "init_steps", "refresh_phases"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if not 0.0 < self.rank_tol < 1.0:
            raise ValueError(f"rank_tol: must be in (0, 1), got {self.rank_tol}")


def schedule_event(t: int, cfg: OdLoraConfig, total_steps: int = 0) -> str:
    """The event after optimizer step ``t`` (1-based): "reset", "resplit", "refresh" or "" (Algorithm 1, G1)."""
    phase1 = cfg.init_rounds * cfg.init_steps
    if t <= phase1:
        return "reset" if t % cfg.init_steps == 0 else ""
    tm, main = t - phase1, total_steps - phase1
    if tm == cfg.init_steps:
        return "resplit"
    if tm < cfg.init_steps:
        return ""
    interval = math.ceil(cfg.refresh_phases * tm / main) if main > 0 else 1
    return "refresh" if tm % interval == 0 else ""


class OdLoraController(Controller):
    """Runs OD-LoRA's resets, Eq. 5 re-split and QR refreshes after the optimizer step, all layers batched."""

    def __init__(self, adapters: Mapping[str, OdLoraAdapter]):
        super().__init__(adapters)
        self.cfg: OdLoraConfig = next(iter(self.adapters.values())).cfg
        self.counts: Counter = Counter()
        """Events and skipped layers so far: reset, resplit, refresh, refresh_skipped, svd_skipped, rank_deficient."""
        self.partial_sum = sum_partial_grams
        """Sums partial Grams over their split (tests substitute a sum over virtual shards)."""

    def value_access(self, hook: str, ctx: StepContext) -> bool:
        """The after-step hooks of a refresh or SVD event (``schedule_event``)."""
        return bool(schedule_event(ctx.step + 1, self.cfg, ctx.total_steps))

    def after_optimizer_step(self, ctx: StepContext) -> None:
        event = schedule_event(ctx.step + 1, self.cfg, ctx.total_steps)
        if event == "refresh":
            self.refresh()
        elif event:
            self.svd_event(ctx, resplit=event == "resplit")

    def _reduce(self, owners: list[tuple[OdLoraAdapter, str, bool]]) -> Reduce:
        """The ``Reduce`` of a list of factors: each (adapter, slot, sharded) in the order of the Grams."""
        def reduce(grams: list[Tensor]) -> None:
            self.partial_sum([((a.site.name, slot), a.spec, g) for (a, slot, sharded), g in zip(owners, grams)
                              if sharded])
        return reduce

    def _warn(self, kind: str, names: list[str], what: str) -> None:
        self.counts[kind] += len(names)
        warnings.warn(f"odlora: {what} for {len(names)} layer(s) ({', '.join(names[:3])}"
                      f"{'…' if len(names) > 3 else ''}); {kind} so far: {self.counts[kind]}", RuntimeWarning,
                      stacklevel=3)

    @torch.no_grad()
    def refresh(self) -> None:
        """Q_A, Q_B ← sign-fixed QR of Aᵀ and B for every layer in the OD form (two coalesced reductions)."""
        items = [(name, a) for name, a in self.adapters.items() if a.od_active]
        if not items:
            return
        mats = [a.lora_A.mT for _, a in items] + [a.lora_B for _, a in items]
        owners = ([(a, "A", a.spec.kind is ShardKind.ROW) for _, a in items]
                  + [(a, "B", a.spec.kind is ShardKind.COLUMN) for _, a in items])
        qrs = cholesky_qr2(mats, self._reduce(owners), self.cfg.rank_tol)
        skipped, targets, sources = [], [], []
        for i, (name, a) in enumerate(items):
            q_a, q_b = qrs[i], qrs[len(items) + i]
            if q_a is None or q_b is None:
                skipped.append(name)  # Decision (G17): keep both old bases of the layer
                continue
            targets += [a.Q_A, a.Q_B]
            sources += [q_a[0], q_b[0]]
        if targets:
            torch._foreach_copy_(targets, sources)  # every layer's bases in one call (they are in the OD form)
        self.counts["refresh"] += 1
        if skipped:
            self._warn("refresh_skipped", skipped, "QR refresh skipped (rank-deficient or non-finite factor)")

    @torch.no_grad()
    def svd_event(self, ctx: StepContext, resplit: bool) -> None:
        """Truncated SVD of every layer's ΔW from its thin factors; then the reset (A = B = 0, bases = singular
        vectors) or the Eq. 5 re-split, and the optimizer state of A and B is cleared."""
        items = list(self.adapters.items())
        factors = [a.factors() for _, a in items]
        owners = ([(a, "L", a.spec.kind is ShardKind.COLUMN) for _, a in items]
                  + [(a, "R", a.spec.kind is ShardKind.ROW) for _, a in items])
        out, deficient = low_rank_svd([f[0] for f in factors], [f[1] for f in factors],
                                      [a.scale for _, a in items], self.cfg.r, self._reduce(owners), self.cfg.rank_tol)
        for (name, a), res in zip(items, out):
            if res is None:
                continue
            u, sigma, v = res
            half = sigma / (2 * a.scale)
            a.set_bases(v, u, (half[:, None] * v.mT) if resplit else torch.zeros_like(a.lora_A),
                        (u * half) if resplit else torch.zeros_like(a.lora_B))
        ctx.optim_state.clear([p for _, a in items for p in (a.lora_A, a.lora_B)])
        self.counts["resplit" if resplit else "reset"] += 1
        if any(res is None for res in out):
            self._warn("svd_skipped", [n for (n, _), res in zip(items, out) if res is None],
                       "SVD event skipped (non-finite factor)")
        if deficient:
            self._warn("rank_deficient", [items[i][0] for i in deficient],
                       "ΔW has rank < r at an SVD event (bases may get zero columns)")

    def state_dict(self) -> dict[str, Tensor]:
        """The bases and the form flag of every layer (A and B are in the checkpoint's trainable tensors)."""
        return {f"{name}/{buf}": getattr(a, buf) for name, a in self.adapters.items() for buf in a.buffer_names}

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        expected = self.state_dict()
        if set(state) != set(expected):
            missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
            raise ValueError(f"odlora state: missing {missing[:3]}, unexpected {extra[:3]}")
        for key, t in state.items():
            if t.shape != expected[key].shape or not torch.isfinite(t).all():
                raise ValueError(f"odlora state: {key} has shape {tuple(t.shape)} or non-finite values")
            expected[key].copy_(t)


class _OdForm(torch.autograd.Function):
    """y = base_out + s H Lᵀ with H = x R (T x 2r), R = [Aᵀ | Q_A], L = [Q_B | B] (Eq. 4), in x's dtype.

    Backward, P = GL (T x 2r, scaled by s): ∂x = P Rᵀ, ∂A = P[:, :r]ᵀ x, ∂B = s Gᵀ H[:, r:], ∂base_out = G; no
    gradient is formed for the bases' halves of L and R (autograd through the concatenations would compute the
    full n x 2r and m x 2r products and drop half): 4(m + n)rT forward, 6(m + n)rT backward. The sum and the scale
    are fused into one addmm (``lora.add_product``); saved: x (the base layer's input, shared) and H."""

    @staticmethod
    def forward(ctx, x: Tensor, base_out: Tensor, a: Tensor, b: Tensor, q_a: Tensor, q_b: Tensor,
                scale: float) -> Tensor:
        right = torch.cat([a.mT, q_a], 1).to(x.dtype)  # n x 2r
        left = torch.cat([q_b, b], 1).to(x.dtype)  # m x 2r
        x2 = x.reshape(-1, x.shape[-1])
        h = x2 @ right
        ctx.save_for_backward(x, h, left, right)
        ctx.scale, ctx.param_dtypes = scale, (a.dtype, b.dtype)
        return add_product(base_out, h, left, scale)

    @staticmethod
    def backward(ctx, g: Tensor):
        x, h, left, right = ctx.saved_tensors
        r, s = h.shape[1] // 2, ctx.scale
        g2, x2 = g.reshape(-1, g.shape[-1]), x.reshape(-1, x.shape[-1])
        p = torch.mm(g2.to(left.dtype), left).mul_(s)
        d_x = (p @ right.mT).view(x.shape) if ctx.needs_input_grad[0] else None
        d_a = (p[:, :r].mT @ x2).to(ctx.param_dtypes[0]) if ctx.needs_input_grad[2] else None
        d_b = (g2.mT.to(h.dtype) @ h[:, r:]).mul_(s).to(ctx.param_dtypes[1]) if ctx.needs_input_grad[3] else None
        return d_x, g, d_a, d_b, None, None, None


@register_method("odlora", OdLoraConfig)
class OdLoraAdapter(LoraAdapter):
    buffer_names = ("Q_A", "Q_B", "od_form")
    controller_cls = OdLoraController

    def __init__(self, site: Site, spec: ShardSpec, cfg: OdLoraConfig):
        super().__init__(site, spec, cfg)  # lora_A Kaiming-uniform (sliced from the full A), lora_B = 0 (G9)
        kw = {"device": site.weight.device, "dtype": torch.float32}
        self.register_buffer("Q_A", torch.zeros(self.lora_A.shape[1], cfg.r, **kw))
        self.register_buffer("Q_B", torch.zeros(self.lora_B.shape[0], cfg.r, **kw))
        # od_form: 1 once the bases exist (after the first reset): the OD form of Eq. 4; 0: round 1's LoRA form
        self.register_buffer("od_form", torch.zeros(1, **kw))
        self._form_seen: tuple[Tensor, int, bool] | None = None

    @property
    def od_active(self) -> bool:
        """Whether the OD form is on; re-read (one host sync) only when ``od_form`` was replaced or written."""
        flag, seen = self.od_form, self._form_seen
        if seen is None or seen[0] is not flag or seen[1] != flag._version:
            self._form_seen = seen = (flag, flag._version, bool(flag.item()))
        return seen[2]

    def factors(self) -> tuple[Tensor, Tensor]:
        """(L, R) with ΔW = s L Rᵀ: (B, Aᵀ) in the LoRA form, ([Q_B | B], [Aᵀ | Q_A]) in the OD form."""
        if not self.od_active:
            return self.lora_B, self.lora_A.mT
        return torch.cat([self.Q_B, self.lora_B], 1), torch.cat([self.lora_A.mT, self.Q_A], 1)

    def forward(self, x: Tensor, base_out: Tensor) -> Tensor:
        if not self.od_active:  # Phase I, round 1: the LoRA form
            return super().forward(x, base_out)
        return _OdForm.apply(self.dropout(x), base_out, self.lora_A, self.lora_B, self.Q_A, self.Q_B, self.scale)

    def delta_weight(self) -> Tensor:
        left, right = self.factors()
        return self.scale * (left @ right.mT)

    def buffer_layouts(self) -> dict[str, ParamLayout]:
        """Q_A follows A's split of n (rows), Q_B follows B's split of m (rows); no buffer has a gradient."""
        kind = self.spec.kind
        return {"Q_A": ParamLayout(0 if kind is ShardKind.ROW else None, False),
                "Q_B": ParamLayout(0 if kind is ShardKind.COLUMN else None, False),
                "od_form": ParamLayout(None, False)}

    @classmethod
    def buffer_bytes(cls, shape: SiteShape, cfg: OdLoraConfig) -> tuple[int, int]:
        """Q_A (n_local x r), Q_B (m_local x r) and the form flag, fp32."""
        return 4 * (cfg.r * (shape.n_local + shape.m_local) + 1), 0

    @classmethod
    def extra_flops(cls, shape: SiteShape, tokens: int, cfg: OdLoraConfig) -> tuple[int, int]:
        """The OD form (Phase II) is a rank-2r product [Q_B | B][A ; Q_Aᵀ] x: 4PT forward; backward the 2r-wide
        input gradient (4PT) plus the gradients of A and B only (2PT), P = r(n + m) local."""
        p = cls.trainable_numel(shape, cfg)
        return 4 * p * tokens, 6 * p * tokens

    @classmethod
    def forward_saved_bytes(cls, shape: SiteShape, cfg: OdLoraConfig, act_bytes: int, tokens: int,
                            samples: int) -> int:
        """The OD form's (``_OdForm``) H = x [Aᵀ | Q_A] (2r per token) and the concatenated L = [Q_B | B] and
        R = [Aᵀ | Q_A] (2r(m_local + n_local) per forward, new tensors at every dtype), in x's dtype; the LoRA form
        of the first round saves less (A x, r per token)."""
        return act_bytes * 2 * cfg.r * (tokens + shape.m_local + shape.n_local)

    @classmethod
    def step_flops(cls, shape: SiteShape, cfg: OdLoraConfig) -> int:
        """A refresh at most every step: Cholesky-QR2 of Aᵀ (n x r) and B (m x r), ≈ 8 r² (n + m)."""
        return 8 * cfg.r * cfg.r * (shape.n_local + shape.m_local)

    @torch.no_grad()
    def load_full(self, full: Mapping[str, Tensor]) -> None:
        """Trainable tensors as LoRA; the bases and the form flag too, where ``full`` has them."""
        super().load_full(full)
        for name, layout in self.buffer_layouts().items():
            if name in full:
                t = full[name] if layout.shard_dim is None else self.spec.shard(full[name], layout.shard_dim)
                getattr(self, name).copy_(t)

    @torch.no_grad()
    def set_bases(self, q_a: Tensor, q_b: Tensor, a: Tensor | None = None, b: Tensor | None = None) -> None:
        """Install new bases (and, when given, new factors) and switch to the OD form."""
        self.Q_A.copy_(q_a)
        self.Q_B.copy_(q_b)
        if a is not None:
            self.lora_A.copy_(a)
            self.lora_B.copy_(b)
        if not self.od_active:
            self.od_form.fill_(1.0)

    @staticmethod
    def peft_config(cfg: OdLoraConfig, target_modules: list[str]) -> None:
        """HF PEFT has no OD-LoRA: the files are ours only (ΔW needs the bases)."""
        return None


@torch.no_grad()
def equivalent_gradient_cosine(g: Tensor, left: Tensor, right: Tensor) -> float:
    """cos(G, G̃) with G̃ ∝ G R Rᵀ + L Lᵀ G (specs/odlora.md §4.8): LoRA L = B, R = Aᵀ; OD-LoRA L = Q_B, R = Q_A.
    Factored, fp64: ⟨G, G̃⟩ = ‖GR‖² + ‖LᵀG‖², ‖G̃‖² = ⟨(GR)ᵀGR, RᵀR⟩ + ⟨LᵀG(LᵀG)ᵀ, LᵀL⟩ + 2‖LᵀGR‖²."""
    g, left, right = g.double(), left.double(), right.double()
    gr, lg = g @ right, left.mT @ g
    inner = (gr * gr).sum() + (lg * lg).sum()
    norm_sq = ((gr.mT @ gr) * (right.mT @ right)).sum() + ((lg @ lg.mT) * (left.mT @ left)).sum()
    norm_sq = norm_sq + 2 * ((left.mT @ gr) ** 2).sum()
    return float(inner / (g.norm() * norm_sq.clamp_min(0).sqrt()).clamp_min(1e-300))


def gradient_cosine(adapter: LoraAdapter, g: Tensor) -> float:
    """The §4.8 metric of one site: OD-LoRA (OD form) uses its bases, LoRA (or the LoRA form) its factors."""
    if isinstance(adapter, OdLoraAdapter) and adapter.od_active:
        return equivalent_gradient_cosine(g, adapter.Q_B, adapter.Q_A)
    return equivalent_gradient_cosine(g, adapter.lora_B, adapter.lora_A.mT)
