"""megatron-core engine: a ``GPTModel`` built from a Hugging Face Llama-family config, HF weights imported
per rank, and adapters at the parallel linears under their canonical HF names.

Order of set-up (``build_model``): megatron parallel state must exist → apply the CPU shim (no-op on CUDA)
→ build the local-spec ``GPTModel`` of this pipeline stage → replace every ``linear_qkv`` / ``linear_proj``
/ ``linear_fc1`` / ``linear_fc2`` by a ``CanonicalSite`` holding this rank's slices of the HF projections,
read from the safetensors files (each rank reads only its slices) → attach adapters to the targeted
projections → freeze everything but the adapters.

Decision: a ``CanonicalSite`` keeps the fused megatron sites un-fused, one frozen ``nn.Linear`` per HF
projection (q, k, v on ``linear_qkv``; gate, up on ``linear_fc1``), and interleaves their outputs into the
layout megatron's attention and MLP expect. Every adapter then sees a contiguous local weight shard
(``Site.weight``) that a method may read or merge into in place, and adapter files are exactly those of the
transformers engine. The price is three (two) GEMMs instead of one fused GEMM per site.

Collectives: a column site passes its input once through ``copy_to_region`` (the dgrad all-reduce megatron's
ColumnParallelLinear would do) and a row site reduces base + adapter partial outputs once with
``reduce_from_region``: an adapter adds no per-token collective. With sequence parallelism the same two places
all-gather the sequence-split input (``gather_sequence``; the adapter reads that gathered input, no gather of its
own) and reduce-scatter base + adapter partial outputs once (``scatter_sequence``), as megatron's own linears do.

Layer spec (``layer_spec``): megatron-core's local spec with two modules replaced. Core attention is PyTorch's
``scaled_dot_product_attention`` (``SDPAttention``: flash / memory-efficient kernels on GPUs, never a b×heads×s×s
score tensor; megatron's local ``DotProductAttention`` materialises one per layer), and the norms are plain torch
RMSNorms that also run sequence-parallel (megatron's ``WrappedTorchNorm`` refuses it; these norms are frozen, so
the gradient all-reduce of norm weights that megatron adds under sequence parallelism is not needed). Transformer
Engine specs are not used: the sites are replaced by CanonicalSites anyway and TE's fused attention needs CUDA
and a TE install that this project does not test.

Activation recompute (``recompute`` section) is megatron's own (``recompute_granularity`` / ``_method`` /
``_num_layers``). Its full recompute is a re-entrant checkpoint, which returns no gradient unless the layers'
input needs one; with a frozen embedding it does not, so the first stage marks the embedding output as needing a
gradient (one extra [s, b, h] gradient, and under TP the first layer's dgrad all-reduce) or the adapters of that
stage would get none.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import Tensor, nn

from dist_peft.integrations.transformers import AdaptedLinear, seeded, site_seed
from dist_peft.methods.base import Site, get_method
from dist_peft.parallel import collectives
from dist_peft.parallel.regions import copy_to_region, gather_sequence, reduce_from_region, scatter_sequence
from dist_peft.parallel.shard import ShardKind, ShardSpec
from dist_peft.train.config import ConfigError, RecomputeConfig


@dataclass(frozen=True)
class Layout:
    """The model-parallel position of this rank (from megatron's parallel_state)."""

    tp_rank: int
    tp_size: int
    tp_group: Any
    pp_rank: int
    pp_size: int

    @staticmethod
    def current() -> "Layout":
        from megatron.core import parallel_state as ps

        return Layout(ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size(),
                      ps.get_tensor_model_parallel_group(), ps.get_pipeline_model_parallel_rank(),
                      ps.get_pipeline_model_parallel_world_size())

    def spec(self, kind: ShardKind) -> ShardSpec:
        return ShardSpec(kind, self.tp_rank, self.tp_size, self.tp_group) if self.tp_size > 1 else ShardSpec()


SUPPORTED = ("llama", "mistral", "qwen2")
"""Model types whose HF layout (separate q/k/v and gate/up projections, RMSNorm, SwiGLU, RoPE) the import maps."""


def check_layout(hf_config: Any, tp: int, pp: int, vp: int = 1) -> None:
    """Clear errors for a model that the requested TP/PP/VP sizes cannot split."""
    heads, groups = hf_config.num_attention_heads, hf_config.num_key_value_heads
    problems = [f"model_type {hf_config.model_type!r} is not one of {', '.join(SUPPORTED)}"
                if hf_config.model_type not in SUPPORTED else "",
                f"hidden_act {getattr(hf_config, 'hidden_act', None)!r} is not 'silu' (SwiGLU)"
                if getattr(hf_config, "hidden_act", None) != "silu" else "",
                f"num_key_value_heads {groups} % tensor {tp}" if groups % tp else "",
                f"num_hidden_layers {hf_config.num_hidden_layers} % (pipeline {pp} × virtual_pipeline {vp})"
                if hf_config.num_hidden_layers % (pp * vp) else "",
                f"intermediate_size {hf_config.intermediate_size} % tensor {tp}" if hf_config.intermediate_size % tp else "",
                f"vocab_size {hf_config.vocab_size} % tensor {tp}" if hf_config.vocab_size % tp else "",
                f"num_attention_heads {heads} % num_key_value_heads {groups}" if heads % groups else "",
                _rope_problem(hf_config)]
    problems = [p for p in problems if p]
    if problems:
        raise ConfigError(f"parallel: this model cannot be split as tensor={tp}, pipeline={pp}, virtual_pipeline={vp}: "
                         f"{'; '.join(problems)}")


def recompute_kwargs(recompute: RecomputeConfig | None, layers_per_chunk: int) -> dict[str, Any]:
    """megatron's ``recompute_*`` arguments for the run's ``recompute`` section. ``num_layers`` None means 1 for
    uniform (every layer on its own) and every layer of the chunk for block; a uniform group must divide the layers
    of each model chunk (megatron would index past the chunk)."""
    if recompute is None:
        return {}
    if recompute.granularity == "selective":
        return {"recompute_granularity": "selective"}  # megatron's default modules: core attention
    n = recompute.num_layers or (1 if recompute.method == "uniform" else layers_per_chunk)
    if recompute.method == "uniform" and layers_per_chunk % n:
        raise ConfigError(f"recompute.num_layers: uniform groups of {n} layers do not divide the {layers_per_chunk} "
                          f"layers of each model chunk")
    return {"recompute_granularity": "full", "recompute_method": recompute.method, "recompute_num_layers": n}


def transformer_config(hf: Any, tp: int, pp: int, dtype: torch.dtype, vp: int = 1, sequence_parallel: bool = False,
                       recompute: RecomputeConfig | None = None) -> Any:
    """megatron ``TransformerConfig`` of a Llama / Mistral / Qwen2-shaped HF config."""
    from megatron.core.transformer import TransformerConfig

    cpu = not torch.cuda.is_available()
    return TransformerConfig(
        num_layers=hf.num_hidden_layers, hidden_size=hf.hidden_size, num_attention_heads=hf.num_attention_heads,
        num_query_groups=hf.num_key_value_heads, ffn_hidden_size=hf.intermediate_size,
        kv_channels=getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads,
        normalization="RMSNorm", layernorm_epsilon=hf.rms_norm_eps, gated_linear_unit=True,
        activation_func=F.silu, add_bias_linear=False, add_qkv_bias=_qkv_bias(hf),
        hidden_dropout=0.0, attention_dropout=getattr(hf, "attention_dropout", 0.0),
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, params_dtype=dtype, pipeline_dtype=dtype,
        virtual_pipeline_model_parallel_size=vp if vp > 1 else None,
        bf16=dtype == torch.bfloat16, use_cpu_initialization=True, perform_initialization=False,
        bias_dropout_fusion=False, apply_rope_fusion=False, masked_softmax_fusion=False,
        gradient_accumulation_fusion=False, calculate_per_token_loss=True, sequence_parallel=sequence_parallel,
        **recompute_kwargs(recompute, hf.num_hidden_layers // (pp * vp)),
        batch_p2p_comm=not cpu)  # gloo: batched p2p is wrong for interleaved schedules (cpu_stack.md §4)


LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
"""megatron-core 0.16 applies Llama 3's RoPE scaling with these constants fixed (Llama 3.1 / 3.3 use them); only
the factor is a parameter."""


def _rope_parameters(hf: Any) -> dict[str, Any]:
    params = dict(getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {})
    params.setdefault("rope_theta", getattr(hf, "rope_theta", 10000.0))
    params.setdefault("rope_type", params.get("type", "default"))
    return params


def _rope_problem(hf: Any) -> str:
    p = _rope_parameters(hf)
    if p["rope_type"] == "default":
        return ""
    if p["rope_type"] == "llama3" and all(float(p.get(k, -1)) == v for k, v in LLAMA3_ROPE.items()):
        return ""
    return (f"rope_type {p['rope_type']!r} with {p} is not supported (default, or llama3 with "
            f"{LLAMA3_ROPE} as megatron-core fixes them)")


def _rope_kwargs(hf: Any) -> dict[str, Any]:
    """GPTModel's RoPE arguments from the HF config (checked by ``_rope_problem`` first)."""
    p = _rope_parameters(hf)
    scaled = {"rope_scaling": True, "rope_scaling_factor": float(p["factor"])} if p["rope_type"] == "llama3" else {}
    return {"rotary_base": p["rope_theta"], **scaled}


def _qkv_bias(hf: Any) -> bool:
    return bool(getattr(hf, "attention_bias", False) or hf.model_type == "qwen2")


class HFCheckpoint:
    """Lazy reader of a HF safetensors folder: ``read(key, dim, start, stop)`` loads only that slice."""

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            files = {k: folder / f for k, f in json.loads(index.read_text())["weight_map"].items()}
        elif (folder / "model.safetensors").is_file():
            with safe_open(folder / "model.safetensors", "pt") as f:
                files = {k: folder / "model.safetensors" for k in f.keys()}
        else:
            raise FileNotFoundError(f"{folder}: no model.safetensors or model.safetensors.index.json")
        self.files = files

    def read(self, key: str, dim: int | None = None, part: tuple[int, int] | None = None) -> Tensor:
        if key not in self.files:
            raise KeyError(f"{key} is not in the checkpoint")
        with safe_open(self.files[key], "pt") as f:
            sl = f.get_slice(key)
            if dim is None:
                return sl[:]
            index = [slice(None)] * len(sl.get_shape())
            index[dim] = slice(*part)
            return sl[tuple(index)]


class CanonicalSite(nn.Module):
    """A megatron parallel linear as its HF projections (each a frozen ``nn.Linear`` or an ``AdaptedLinear``).

    Column: y_local = fuse([p(x̃) for p in parts]) with x̃ = copy_to_region(x) (sequence parallel: the all-gathered
    x). Row: y = reduce(p(x_local)) (sequence parallel: reduce-scatter). Returns megatron's ``(output, bias)`` pair
    (bias None: biases live inside the projections).
    """

    def __init__(self, kind: ShardKind, parts: dict[str, nn.Module], fuse: Callable[[list[Tensor]], Tensor],
                 tp_group: Any, sequence_parallel: bool = False):
        super().__init__()
        self.kind, self.fuse, self.tp_group = kind, fuse, tp_group
        self.parts = nn.ModuleDict(parts)
        self.enter, self.leave = (gather_sequence, scatter_sequence) if sequence_parallel else \
            (copy_to_region, reduce_from_region)

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, None]:
        if self.kind is ShardKind.COLUMN:
            x = self.enter(x, self.tp_group)
            return self.fuse([p(x) for p in self.parts.values()]), None
        (part,) = self.parts.values()
        return self.leave(part(x), self.tp_group), None


def _fuse_qkv(groups: int) -> Callable[[list[Tensor]], Tensor]:
    """Interleave per query group, megatron's linear_qkv layout: [q heads of group g | k_g | v_g] for each g."""
    def fuse(parts: list[Tensor]) -> Tensor:
        q, k, v = (p.unflatten(-1, (groups, -1)) for p in parts)
        return torch.cat([q, k, v], dim=-1).flatten(-2)
    return fuse


def _cat(parts: list[Tensor]) -> Tensor:
    return torch.cat(parts, dim=-1)


def _single(parts: list[Tensor]) -> Tensor:
    return parts[0]


# megatron site → (canonical HF projections under model.layers.{i}., split kind)
SITES = {
    "self_attention.linear_qkv": (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ShardKind.COLUMN),
    "self_attention.linear_proj": (("self_attn.o_proj",), ShardKind.ROW),
    "mlp.linear_fc1": (("mlp.gate_proj", "mlp.up_proj"), ShardKind.COLUMN),
    "mlp.linear_fc2": (("mlp.down_proj",), ShardKind.ROW),
}


def _frozen_linear(ckpt: HFCheckpoint, name: str, kind: ShardKind, layout: Layout, dtype: torch.dtype) -> nn.Linear:
    dim = 0 if kind is ShardKind.COLUMN else 1
    part = layout.spec(kind).local_range(_shape(ckpt, f"{name}.weight")[dim])
    weight = ckpt.read(f"{name}.weight", dim, part).to(dtype)
    bias_key = f"{name}.bias"
    bias = ckpt.read(bias_key, 0, part).to(dtype) if bias_key in ckpt.files and kind is ShardKind.COLUMN else None
    if bias_key in ckpt.files and kind is ShardKind.ROW:
        raise ValueError(f"{bias_key}: biases on row-parallel projections are not supported")
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    linear.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias, requires_grad=False)
    return linear


def _shape(ckpt: HFCheckpoint, key: str) -> list[int]:
    with safe_open(ckpt.files[key], "pt") as f:
        return f.get_slice(key).get_shape()




def _replace_sites(layer: nn.Module, g: int, ckpt: HFCheckpoint, layout: Layout, dtype: torch.dtype,
                   groups_local: int, sequence_parallel: bool) -> list[tuple[CanonicalSite, str]]:
    """Swap the four parallel linears of decoder layer ``g`` for CanonicalSites; returns (site, part) pairs."""
    made = []
    for path, (names, kind) in SITES.items():
        parent, _, attr = path.rpartition(".")
        parts = {n.rpartition(".")[2]: _frozen_linear(ckpt, f"model.layers.{g}.{n}", kind, layout, dtype) for n in names}
        fuse = _fuse_qkv(groups_local) if attr == "linear_qkv" else _cat if len(parts) > 1 else _single
        site = CanonicalSite(kind, parts, fuse, layout.tp_group, sequence_parallel)
        setattr(layer.get_submodule(parent), attr, site)
        made += [(site, f"model.layers.{g}.{n}") for n in names]
    return made


def _replicated_sources(model: nn.Module, head: str) -> dict[str, tuple[str, int | None]]:
    """{megatron parameter of this chunk outside the CanonicalSites: (HF key, vocab-split dim or None)}; the output
    layer reads ``head`` (lm_head, or the embedding when tied)."""
    sources = {"embedding.word_embeddings.weight": ("model.embed_tokens.weight", 0),
               "decoder.final_layernorm.weight": ("model.norm.weight", None), "output_layer.weight": (head, 0)}
    for i, layer in enumerate(model.decoder.layers):
        g = layer.layer_number - 1  # global layer index (1-based in megatron)
        sources[f"decoder.layers.{i}.input_layernorm.weight"] = (f"model.layers.{g}.input_layernorm.weight", None)
        sources[f"decoder.layers.{i}.pre_mlp_layernorm.weight"] = (f"model.layers.{g}.post_attention_layernorm.weight",
                                                                   None)
    in_sites = {id(p) for m in model.modules() if isinstance(m, CanonicalSite) for p in m.parameters()}
    return {name: sources[name] for name, p in model.named_parameters() if id(p) not in in_sites}


def _load_replicated(model: nn.Module, ckpt: HFCheckpoint, layout: Layout, hf: Any, dtype: torch.dtype) -> None:
    """Embedding (vocab rows of this TP rank), norms and output layer of this stage, from the HF names."""
    vocab = layout.spec(ShardKind.COLUMN).local_range(hf.vocab_size)
    head = "model.embed_tokens.weight" if hf.tie_word_embeddings or "lm_head.weight" not in ckpt.files else "lm_head.weight"
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, (key, dim) in _replicated_sources(model, head).items():
            p = params[name]
            value = ckpt.read(key, dim, vocab if dim is not None else None)
            if value.shape != p.shape:
                raise ValueError(f"{key}: shape {tuple(value.shape)} does not fit {name} {tuple(p.shape)}")
            p.copy_(value.to(dtype))


class SDPAttention(nn.Module):
    """megatron's core attention (q, k, v [s, b, heads, d] → [s, b, heads · d]) as one causal
    ``F.scaled_dot_product_attention`` with grouped keys and values (``enable_gqa``): no [b, heads, s, s] scores are
    kept. The attention mask is ignored (causal by construction: padding follows the text and is masked out of the
    loss). Configurations it cannot express are refused when the model is built."""

    def __init__(self, config: Any, layer_number: int, attn_mask_type: Any, attention_type: str = "self",
                 attention_dropout: float | None = None, softmax_scale: float | None = None, **_: Any):
        super().__init__()
        from megatron.core.transformer.enums import AttnMaskType

        problems = [f"{name} {value!r}" for name, value, fine in (
            ("attn_mask_type", attn_mask_type, attn_mask_type == AttnMaskType.causal),
            ("context_parallel_size", config.context_parallel_size, config.context_parallel_size == 1),
            ("window_size", config.window_size, config.window_size is None),
            ("softmax_type", getattr(config, "softmax_type", "vanilla"), getattr(config, "softmax_type", "vanilla") == "vanilla"),
            ("apply_query_key_layer_scaling", config.apply_query_key_layer_scaling, not config.apply_query_key_layer_scaling),
        ) if not fine]
        if problems:
            raise ConfigError(f"attention: SDPA core attention supports causal self-attention only; got {', '.join(problems)}")
        self.config, self.scale = config, softmax_scale
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(self, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None = None,
                attn_mask_type: Any = None, attention_bias: Tensor | None = None, packed_seq_params: Any = None,
                **_: Any) -> Tensor:
        if attention_bias is not None or packed_seq_params is not None:
            raise ValueError("SDPAttention: attention_bias and packed sequences are not supported")
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, d]
        p = self.dropout if self.training else 0.0
        fork = contextlib.nullcontext()
        if p and not self.config.sequence_parallel:  # megatron's rule: TP ranks draw different head masks
            from megatron.core import tensor_parallel

            fork = tensor_parallel.get_cuda_rng_tracker().fork()
        with fork:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True, scale=self.scale,
                                                 enable_gqa=k.shape[1] != q.shape[1])
        return out.permute(2, 0, 1, 3).flatten(2)


class FrozenRMSNorm(nn.RMSNorm):
    """megatron's local RMSNorm (``WrappedTorchNorm``: torch's RMSNorm) built from megatron's arguments, without its
    refusal of sequence parallelism: on a sequence shard the norm is the same per-token function, and its weight is
    frozen, so no gradient sum over the shards is needed."""

    def __init__(self, config: Any, hidden_size: int, eps: float = 1e-5, **_: Any):
        super().__init__(hidden_size, eps=eps)


def layer_specs(config: Any, vp_stage: int | None) -> Any:
    """The block spec of one model chunk: megatron's local layer spec with SDPA core attention and FrozenRMSNorm
    norms (layers and final norm)."""
    from dataclasses import replace

    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

    layer = get_gpt_layer_local_spec(normalization="RMSNorm")
    sub = layer.submodules
    attention = replace(sub.self_attention, submodules=replace(sub.self_attention.submodules, core_attention=SDPAttention))
    layer = replace(layer, submodules=replace(sub, input_layernorm=FrozenRMSNorm, pre_mlp_layernorm=FrozenRMSNorm,
                                              self_attention=attention))
    return TransformerBlockSubmodules(layer_specs=[layer] * get_num_layers_to_build(config, vp_stage=vp_stage),
                                      layer_norm=FrozenRMSNorm)


def _input_needs_grad(module: nn.Module, args: Any, out: Tensor) -> Tensor | None:
    """Forward hook on the embedding under full recompute (module docstring)."""
    return out.requires_grad_() if torch.is_grad_enabled() and not out.requires_grad else None


def build_model(hf_folder: str | Path, dtype: torch.dtype = torch.float32, sequence_parallel: bool = False,
                recompute: RecomputeConfig | None = None) -> tuple[list[nn.Module], Any, list]:
    """This stage's GPTModel chunks (one without a virtual pipeline) with HF weights, frozen; returns (chunks,
    hf_config, [(site, canonical name)])."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from transformers import AutoConfig

    from dist_peft.integrations import megatron_cpu

    megatron_cpu.apply()
    hf = AutoConfig.from_pretrained(hf_folder)
    layout = Layout.current()
    vp = ps.get_virtual_pipeline_model_parallel_world_size() or 1
    check_layout(hf, layout.tp_size, layout.pp_size, vp)
    ckpt = HFCheckpoint(hf_folder)
    config = transformer_config(hf, layout.tp_size, layout.pp_size, dtype, vp, sequence_parallel, recompute)
    groups_local = hf.num_key_value_heads // layout.tp_size
    chunks, sites = [], []
    for stage in range(vp):  # interleaved: this rank's chunks stage, stage + pp, … of pp × vp
        where = {"ignore_virtual": False, "vp_stage": stage} if vp > 1 else {}
        model = GPTModel(config, layer_specs(config, stage if vp > 1 else None), vocab_size=hf.vocab_size,
                         max_sequence_length=hf.max_position_embeddings,
                         pre_process=ps.is_pipeline_first_stage(**where), post_process=ps.is_pipeline_last_stage(**where),
                         share_embeddings_and_output_weights=hf.tie_word_embeddings,
                         position_embedding_type="rope", **_rope_kwargs(hf),
                         **({"vp_stage": stage} if vp > 1 else {}))
        for layer in model.decoder.layers:
            sites += _replace_sites(layer, layer.layer_number - 1, ckpt, layout, dtype, groups_local, sequence_parallel)
        _load_replicated(model, ckpt, layout, hf, dtype)
        if config.recompute_granularity == "full" and model.pre_process:
            model.embedding.register_forward_hook(_input_needs_grad)
        chunks.append(model.requires_grad_(False))
    return chunks, hf, sites


@torch.no_grad()
def hf_tensors(chunks: list[nn.Module], sites: list[tuple[CanonicalSite, str]], hf: Any,
               layout: Layout) -> Iterator[tuple[str, Tensor]]:
    """This stage's weights one at a time, (HF name, whole tensor on the host), as the base layers hold them
    (merge adapters first for a merged model); TP shards are gathered, a collective over the TP group per tensor,
    so at most one whole tensor is on the device at once. A tied output layer is left out."""
    def whole(t: Tensor, dim: int | None) -> Tensor:
        return (t if dim is None else collectives.all_gather_cat(t.detach(), dim, layout.tp_group)).cpu()

    for site, name in sites:
        part = site.parts[name.rpartition(".")[2]]
        base = part.base_layer if isinstance(part, AdaptedLinear) else part
        yield f"{name}.weight", whole(base.weight, 0 if site.kind is ShardKind.COLUMN else 1)
        if base.bias is not None:
            yield f"{name}.bias", whole(base.bias, 0)
    for chunk in chunks:
        params = dict(chunk.named_parameters())
        for name, (key, dim) in _replicated_sources(chunk, "lm_head.weight").items():
            if not (key == "lm_head.weight" and hf.tie_word_embeddings):
                yield key, whole(params[name], dim)


def attach_adapters(sites: list[tuple[CanonicalSite, str]], method: str, cfg: Any, targets: Iterable[str],
                    seed: int) -> dict[str, AdaptedLinear]:
    """Wrap the targeted projections (by canonical name) in AdaptedLinear with the site's ShardSpec."""
    entry, targets, layout = get_method(method), set(targets), Layout.current()
    chosen = []
    for site, name in sites:
        kind = name.rpartition(".")[2]
        if kind in targets:
            base = site.parts[kind]
            total = list(base.weight.shape)
            total[0 if site.kind is ShardKind.COLUMN else 1] *= layout.tp_size
            chosen.append((site, kind, Site(name, kind, int(name.split(".")[2]), total[0], total[1], base.weight,
                                            base.bias, batch_dim=1)))
    if not chosen:
        raise ValueError(f"target modules {sorted(targets)} match no projection of the megatron model")
    from megatron.core import parallel_state as ps

    specs = {s.name: layout.spec(site.kind) for site, _, s in chosen}
    layer_group = ps.get_pipeline_model_parallel_group() if layout.pp_size > 1 else None
    extra = entry.adapter_cls.prepare([s for _, _, s in chosen], cfg, specs=specs, layer_group=layer_group)
    adapted = {}
    for site, kind, s in chosen:
        with seeded(site_seed(seed, s.name)):
            adapter = entry.adapter_cls(s, specs[s.name], cfg, **extra.get(s.name, {}))
        site.parts[kind] = adapted[s.name] = AdaptedLinear(site.parts[kind], adapter)
    return adapted
