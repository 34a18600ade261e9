"""Run one adapter under virtual shards in one process: slice W, run every shard's adapter with its ShardSpec,
reassemble, and compare with the unsplit adapter. Reassembly does what tensor parallelism does with real
process groups: column outputs are concatenated and row outputs summed (the base layer's all-reduce); sharded
parameter gradients are concatenated; partial gradients are summed (the per-step all-reduce of replicated
factors); the input gradient is summed for column (the layer's input all-reduce) and concatenated for row."""

from __future__ import annotations

import torch

from dist_peft.methods.base import Site
from dist_peft.parallel.shard import ShardKind, ShardSpec


def _run(adapter_cls, cfg, W, x, g, spec: ShardSpec, full_state, adapter_kwargs=None):
    weight = spec.shard(W, spec.weight_dim) if spec.weight_dim is not None else W
    adapter = adapter_cls(Site("layers.0.q_proj", "q_proj", 0, W.shape[0], W.shape[1], weight), spec, cfg,
                          **(adapter_kwargs or {}))
    adapter.load_full(full_state)
    xs = (spec.shard(x, -1) if spec.kind is ShardKind.ROW else x).detach().clone().requires_grad_(True)
    y = adapter.forward_site(xs, lambda t: t @ weight.T)  # as AdaptedLinear calls it (FRoD's paths)
    (y * (spec.shard(g, -1) if spec.kind is ShardKind.COLUMN else g)).sum().backward()
    return adapter, y.detach(), xs.grad


def compare_with_unsplit(adapter_cls, cfg, W, full_state, kind: str, size: int, tokens: int = 5, atol=1e-5,
                         adapter_kwargs=None):
    """Assert that ``size`` virtual shards of kind ``kind`` reproduce the unsplit outputs and gradients.
    ``adapter_kwargs``: extra constructor arguments given to every shard's adapter alike (the replicated frozen
    per-site data a method's ``prepare`` returns, e.g. FRoD's basis)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, W.shape[1], generator=gen)
    g = torch.randn(tokens, W.shape[0], generator=gen)
    full, y_ref, xg_ref = _run(adapter_cls, cfg, W, x, g, ShardSpec(), full_state, adapter_kwargs)
    shards = [_run(adapter_cls, cfg, W, x, g, ShardSpec(kind, k, size), full_state, adapter_kwargs)
              for k in range(size)]
    column = ShardKind(kind) is ShardKind.COLUMN
    y = torch.cat([s[1] for s in shards], -1) if column else sum(s[1] for s in shards)
    xg = sum(s[2] for s in shards) if column else torch.cat([s[2] for s in shards], -1)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=atol)
    torch.testing.assert_close(xg, xg_ref, rtol=1e-5, atol=atol)
    assert y_ref.abs().max() > 0 and not torch.allclose(y_ref, x @ W.T, atol=1e-4), "the update must be non-zero"
    for name in full.trainable_names:
        layout = shards[0][0].param_layouts()[name]
        grads = [getattr(s[0], name).grad for s in shards]
        if layout.shard_dim is not None:
            got = torch.cat(grads, layout.shard_dim)
        elif layout.partial_grad:
            got = sum(grads)
        else:
            got = grads[0]
            for other in grads[1:]:
                torch.testing.assert_close(other, got, rtol=0, atol=0)
        torch.testing.assert_close(got, getattr(full, name).grad, rtol=1e-5, atol=atol, msg=f"gradient of {name}")
