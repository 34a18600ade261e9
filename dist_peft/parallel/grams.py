"""Partial Gram matrices summed over the tensor-parallel split they were computed on: the reduction that the
sign-fixed QR kernels of ops/qr.py take as a ``Reduce`` callable (OD-LoRA's bases, ScaLoRA's solve), so the
kernels stay pure and this layer owns the collective."""

from __future__ import annotations

from typing import Any, Sequence

from torch import Tensor

from dist_peft.parallel import collectives
from dist_peft.parallel.shard import ShardSpec

Partial = tuple[Any, ShardSpec, Tensor]
"""(key naming the logical tensor, the ShardSpec it is split by, this shard's partial sum)."""


def sum_partial_grams(items: Sequence[Partial]) -> None:
    """Sum each partial tensor over its split's process group, in place: one coalesced all-reduce per group,
    whatever the number of layers. A spec without a process group (unsplit, or a virtual shard of a one-process
    test) is left alone: its caller sums virtual shards itself."""
    groups: dict[int, tuple[Any, list[Tensor]]] = {}
    for _, spec, t in items:
        if spec.size > 1 and spec.group is not None:
            groups.setdefault(id(spec.group), (spec.group, []))[1].append(t)
    for group, tensors in groups.values():
        collectives.all_reduce_coalesced(tensors, group)
