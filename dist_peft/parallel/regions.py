"""The per-token collectives of tensor (and sequence) parallelism, as autograd functions over the traced collectives.

Tensor parallelism:
  copy_to_region(x):       forward identity,        backward all-reduce of dx   (input of a column-parallel linear)
  reduce_from_region(y):   forward all-reduce,      backward identity          (output of a row-parallel linear)
Sequence parallelism (activations outside the linears split along the sequence, dim 0 of megatron's [s, b, h]):
  gather_sequence(x):      forward all-gather,      backward reduce-scatter of dx (input of a column-parallel linear)
  scatter_sequence(y):     forward reduce-scatter,  backward all-gather        (output of a row-parallel linear)

An adapted site calls one of them exactly once, for the base and the adapter together: a column site feeds the
same copied (gathered) input to both, a row site adds the adapter's partial output before the one reduction
(reduce-scatter). So an adapter adds no per-token collective to the frozen model's, and ``collectives.TRACE``
can prove it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from dist_peft.parallel import collectives


class _CopyToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group: Any) -> Tensor:
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad: Tensor):
        return collectives.all_reduce(grad.contiguous(), ctx.group), None


class _ReduceFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y: Tensor, group: Any) -> Tensor:
        return collectives.all_reduce(y.clone(memory_format=torch.contiguous_format), group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


class _GatherSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group: Any) -> Tensor:
        ctx.group = group
        return collectives.all_gather_cat(x, 0, group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return collectives.reduce_scatter(grad, ctx.group), None


class _ScatterSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y: Tensor, group: Any) -> Tensor:
        ctx.group = group
        return collectives.reduce_scatter(y, group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return collectives.all_gather_cat(grad, 0, ctx.group), None


def copy_to_region(x: Tensor, group: Any) -> Tensor:
    return _CopyToRegion.apply(x, group) if collectives.group_size(group) > 1 else x


def reduce_from_region(y: Tensor, group: Any) -> Tensor:
    return _ReduceFromRegion.apply(y, group) if collectives.group_size(group) > 1 else y


def gather_sequence(x: Tensor, group: Any) -> Tensor:
    return _GatherSequence.apply(x, group) if collectives.group_size(group) > 1 else x


def scatter_sequence(y: Tensor, group: Any) -> Tensor:
    return _ScatterSequence.apply(y, group) if collectives.group_size(group) > 1 else y
