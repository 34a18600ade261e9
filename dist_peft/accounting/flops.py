"""FLOPs of one training step: the model's (Megatron's formula, what MFU divides by) and the executed ones of a
PEFT step (what the hardware runs: frozen weights skip their weight gradient). One implementation, read by
``dist-peft plan`` and the throughput profiler.

T tokens (all sequences of the step), s the attention span (sequence length), symbols of ``shape.py``.
Every GEMM with a weight of P elements costs 2PT per pass (one multiply-add = 2 FLOPs).

Model FLOPs (Megatron-LM ``num_floating_point_operations``: forward, weight gradient, input gradient, all
weights trained; recompute not counted):
    6T · [3hfL + (h(nd + 2gd) + ndh)L + hV] + 6T·s·n·d·L
The attention core per token and layer: QKᵀ and AV over s/2 keys on average (causal) are 2 · 2 · (s/2) · n · d
forward, ×3 with backward = 6 s n d (the causal ½ and the two products cancel, as Megatron writes it).

Executed FLOPs of a PEFT step (no weight gradient for frozen weights):
    frozen GEMMs     4 T · P_matmul      forward 2PT + input gradient 2PT, the head included, embedding excluded
    attention core   6 T · s · n · d · L (2 forward, 4 backward)
    adapters         Σ_sites the method's ``extra_flops`` (forward, backward), declared in methods/<m>.py
    between steps    Σ_sites the method's ``step_flops`` (merges, QR, solves), per optimizer step
    recompute        full: one more forward of the recomputed layers (frozen GEMMs, attention, adapters);
                     selective: one more forward of the attention core
Not counted (each < 1% at 12B–70B widths): norms, RoPE, SwiGLU, softmax and other element-wise work; the
input gradient of layer 0's q/k/v, which autograd skips when nothing below them trains; flash attention's
recompute of the scores in its backward (FA2: 2.5× forward instead of 2×).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Iterator

from dist_peft.accounting.shape import MODULE_TYPES, ModelShape, site_kind
from dist_peft.methods.base import Adapter, SiteShape, get_method


def model_flops(shape: ModelShape, tokens: int, seq_len: int) -> int:
    """Megatron's FLOPs of a step over ``tokens`` tokens in sequences of ``seq_len`` (SwiGLU, GQA)."""
    h, f, L = shape.hidden, shape.intermediate, shape.layers
    nd, gd = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    dense = 3 * h * f * L + (h * (nd + 2 * gd) + nd * h) * L + h * shape.vocab
    return 6 * tokens * dense + attention_flops(shape, tokens, seq_len)


def attention_flops(shape: ModelShape, tokens: int, seq_len: int) -> int:
    """The attention core, forward and backward: 6 T s n d L (a third of it forward)."""
    return 6 * tokens * seq_len * shape.heads * shape.head_dim * shape.layers


def target_sites(shape: ModelShape, targets: Any, tp: int = 1, weight_bytes: int = 2) -> Iterator[SiteShape]:
    """One ``SiteShape`` per targeted module type (``layers`` = the decoder's L), split as megatron splits it."""
    unknown = set(targets) - set(MODULE_TYPES)
    if unknown:
        raise ValueError(f"target_modules {sorted(unknown)} are not projections of a {shape.model_type} layer "
                         f"({', '.join(MODULE_TYPES)})")
    dims = shape.site_dims()
    for module_type in MODULE_TYPES:
        if module_type in targets:
            m, n = dims[module_type]
            yield SiteShape(module_type, m, n, site_kind(module_type, tp), tp, shape.layers, weight_bytes)


def adapter_class(method: Any) -> type[Adapter]:
    return get_method(method.name).adapter_cls


@dataclass(frozen=True)
class FlopBreakdown:
    """Executed FLOPs of one step by part (see the module docstring)."""

    frozen_forward: int
    frozen_backward: int
    attention_forward: int
    attention_backward: int
    adapter_forward: int
    adapter_backward: int
    between_steps: int
    recompute: int

    @property
    def total(self) -> int:
        return sum(getattr(self, f.name) for f in fields(self))


def recomputed_fraction(recompute: Any, layers_per_stage: int) -> float:
    """Share of a stage's decoder layers whose forward runs twice under ``granularity: full``."""
    if recompute is None or recompute.granularity != "full":
        return 0.0
    if recompute.method == "block":
        n = layers_per_stage if recompute.num_layers is None else min(recompute.num_layers, layers_per_stage)
        return n / layers_per_stage
    return 1.0


def flop_breakdown(shape: ModelShape, tokens: int, seq_len: int, method: Any = None, recompute: Any = None,
                   pipeline: int = 1, tensor: int = 1, forwards: int = 1, replicas: int = 1) -> FlopBreakdown:
    """Executed FLOPs of one step, whole model (all ranks together), of ``forwards`` forward/backward passes of
    ``tokens`` tokens each (a micro-batch; ``forwards`` = gradient accumulation × data-parallel replicas).

    ``method``: the run's ``method`` section (``.name``, ``.options``, ``.target_modules``); None: no adapters
    (the frozen model's forward and input-gradient backward, the 4N bound). ``recompute``: the run's
    ``recompute`` section or None; ``pipeline`` the stages (for ``method: block``); ``tensor`` the TP size;
    ``replicas`` the data-parallel replicas, each of which runs the between-step work (``step_flops``).
    Decision: the adapters' work is ``tensor`` × one rank's (``extra_flops`` of the rank's ``SiteShape``), not the
    unsplit site's: what every TP rank repeats (FRoD's d × d transforms, LoCA's full-length DCTs, LoRA's
    replicated factor) is executed ``tensor`` times, and a per-rank figure (÷ TP × PP) must keep it whole.
    Decision: evaluated per forward, then multiplied: some adapter work is per forward, not per token (FRoD's
    merged build and its path choice, FO-LoRA's filters), so the step's whole token count in one call would
    count it once per step."""
    attn = attention_flops(shape, tokens, seq_len)
    a_fwd = a_bwd = step = 0
    if method is not None:
        cls = adapter_class(method)
        for site in target_sites(shape, method.target_modules, tensor):
            fwd, bwd = cls.extra_flops(site, tokens, method.options)
            a_fwd, a_bwd = a_fwd + fwd * site.layers * tensor, a_bwd + bwd * site.layers * tensor
            step += cls.step_flops(site, method.options) * site.layers * tensor
    layer_gemm = 2 * tokens * shape.layers * sum(m * n for m, n in shape.site_dims().values())
    frac = recomputed_fraction(recompute, shape.layers // pipeline)
    again = frac * (layer_gemm + attn / 3 + a_fwd)
    if recompute is not None and recompute.granularity == "selective":
        again = attn / 3
    frozen_fwd = 2 * tokens * shape.matmul_params() * forwards
    return FlopBreakdown(frozen_forward=frozen_fwd, frozen_backward=frozen_fwd, attention_forward=attn // 3 * forwards,
                         attention_backward=(attn - attn // 3) * forwards, adapter_forward=a_fwd * forwards,
                         adapter_backward=a_bwd * forwards, between_steps=step * replicas,
                         recompute=int(again) * forwards)


def executed_flops(shape: ModelShape, tokens: int, seq_len: int, method: Any = None, recompute: Any = None,
                   pipeline: int = 1, tensor: int = 1, forwards: int = 1, replicas: int = 1) -> int:
    """The total of ``flop_breakdown``: what the hardware executes in one step (HFU's numerator)."""
    return flop_breakdown(shape, tokens, seq_len, method, recompute, pipeline, tensor, forwards, replicas).total


@dataclass(frozen=True)
class ParamCounts:
    total: int
    """The base model's parameters (HF's count)."""
    trainable: int
    """The adapters' trainable elements (unsplit)."""
    buffers: int
    """Bytes of the adapters' non-trainable state (per-site plus once per module type), unsplit."""


def param_counts(shape: ModelShape, method: Any = None) -> ParamCounts:
    """Parameters of the base model and, for ``method``, the trainable elements and buffer bytes it adds."""
    trainable = buffers = 0
    if method is not None:
        cls = adapter_class(method)
        for site in target_sites(shape, method.target_modules):
            trainable += cls.trainable_numel(site, method.options) * site.layers
            own, shared = cls.buffer_bytes(site, method.options)
            buffers += own * site.layers + shared
    return ParamCounts(shape.param_count(), trainable, buffers)
