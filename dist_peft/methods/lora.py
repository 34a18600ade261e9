"""LoRA — Hu et al., arXiv:2106.09685; rsLoRA — Kalajdzievski, arXiv:2312.03732. One frozen linear W (m x n).

    y = W x + s · B (A · dropout(x)),   A: r x n,  B: m x r                                   (Eq. 3)
    s = lora_alpha / r   (rsLoRA: s = lora_alpha / sqrt(r))

Init as in HF PEFT (``init_lora_weights=True``): A ~ Kaiming-uniform(a=√5), B = 0, so ΔW = 0 at step 0.
Field names follow HF PEFT's ``LoraConfig`` so that adapter files load in ``peft.PeftModel``.

Sharding (the base layout is mirrored, never inferred):
  column: B holds the local rows of m; A is replicated and its gradient is a partial sum over the group.
  row:    A holds the local columns of n and sees the local slice of x; B is replicated, its gradient is a
          partial sum, and the output is a partial sum that the base layer's all-reduce completes.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dist_peft.methods.base import Adapter, ParamLayout, Site, SiteShape, register_method
from dist_peft.parallel.shard import ShardKind, ShardSpec


@dataclass(frozen=True, kw_only=True)
class LoraConfig:
    r: int = 8
    """Rank r of the update."""
    lora_alpha: float = 16.0
    """Numerator of the scale s."""
    lora_dropout: float = 0.0
    """Dropout probability on the adapter's input (the base path never sees it)."""
    use_rslora: bool = False
    """Scale by lora_alpha / sqrt(r) instead of lora_alpha / r (rsLoRA)."""

    def __post_init__(self) -> None:
        if self.r <= 0:
            raise ValueError(f"r: must be a positive integer, got {self.r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout: must be in [0, 1), got {self.lora_dropout}")

    @property
    def scale(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


def add_product(base_out: Tensor, z: Tensor, b: Tensor, scale: float) -> Tensor:
    """base_out + scale · z Bᵀ (z: (..., r), B: m x r) as one ``addmm`` over the flattened tokens. Decision: the
    GEMM adds into the base output and applies the scale, so neither costs a pass over the T x m output (the
    written-out ``base_out + s * F.linear(z, B)`` makes two in forward and one in backward, scaling the output
    gradient); s then scales only the T x r and r x m products of the backward."""
    out = torch.addmm(base_out.reshape(-1, base_out.shape[-1]), z.reshape(-1, z.shape[-1]), b.T, alpha=scale)
    return out.view(base_out.shape)


@register_method("lora", LoraConfig)
class LoraAdapter(Adapter):
    trainable_names = ("lora_A", "lora_B")
    size_knob = "r"
    file_keys = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight"}

    def __init__(self, site: Site, spec: ShardSpec, cfg: LoraConfig):
        super().__init__(site, spec, cfg)
        m, n = site.weight.shape  # local shard shape
        kw = {"device": site.weight.device, "dtype": torch.float32}
        self.lora_A = nn.Parameter(torch.empty(cfg.r, n, **kw))
        self.lora_B = nn.Parameter(torch.zeros(m, cfg.r, **kw))
        self.dropout = nn.Dropout(cfg.lora_dropout) if cfg.lora_dropout > 0 else nn.Identity()
        self.scale = cfg.scale
        # Decision: initialise the *full* A and slice it, so a row-split A equals the unsplit A's columns.
        full_a = torch.empty(cfg.r, site.in_features, **kw)
        nn.init.kaiming_uniform_(full_a, a=math.sqrt(5))
        with torch.no_grad():
            self.lora_A.copy_(spec.shard(full_a, 1) if spec.kind is ShardKind.ROW else full_a)

    def forward(self, x: Tensor, base_out: Tensor) -> Tensor:
        z = F.linear(self.dropout(x), self.lora_A.to(x.dtype))
        return add_product(base_out, z, self.lora_B.to(x.dtype), self.scale)

    def delta_weight(self) -> Tensor:
        return self.scale * (self.lora_B @ self.lora_A)

    def param_layouts(self) -> dict[str, ParamLayout]:
        kind = self.spec.kind
        return {
            "lora_A": ParamLayout(1 if kind is ShardKind.ROW else None, kind is ShardKind.COLUMN),
            "lora_B": ParamLayout(0 if kind is ShardKind.COLUMN else None, kind is ShardKind.ROW),
        }

    @classmethod
    def trainable_numel(cls, shape: SiteShape, cfg: LoraConfig) -> int:
        """A (r x n_local) and B (m_local x r); the update's FLOPs are the base class's two-factor default."""
        return cfg.r * (shape.n_local + shape.m_local)

    @classmethod
    def saved_bytes(cls, shape: SiteShape, cfg: LoraConfig, act_bytes: int) -> int:
        """The r-wide product A x, which B's gradient needs."""
        return act_bytes * cfg.r

    @staticmethod
    def peft_config(cfg: LoraConfig, target_modules: list[str]) -> dict[str, Any]:
        """The ``adapter_config.json`` fields HF PEFT needs to load this adapter as a LoRA."""
        return {"peft_type": "LORA", "target_modules": sorted(target_modules), "bias": "none",
                "fan_in_fan_out": False, "init_lora_weights": True, **asdict(cfg)}

    @staticmethod
    def config_from_peft(d: Mapping[str, Any]) -> LoraConfig:
        """Read an HF PEFT LoRA ``adapter_config.json`` (so files trained with peft load here too)."""
        if d.get("peft_type") != "LORA":
            raise ValueError(f"not a LoRA adapter config (peft_type={d.get('peft_type')!r})")
        unsupported = {k: d[k] for k in ("use_dora", "fan_in_fan_out") if d.get(k)}
        if d.get("bias", "none") != "none":
            unsupported["bias"] = d["bias"]
        if unsupported:
            raise ValueError(f"HF PEFT LoRA options not supported by dist_peft: {unsupported}")
        return LoraConfig(r=d["r"], lora_alpha=d["lora_alpha"], lora_dropout=d.get("lora_dropout", 0.0),
                          use_rslora=d.get("use_rslora", False))
