"""Measurements a compare run takes beside its losses, for the papers' claims (``claims.py``).

- ``GradientCosine``: per step, the mean over sites of cos(G, G̃) (OD-LoRA, specs/odlora.md §4.8): G = ∂L/∂W is the
  full-parameter gradient of the site's weight, summed over the step's micro-batches from each site's input and
  output gradient (one m x n product per site and micro-batch: the cost of a full fine-tuning weight gradient, paid
  only by the entries that measure it), read before the optimizer step; G̃ the equivalent gradient of the factors.
- ``update_ranks``: the numerical rank of W_T − W_0 per site (ScaLoRA: exceeds r once merges accumulate), with
  W_T = the site's weight plus the adapter's current update, W_0 snapshotted before the first step.
Both read the plain (single-model) engine's sites; under megatron or ZeRO-3 the weights are sharded and the
probes report why they were skipped instead.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from dist_peft.integrations.transformers import adapted_sites

RANK_RTOL = 1e-3
"""Singular values below RANK_RTOL · σ_max count as zero: W_T − W_0 is a difference of fp32 weights, whose rounding
(~1e-7 of W) would otherwise show as full rank."""


def unsupported(trainer: Any) -> str | None:
    """Why the probes cannot read whole weights on this engine, or None."""
    if trainer.mg is not None:
        return "sharded by megatron-core"
    if trainer.ds is not None and trainer.cfg.deepspeed.zero_stage == 3:
        return "partitioned by ZeRO-3"
    return None


class GradientCosine:
    """Install on a Trainer before it runs; ``values`` holds one mean cosine per optimizer step."""

    def __init__(self, trainer: Any):
        from dist_peft.methods.odlora import gradient_cosine

        self.values: list[float] = []
        self.sites = adapted_sites(trainer.model)
        self.grads: dict[str, Tensor] = {}
        self.handles = [s.register_forward_hook(self._capture(n)) for n, s in self.sites.items()]
        self.controller = controller = trainer.controller
        self.before = before = controller.before_optimizer_step

        def measure(ctx: Any) -> None:
            cos = [gradient_cosine(s.adapter, self.grads[n]) for n, s in self.sites.items() if n in self.grads]
            if cos:
                self.values.append(sum(cos) / len(cos))
            self.grads.clear()
            before(ctx)

        controller.before_optimizer_step = measure

    def _capture(self, name: str):
        def hook(module: Any, inputs: tuple, output: Tensor) -> None:
            if not torch.is_grad_enabled() or not output.requires_grad:
                return
            x = inputs[0].detach()

            def accumulate(gy: Tensor) -> None:
                g = gy.reshape(-1, gy.shape[-1]).double().mT @ x.reshape(-1, x.shape[-1]).double()
                self.grads[name] = self.grads[name] + g if name in self.grads else g
            output.register_hook(accumulate)
        return hook

    def close(self) -> None:
        """Remove the hooks and give the controller its own step hook back."""
        for h in self.handles:
            h.remove()
        self.controller.before_optimizer_step = self.before


def snapshot_weights(trainer: Any) -> dict[str, Tensor]:
    """W_0 of every adapted site (a CPU copy)."""
    return {n: s.adapter.site.weight.detach().to("cpu", torch.float32, copy=True)
            for n, s in adapted_sites(trainer.model).items()}


@torch.no_grad()
def update_ranks(trainer: Any, w0: dict[str, Tensor]) -> dict[str, int]:
    """rank(W_T − W_0) per site (singular values above RANK_RTOL · σ_max)."""
    out = {}
    for n, s in adapted_sites(trainer.model).items():
        delta = s.adapter.site.weight.detach().float().cpu() + s.adapter.delta_weight().detach().float().cpu() - w0[n]
        sv = torch.linalg.svdvals(delta.double())
        out[n] = int((sv > RANK_RTOL * sv[0]).sum()) if sv.numel() and sv[0] > 0 else 0
    return out
