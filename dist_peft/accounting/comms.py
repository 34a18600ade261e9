"""The collectives of one optimizer step on one rank and the bytes each moves (the array size S of the op,
nccl-tests' convention; bus bytes follow from the group size, ``bus_bytes``).

With T_mb tokens per micro-batch, m micro-batches per step, a activation bytes, w weight bytes:
  tensor parallel   per decoder layer and micro-batch: forward all-reduce of the attention and MLP outputs,
                    backward all-reduce of the two column-parallel input gradients: 4 × T_mb·h·a (under
                    sequence parallelism the same bytes as all-gather + reduce-scatter pairs); the vocab-parallel
                    loss: 3 all-reduces of T_mb fp32 values; once per step, the adapters' partial gradients (the
                    factors replicated over the split, ``ParamLayout.partial_grad``): 4 bytes each
  pipeline          per micro-batch and stage boundary (× vp chunks): send/recv of T_mb·h·a forward and back
  data parallel     plain / megatron: one coalesced all-reduce of the adapter gradients (4·P_a); ZeRO-1/2:
                    reduce-scatter of the gradients and all-gather of the updated parameters (4·P_a each);
                    ZeRO-3: + per micro-batch an all-gather of every parameter for forward and again for backward
                    (w·P_f + 4·P_a each)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dist_peft.accounting.flops import adapter_class, target_sites
from dist_peft.accounting.memory import Layout
from dist_peft.accounting.shape import ModelShape


@dataclass(frozen=True)
class Collective:
    op: str
    """all_reduce, all_gather, reduce_scatter or send_recv."""
    axis: str
    """tensor, pipeline or data."""
    group: int
    """Ranks in the op's group."""
    count: int
    """Calls per step."""
    bytes_each: int
    """S: the array size of one call."""

    @property
    def bus_bytes(self) -> float:
        """Bytes each rank moves over its links per step."""
        return bus_factor(self.op, self.group) * self.bytes_each * self.count


def bus_factor(op: str, n: int) -> float:
    """nccl-tests' bus-bandwidth factor of ``op`` in a group of ``n`` ranks (doc/PERFORMANCE.md): all-reduce
    2(n − 1)/n; all-gather, reduce-scatter and all-to-all (n − 1)/n of the whole array; 1 otherwise."""
    if op == "all_reduce":
        return 2 * (n - 1) / n
    if op in ("all_gather", "all_gather_object", "reduce_scatter", "all_to_all"):
        return (n - 1) / n
    return 1.0


def _adapter_grads(shape: ModelShape, method: Any, tp: int, layers: int) -> tuple[int, int]:
    """(elements of the adapter gradients on one rank, of which partial sums over the TP group) for ``layers``."""
    if method is None:
        return 0, 0
    cls = adapter_class(method)
    local = partial = 0
    for one, split in zip(target_sites(shape, method.target_modules, 1), target_sites(shape, method.target_modules, tp)):
        whole, mine = cls.trainable_numel(one, method.options), cls.trainable_numel(split, method.options)
        sharded = (whole - mine) * tp // (tp - 1) if tp > 1 else 0  # mine = replicated + sharded / tp
        local += mine * layers
        partial += (whole - sharded) * layers if tp > 1 else 0
    return local, partial


def step_collectives(shape: ModelShape, method: Any, layout: Layout) -> list[Collective]:
    """The collectives of one step on a rank of the first pipeline stage (the last adds the loss's)."""
    lay = layout
    t_mb, m, a = lay.micro_batch * lay.seq_len, lay.grad_accum, lay.act_bytes
    layers = shape.layers // lay.pp
    grads, partial = _adapter_grads(shape, method, lay.tp, layers)
    out: list[Collective] = []
    if lay.tp > 1:
        act = t_mb * shape.hidden * a
        if lay.sequence_parallel:
            out += [Collective("all_gather", "tensor", lay.tp, 4 * layers * m, act),
                    Collective("reduce_scatter", "tensor", lay.tp, 4 * layers * m, act)]
        else:
            out.append(Collective("all_reduce", "tensor", lay.tp, 4 * layers * m, act))
        out.append(Collective("all_reduce", "tensor", lay.tp, 3 * m, 4 * t_mb))
        if partial:
            out.append(Collective("all_reduce", "tensor", lay.tp, 1, 4 * partial))
    if lay.pp > 1:
        out.append(Collective("send_recv", "pipeline", 2, 2 * m * lay.vp, t_mb * shape.hidden * a))
    if lay.dp > 1 and grads:
        if lay.zero == 0:
            out.append(Collective("all_reduce", "data", lay.dp, 1, 4 * grads))
        else:
            out += [Collective("reduce_scatter", "data", lay.dp, 1, 4 * grads),
                    Collective("all_gather", "data", lay.dp, 1, 4 * grads)]
    if lay.zero == 3 and lay.dp > 1:
        frozen = lay.weight_bytes * (shape.param_count() // lay.tp)
        out.append(Collective("all_gather", "data", lay.dp, 2 * m, frozen + 4 * grads))
    return out
