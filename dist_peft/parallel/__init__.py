"""How a site is split across ranks (``ShardSpec``) and the traced collectives every adapter uses."""

from dist_peft.parallel.shard import ShardKind, ShardSpec

__all__ = ["ShardKind", "ShardSpec"]
