"""ShardSpec: how one adapted site's frozen weight W (m x n, y = W x) is split across a tensor-parallel group.

* ``replicated``: the rank holds all of W and computes the whole update.
* ``column``: rank k of p holds rows [k m/p, (k+1) m/p) of W (output features) and sees the whole x; its output
  is the k-th slice of y.
* ``row``: rank k holds columns [k n/p, (k+1) n/p) of W (input features) and sees the k-th slice of x; its output
  is a partial sum that the base layer's own all-reduce completes, so an update added there adds no collective.

``group`` is the torch.distributed process group of the split. ``group=None`` with ``size > 1`` describes a
*virtual* shard: one process runs every shard in turn (the tests use this to check the arithmetic of a layout
without processes).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from torch import Tensor


class ShardKind(str, enum.Enum):
    REPLICATED = "replicated"
    COLUMN = "column"
    ROW = "row"


@dataclass(frozen=True)
class ShardSpec:
    kind: ShardKind = ShardKind.REPLICATED
    rank: int = 0
    """This shard's index within the group."""
    size: int = 1
    """Number of shards the split dimension is cut into."""
    group: Any = None
    """Process group of the split; None for single-process or virtual shards."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", ShardKind(self.kind))
        if self.size < 1 or not 0 <= self.rank < self.size:
            raise ValueError(f"ShardSpec needs 0 <= rank < size, got rank={self.rank}, size={self.size}")
        if self.kind is ShardKind.REPLICATED and self.size != 1:
            raise ValueError("a replicated ShardSpec has size 1; column or row splits have size > 1")

    @property
    def weight_dim(self) -> int | None:
        """The dimension of W (m x n) that is split: 0 for column, 1 for row, None when replicated."""
        return {ShardKind.COLUMN: 0, ShardKind.ROW: 1}.get(self.kind)

    def local_range(self, full: int) -> tuple[int, int]:
        """[start, stop) of this shard within a split dimension of length ``full``."""
        if full % self.size:
            raise ValueError(f"dimension {full} is not divisible by the {self.size} shards of a {self.kind.value} split")
        step = full // self.size
        return self.rank * step, (self.rank + 1) * step

    def shard(self, t: Tensor, dim: int) -> Tensor:
        """This shard's slice of a full tensor along ``dim`` (a view)."""
        start, stop = self.local_range(t.shape[dim])
        return t.narrow(dim, start, stop - start)
