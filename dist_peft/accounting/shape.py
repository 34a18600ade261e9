"""The shape of a Llama-family decoder (Llama, Mistral, Qwen2: GQA, SwiGLU, RMSNorm, RoPE) and its parameter
counts, from the fields of a Hugging Face ``config.json`` alone (no tensors, no torch).

Symbols (Megatron's): h hidden, f intermediate (ffn), L layers, n attention heads, g key-value heads (query
groups), d head_dim (kv_channels; Mistral-Nemo's 128 ≠ h / n), V vocab.

Per decoder layer: q_proj h → n·d, k_proj and v_proj h → g·d, o_proj n·d → h, gate_proj and up_proj h → f,
down_proj f → h, two RMSNorm weights (h each); q/k/v biases where the model has them (Qwen2 always; Llama and
Mistral with ``attention_bias``, Llama's o_proj too), MLP biases with Llama's ``mlp_bias``. Outside the layers:
the embedding V·h, the final norm h and the output head V·h unless tied.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from dist_peft.parallel.shard import ShardKind

MODULE_TYPES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""The canonical linear sites of a decoder layer, in layer order."""

ROW_PARALLEL = ("o_proj", "down_proj")
"""Megatron's row-parallel sites (input features split); the others are column-parallel (output features split)."""

MODEL_TYPES = ("llama", "mistral", "qwen2")


@dataclass(frozen=True)
class ModelShape:
    model_type: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tie_embeddings: bool = False
    qkv_bias: bool = False
    """q/k/v projections carry biases (Qwen2: fixed by the model type; Llama/Mistral: ``attention_bias``)."""
    o_bias: bool = False
    """o_proj carries a bias (Llama with ``attention_bias``)."""
    mlp_bias: bool = False
    """gate/up/down carry biases (Llama's ``mlp_bias``)."""

    def __post_init__(self) -> None:
        for name in ("hidden", "intermediate", "layers", "heads", "kv_heads", "head_dim", "vocab"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be > 0, got {getattr(self, name)}")
        if self.heads % self.kv_heads:
            raise ValueError(f"heads {self.heads} is not a multiple of kv_heads {self.kv_heads}")

    @staticmethod
    def from_hf(config: Mapping[str, Any] | Any) -> "ModelShape":
        """From a ``config.json`` mapping or a transformers ``PretrainedConfig``."""
        get = config.get if isinstance(config, Mapping) else (lambda k, default=None: getattr(config, k, default))
        model_type = get("model_type")
        if model_type not in MODEL_TYPES:
            raise ValueError(f"model_type {model_type!r} is not one of {', '.join(MODEL_TYPES)}")
        heads = get("num_attention_heads")
        attention_bias = bool(get("attention_bias", False))
        return ModelShape(
            model_type=model_type, hidden=get("hidden_size"), intermediate=get("intermediate_size"),
            layers=get("num_hidden_layers"), heads=heads, kv_heads=get("num_key_value_heads", None) or heads,
            head_dim=get("head_dim", None) or get("hidden_size") // heads, vocab=get("vocab_size"),
            tie_embeddings=bool(get("tie_word_embeddings", False)),
            # Decision: transformers' Qwen2 builds q/k/v with bias=True whatever the config says; Mistral ignores
            # attention_bias; Llama applies it to q/k/v/o.
            qkv_bias=model_type == "qwen2" or (model_type == "llama" and attention_bias),
            o_bias=model_type == "llama" and attention_bias,
            mlp_bias=model_type == "llama" and bool(get("mlp_bias", False)))

    def site_dims(self) -> dict[str, tuple[int, int]]:
        """(m, n) = (out, in) features of each canonical site, global."""
        h, f, q, kv = self.hidden, self.intermediate, self.heads * self.head_dim, self.kv_heads * self.head_dim
        return {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q),
                "gate_proj": (f, h), "up_proj": (f, h), "down_proj": (h, f)}

    def layer_biases(self) -> int:
        h, f, q, kv = self.hidden, self.intermediate, self.heads * self.head_dim, self.kv_heads * self.head_dim
        return (q + 2 * kv) * self.qkv_bias + h * self.o_bias + (2 * f + h) * self.mlp_bias

    def layer_params(self) -> int:
        """Parameters of one decoder layer: the seven projections, their biases and two norms."""
        return sum(m * n for m, n in self.site_dims().values()) + self.layer_biases() + 2 * self.hidden

    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    def head_params(self) -> int:
        """The output head's own parameters (0 when tied to the embedding)."""
        return 0 if self.tie_embeddings else self.vocab * self.hidden

    def param_count(self) -> int:
        """All parameters, as ``sum(p.numel() for p in model.parameters())`` of the HF CausalLM counts them."""
        return self.embedding_params() + self.layers * self.layer_params() + self.hidden + self.head_params()

    def matmul_params(self) -> int:
        """Weights that take part in a GEMM per token: the projections and the head (tied or not), not the
        embedding lookup, norms or biases."""
        return self.layers * sum(m * n for m, n in self.site_dims().values()) + self.vocab * self.hidden


def site_kind(module_type: str, tp: int) -> ShardKind:
    """How megatron splits a site over ``tp`` ranks (replicated when tp is 1)."""
    if tp == 1:
        return ShardKind.REPLICATED
    return ShardKind.ROW if module_type in ROW_PARALLEL else ShardKind.COLUMN
