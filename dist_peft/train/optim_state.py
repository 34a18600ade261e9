"""Per-parameter access to an optimizer's state: the one interface methods use to read, rescale or clear Adam
moments, whatever engine holds them.

OD-LoRA clears the state of its factors at its SVD events (specs/odlora.md G7); ScaLoRA rescales the moments of
its factors column by column (specs/scalora.md Lemma 4). Both go through ``OptimizerState``, so a partitioned
optimizer (DeepSpeed ZeRO, Megatron's distributed optimizer) plugs in by implementing ``get``/``set``/``step``/
``clear`` for its own storage; ``TorchOptimizerState`` serves every ``torch.optim`` optimizer that keeps its state
in ``optimizer.state[param]`` (Adam, AdamW, SGD with momentum).

Keys follow torch's Adam: ``exp_avg`` (first moment m), ``exp_avg_sq`` (second moment v), ``max_exp_avg_sq``
(AMSGrad's running max of v) and ``step``.
"""

from __future__ import annotations

import abc
from typing import Iterable, Sequence

import torch
from torch import Tensor

FIRST_MOMENTS = ("exp_avg", "momentum_buffer")
"""State tensors that are linear in past gradients: they scale like the gradient."""
SECOND_MOMENTS = ("exp_avg_sq", "max_exp_avg_sq")
"""State tensors that are quadratic in past gradients: they scale like the gradient squared."""


class OptimizerState(abc.ABC):
    """Read, write and clear one parameter's optimizer state (full-shaped, like the parameter)."""

    @abc.abstractmethod
    def get(self, param: Tensor, key: str) -> Tensor | None:
        """The state tensor ``key`` of ``param`` (None when the optimizer holds none yet)."""

    @abc.abstractmethod
    def set(self, param: Tensor, key: str, value: Tensor) -> None:
        """Overwrite the state tensor ``key`` of ``param`` with ``value`` (same shape)."""

    @abc.abstractmethod
    def step(self, param: Tensor) -> int | None:
        """The number of updates ``param``'s state has seen (None when it has no state)."""

    @abc.abstractmethod
    def clear(self, params: Iterable[Tensor]) -> None:
        """Forget the state of ``params``: moments and step counter restart as for a fresh parameter."""

    def scale_moments_(self, params: Sequence[Tensor], factors: Sequence[Tensor]) -> None:
        """Multiply the first moments of each parameter by its factor and the second moments by the factor²
        (broadcast against the parameter), as if every past gradient had been multiplied by it. Step counters are
        unchanged."""
        for param, factor in zip(params, factors, strict=True):
            for keys, power in ((FIRST_MOMENTS, 1), (SECOND_MOMENTS, 2)):
                for key in keys:
                    t = self.get(param, key)
                    if t is not None:
                        self.set(param, key, t * factor.to(t.dtype) ** power)


class TorchOptimizerState(OptimizerState):
    """``OptimizerState`` of a ``torch.optim.Optimizer`` (state in ``optimizer.state[param]``)."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer

    def get(self, param: Tensor, key: str) -> Tensor | None:
        return self.optimizer.state.get(param, {}).get(key)

    @torch.no_grad()
    def set(self, param: Tensor, key: str, value: Tensor) -> None:
        state = self.optimizer.state[param]
        if key in state and state[key].shape == value.shape:
            state[key].copy_(value)  # in place: the optimizer (and any foreach/fused kernel) keeps its tensor
        else:
            state[key] = value.clone()

    def step(self, param: Tensor) -> int | None:
        value = self.optimizer.state.get(param, {}).get("step")
        return None if value is None else int(value)

    def clear(self, params: Iterable[Tensor]) -> None:
        for p in params:
            self.optimizer.state.pop(p, None)

    @torch.no_grad()
    def scale_moments_(self, params: Sequence[Tensor], factors: Sequence[Tensor]) -> None:
        """In place on the optimizer's own tensors, one multi-tensor multiply per kind of moment (and one for the
        squares). On CUDA a call takes the multi-tensor kernel only if every factor has its moment's shape and
        dtype; one that broadcasts sends the whole call one tensor at a time."""
        for keys, power in ((FIRST_MOMENTS, 1), (SECOND_MOMENTS, 2)):
            for key in keys:
                pairs = [(t, f.to(t.dtype)) for p, f in zip(params, factors, strict=True)
                         if (t := self.get(p, key)) is not None]
                if pairs:
                    moments, scales = (list(c) for c in zip(*pairs))
                    torch._foreach_mul_(moments, torch._foreach_mul(scales, scales) if power == 2 else scales)
