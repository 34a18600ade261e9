"""Bytes per rank of a PEFT run on a layout that need not exist: model states (frozen weights, adapter
parameters, gradients, optimizer state, method buffers) and the activations saved for backward.

Model states, per rank of one pipeline stage (P_f frozen elements, P_a adapter elements on that rank):
    frozen     w·P_f (w = 2 for bf16), split by TP (vocab-parallel embedding and head, column/row projections;
               norms replicated) and by PP; under ZeRO-3 also by DP
    adapters   4·P_a (fp32 masters, ``methods/``); gradients 4·P_a; AdamW moments 8·P_a
    ZeRO       (DeepSpeed 0.19, checked tensor by tensor in tests/test_deepspeed.py) per optimizer group g
               (``Adapter.group_numels``: FRoD's S under ``s_lr`` and LoCA's locations have their own), each
               flattened, padded and stepped on its own; p_g its partition. 1: moments and an fp32 copy of the
               partition (``single_partition_of_fp32_groups``); each group's adapters sit in one flat buffer padded to
               a multiple of 2·DP elements (p_g = ⌈P_g / 2DP⌉·2: 4·DP·Σp_g whole, 12·Σp_g optimizer); the whole fp32
               gradients (4·P_a) live from the first micro-batch's backward to the reduction ending the last, then the
               step holds 2's gradient bytes: the larger of the two; 2: + gradient partitions: group g's fp32 gradient
               while it steps, with the reduced partitions of the later groups holding the whole partition buffer
               (4·(Σp_g + the largest p_g but the last's), 4·p for one group); 3: every tensor is split into
               ⌈numel / DP⌉-element partitions (p_g = ⌈P_g/DP⌉, the adapters: 4·Σp_g; frozen: w·Σ⌈n/DP⌉, a
               tensor of at most ``stage3_param_persistence_threshold`` elements (1e5) also stays whole), the
               optimizer holds the fp32 master and moments of the partition (12·Σp_g), and at the step the reduced
               ``grad_partitions_flat_buffer`` and the stepping group's flattened fp32 copy for the inner optimizer
               (4·(Σp_g + max p_g): 8·p for one group); ``gathered``: the working set of whole frozen weights during
               the forward and backward (``stage3_max_live_parameters``, 1e9 elements by default, at least one decoder
               layer, at most the stage). ``buffers`` holds, at every stage, DeepSpeed's gradient-reduction
               bucket: ``reduce_bucket_size`` elements of the gradients' dtype (fp32 here), allocated whole
               whatever the model's size (DeepSpeed's default 5e8 is 2 GB: measured 2,000,000,000 B on every rank
               at stages 1–3, DeepSpeed 0.19; dist_peft caps its default at the trainable count,
               ``reduce_bucket_elements``), through each backward under 1 and 2 and from the first backward on
               under 3 (``overlap_comm``, which this project never sets, would double it under 1 and 2); the tests'
               ZeRO state check measures it on its own
Megatron's 18 B/param (and DeepSpeed's estimators) assume every parameter trains; under adapters only P_a pays
the 16 B/element, the frozen weights pay w.

Activations saved for backward, per token of one micro-batch and one decoder layer on one rank (a = 2 bytes under
bf16, T_mb = micro_batch × seq tokens). One model, parametrised by the engine that runs the layout (``Layout.engine``:
megatron-core when tp·pp > 1, else transformers); counted tensor by tensor with saved-tensor hooks (transformers:
tests/test_accounting.py; megatron-core TP2×PP2 with and without SP and recompute: tests/test_megatron.py):
                    transformers                        megatron-core (local spec, CanonicalSites, SDPAttention)
    RMSNorm ×2      4h + 4 each: the fp32 input cast and 1/rms (transformers casts to fp32; torch's rms_norm, which
                    megatron's local spec runs, saves its fp32 upcast too: at fp32 the input itself, shared with
                    the layer input a recompute keeps; layer 0's input norm saves nothing when the embedding is
                    frozen, in both engines)
    norm outputs    a·h each, where a targeted q/k/v (gate/up) adapter saves its input (``saves_input``; under SP
                    the all-gathered input: megatron's own linears would keep the shard and re-gather, the adapters
                    keep it whole); likewise o_proj's and down_proj's inputs below
    attention       q, k after RoPE, v, output,         the fused qkv output a(nd + 2gd) (v is a view of it and
                    log-sum-exp (SDPA / flash):         keeps it whole), q and k after RoPE a(nd + gd), output a·nd,
                    a(2nd + 2gd) + 4n; no s² scores     log-sum-exp 4n; RoPE's cos and sin tables for q and k
                                                        ([s, d] each: 4ad / micro_batch per token)
    o_proj input    a·nd if o_proj is targeted          0: the adapter saves the attention output itself (a·nd
                                                        under selective recompute, which drops that output)
    MLP             gate, SiLU(gate), up: 3af           fc1's fused output 2af (gate is a view), SiLU(gate) af and
                                                        megatron's ``up + glu_linear_offset`` copy af: 4af
                    down's input a·f if down_proj is targeted
    adapters        the method's ``forward_saved_bytes`` per site and micro-batch over its tokens and samples (LoRA:
                    the a·r product A x; FRoD's per-forward path, OD-LoRA's and LoCA's weight-sized tensors,
                    FO-LoRA's per-sample V_t)
Tensor parallelism divides the attention and MLP terms by TP; sequence parallelism also the norm terms.
Recompute: full keeps only each layer's input (a·h, /TP under SP) per micro-batch in flight, plus one layer's
recomputed working set (its weight casts included; at fp32 less the kept input its norm saves; megatron: on the last
stage the loss's tensors (the final norm, ``head``: the logits' bytes) are freed by the backward before the first
recompute, so only the working set's excess over them counts); selective (megatron-core's core attention) keeps
q, k, v as the checkpoint's inputs and drops the output and log-sum-exp. Pipeline: stage p holds its warm-up
forwards + 1 model chunks of layers/vp (m micro-batches at most): 1F1B min(pp − p, m) micro-batches, interleaved
min((2(pp − p − 1) + (vp − 1)·pp + 1)/vp, m) (the first stage's pp·(1 + (pp − 1)/(pp·vp)) is Megatron's
theoretical_memory_usage), the final norm and the loss once (the last chunk has one micro-batch in flight); at fp32 megatron's last stage still references the previous micro-batch's stage input
(its first norm's saved input) and 1/rms when the next forward saves (4h/SP + 4 per token, without full recompute).
Logits on the last stage: the fp32 log-softmax saved by the loss, its gradient and the a-byte logits:
T_mb·V/TP·(8 + a).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any

from dist_peft.accounting.flops import adapter_class, target_sites
from dist_peft.accounting.shape import ModelShape

GIB = 2**30


@dataclass(frozen=True)
class Layout:
    """Where and how a run executes: parallel sizes, ZeRO stage, batch, precision and recompute."""

    tp: int = 1
    pp: int = 1
    vp: int = 1
    dp: int = 1
    zero: int = 0
    """0: no ZeRO (plain or megatron engine); 1–3: DeepSpeed ZeRO stage."""
    sequence_parallel: bool = False
    recompute: str = "none"
    """none, full (every layer; ``method: block`` is modelled as full) or selective."""
    micro_batch: int = 1
    grad_accum: int = 1
    seq_len: int = 4096
    weight_bytes: int = 2
    act_bytes: int = 2
    zero3_live: int = 10**9
    """ZeRO-3: parameters gathered at once (stage3_max_live_parameters)."""
    zero3_persist: int = 10**5
    """ZeRO-3: tensors of at most this many elements stay whole (stage3_param_persistence_threshold)."""
    reduce_bucket: int | None = None
    """ZeRO: elements of DeepSpeed's fp32 gradient-reduction bucket (``deepspeed.reduce_bucket_size``; None: sized
    from the trainable count, ``reduce_bucket_elements``)."""

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def engine(self) -> str:
        return "megatron" if self.tp * self.pp > 1 else ("deepspeed" if self.zero else "transformers")


DEEPSPEED_REDUCE_BUCKET = 5 * 10**8
"""DeepSpeed's default ``reduce_bucket_size`` (0.19), allocated whole whatever the model's size."""


def reduce_bucket_elements(configured: int | None, trainable: int) -> int:
    """Elements of the gradient-reduction bucket: ``configured`` when set, else DeepSpeed's default capped at the
    rank's trainable elements. Decision: the bucket holds gradients until they are reduced, and this project never
    sets ``overlap_comm``, so a bucket that holds every trainable gradient reduces in the same single call as
    DeepSpeed's 5e8 (adapters are far smaller) while a 70B LoRA rank stops holding 2 GB for ~0.1 GB of gradients."""
    return configured if configured is not None else max(1, min(DEEPSPEED_REDUCE_BUCKET, trainable))


@dataclass
class StageMemory:
    """Bytes on the most loaded rank of one pipeline stage."""

    stage: int
    layers: int
    frozen: int = 0
    gathered: int = 0
    """ZeRO-3: whole frozen weights gathered for the forward and backward (working set)."""
    adapters: int = 0
    gradients: int = 0
    optimizer: int = 0
    buffers: int = 0
    activations: int = 0
    logits: int = 0
    bucket: int = 0
    """ZeRO: DeepSpeed's gradient-reduction bucket (bytes, included in ``buffers``)."""

    @property
    def total(self) -> int:
        return (self.frozen + self.gathered + self.adapters + self.gradients + self.optimizer + self.buffers
                + self.activations + self.logits)


def layer_activation_bytes(shape: ModelShape, method: Any, layout: Layout, first: bool = False) -> float:
    """Bytes saved for backward per token of one decoder layer on one rank (module docstring), no recompute."""
    h, f, a, tp = shape.hidden, shape.intermediate, layout.act_bytes, layout.tp
    nd, gd, n = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim, shape.heads
    own, targets = 0, set()  # targets: the targeted module types whose adapters save their input
    if method is not None:
        cls, tokens = adapter_class(method), layout.micro_batch * layout.seq_len
        for site in target_sites(shape, method.target_modules, tp, layout.weight_bytes):
            own += cls.forward_saved_bytes(site, method.options, a, tokens, layout.micro_batch) / tokens
            if cls.saves_input(site, method.options, tokens):
                targets.add(site.module_type)
    sp = tp if layout.sequence_parallel else 1
    megatron = layout.engine == "megatron"
    selective = layout.recompute == "selective"
    norms = (0 if first else 4 * h + 4) + 4 * h + 4
    inputs = a * h * (bool(targets & {"q_proj", "k_proj", "v_proj"}) + bool(targets & {"gate_proj", "up_proj"}))
    kept_out = 0 if selective else a * nd + 4 * n
    if megatron:
        attn = a * (nd + 2 * gd) + a * (nd + gd) + kept_out + a * nd * ("o_proj" in targets and selective)
        rope = 4 * a * shape.head_dim / layout.micro_batch
        mlp = 4 * a * f
    else:
        attn = a * (nd + 2 * gd) + kept_out + a * nd * ("o_proj" in targets)
        rope, mlp = 0, 3 * a * f
    mlp += a * f * ("down_proj" in targets)
    return norms / sp + inputs + (attn + mlp) / tp + rope + own


def activation_bytes(shape: ModelShape, method: Any, layout: Layout, stage: int, layers: int,
                     head: float = 0.0) -> float:
    """Activations of one stage's rank at the peak of the schedule (module docstring), logits excluded; ``head``:
    the bytes the loss holds on the last stage (the logits' term), which megatron's full recompute frees before its
    first recompute."""
    tokens = layout.micro_batch * layout.seq_len
    sp = layout.tp if layout.sequence_parallel else 1
    megatron = layout.engine == "megatron"
    last = stage == layout.pp - 1
    per_layer = layer_activation_bytes(shape, method, layout)
    final_norm = tokens * (4 * shape.hidden + 4) / sp if last else 0
    in_flight = 1
    if layout.pp > 1:  # megatron's warm-up forwards + 1, in model chunks of layers / vp
        pp, vp = layout.pp, layout.vp
        warmup = (pp - stage - 1) * (2 if vp > 1 else 1) + (vp - 1) * pp
        in_flight = min(warmup + 1, layout.grad_accum * vp) / vp
    if layout.recompute == "full":
        kept = layout.act_bytes * shape.hidden / sp
        working = tokens * (per_layer - kept * (layout.act_bytes == 4)) + weight_cast_bytes(shape, method, layout)
        if megatron:  # one micro-batch's layer is recomputed at a time, after its loss's tensors are freed
            return in_flight * tokens * kept * layers + final_norm + max(working - final_norm - head, 0)
        return in_flight * tokens * kept * layers + working + final_norm
    first = layer_activation_bytes(shape, method, layout, first=True) if stage == 0 else per_layer
    one_mb = tokens * (per_layer * (layers - 1) + first) + layers * weight_cast_bytes(shape, method, layout)
    lingering = megatron and last and layout.pp > 1 and layout.act_bytes == 4
    return in_flight * one_mb + final_norm + lingering * tokens * (4 * shape.hidden / sp + 4)


def weight_cast_bytes(shape: ModelShape, method: Any, layout: Layout) -> int:
    """Per layer and micro-batch: the activation-dtype copies of weights that a GEMM saves for its input gradient
    when weight and activation dtypes differ (fp32 adapters under bf16: ``Adapter.cast_numel``; fp32 frozen weights
    under autocast)."""
    a = layout.act_bytes
    total = 0
    if method is not None and a != 4:
        cls = adapter_class(method)
        total += a * sum(cls.cast_numel(s, method.options)
                         for s in target_sites(shape, method.target_modules, layout.tp, layout.weight_bytes))
    if layout.weight_bytes != a:
        total += a * (shape.layer_params() - 2 * shape.hidden) // layout.tp
    return total


def logits_saved_bytes(shape: ModelShape, layout: Layout) -> int:
    """The fp32 log-softmax the loss saves for one micro-batch (V split by TP)."""
    return 4 * layout.micro_batch * layout.seq_len * shape.vocab // layout.tp


def stage_memory(shape: ModelShape, method: Any, layout: Layout) -> list[StageMemory]:
    """Per-rank bytes of every pipeline stage."""
    if shape.layers % (layout.pp * layout.vp):
        raise ValueError(f"num_hidden_layers {shape.layers} % (pipeline {layout.pp} × virtual {layout.vp})")
    per_stage = shape.layers // layout.pp
    cls = adapter_class(method) if method is not None else None
    sites = list(target_sites(shape, method.target_modules, layout.tp, layout.weight_bytes)) if cls else []
    out = []
    for p in range(layout.pp):
        st = StageMemory(p, per_stage)
        frozen = per_stage * _layer_local_params(shape, layout.tp)
        if p == 0:
            frozen += shape.embedding_params() // layout.tp
        if p == layout.pp - 1:
            frozen += shape.hidden + (shape.vocab * shape.hidden // layout.tp
                                      if not shape.tie_embeddings or layout.pp > 1 else 0)
        groups = [per_stage * sum(g) for g in itertools.zip_longest(
            *(cls.group_numels(s, method.options) for s in sites), fillvalue=0)] if cls else []
        for s in sites:
            own, shared = cls.buffer_bytes(s, method.options)
            st.buffers += own * per_stage + shared
        _model_states(st, frozen, groups, layout, frozen_tensor_numels(shape, p == 0, p == layout.pp - 1, per_stage)
                      if layout.zero == 3 else [])
        if layout.zero == 3:
            st.gathered = layout.weight_bytes * min(max(layout.zero3_live, shape.layer_params()), frozen)
        if layout.zero:  # DeepSpeed's reduction bucket (module docstring)
            st.bucket = 4 * reduce_bucket_elements(layout.reduce_bucket, sum(groups))
            st.buffers += st.bucket
        if p == layout.pp - 1:
            st.logits = int(logits_saved_bytes(shape, layout) * (2 + layout.act_bytes / 4))  # + its gradient, logits
        st.activations = int(activation_bytes(shape, method, layout, p, per_stage, st.logits))
        out.append(st)
    return out


def _layer_local_params(shape: ModelShape, tp: int) -> int:
    """One decoder layer's parameters on one TP rank: projections and their biases split, norms replicated."""
    return (shape.layer_params() - 2 * shape.hidden) // tp + 2 * shape.hidden


def frozen_tensor_numels(shape: ModelShape, first: bool, last: bool, layers: int) -> list[int]:
    """Elements of each frozen tensor of a stage (no TP): per layer the seven projections, their biases and two
    norms; the embedding on the first stage; the final norm and the untied head on the last."""
    h, f, q, kv = shape.hidden, shape.intermediate, shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    layer = [m * n for m, n in shape.site_dims().values()] + [h, h]
    layer += [q, kv, kv] * shape.qkv_bias + [h] * shape.o_bias + [f, f, h] * shape.mlp_bias
    out = layer * layers + [shape.embedding_params()] * first
    return out + ([h] + [shape.vocab * h] * (not shape.tie_embeddings or not first)) * last


def _model_states(st: StageMemory, frozen: int, groups: list[int], layout: Layout, frozen_numels: list[int]) -> None:
    """Model-state bytes of one rank (module docstring: the plain and megatron engines, DeepSpeed's stages);
    ``groups``: the stage's trainable elements per optimizer group."""
    dp, z, w = layout.dp, layout.zero, layout.weight_bytes
    trainable = sum(groups)
    st.frozen = w * frozen
    if z == 0:
        st.adapters, st.gradients, st.optimizer = 4 * trainable, 4 * trainable, 8 * trainable
        return
    parts = [-(-g // (2 * dp)) * 2 if z < 3 else math.ceil(g / dp) for g in groups] or [0]
    st.adapters = 4 * sum(parts) * (dp if z < 3 else 1)
    st.optimizer = 12 * sum(parts)
    if z < 3:  # group i steps while the later groups' reduced gradients still hold the whole partition buffer
        st.gradients = 4 * max(sum(parts) + max(parts[:-1], default=0), parts[-1])
        if z == 1:  # and before that the whole gradients, until the boundary's reduction
            st.gradients = max(st.gradients, 4 * trainable)
    else:  # the reduced partitions of every group, and the fp32 flat gradient of the group stepping
        st.gradients = 4 * (sum(parts) + max(parts))
    if z == 3:
        st.frozen = w * sum(math.ceil(n / dp) + n * (n <= layout.zero3_persist) for n in frozen_numels)
