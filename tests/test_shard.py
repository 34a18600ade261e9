"""ShardSpec arithmetic and LoRA under virtual column/row shards (tensor parallelism without processes)."""

import pytest
import torch

from dist_peft.methods.lora import LoraAdapter, LoraConfig
from dist_peft.parallel.shard import ShardSpec
from virtual_shards import compare_with_unsplit


@pytest.mark.parametrize("kind", ["column", "row"])
@pytest.mark.parametrize("size", [2, 4])
def test_lora_virtual_shards_reassemble_to_unsplit(kind, size):
    """Column and row shards (2 and 4) give the unsplit LoRA outputs, input gradients and A/B gradients."""
    gen = torch.Generator().manual_seed(3)
    W = torch.randn(24, 16, generator=gen)
    full = {"lora_A": torch.randn(4, 16, generator=gen), "lora_B": torch.randn(24, 4, generator=gen)}
    compare_with_unsplit(LoraAdapter, LoraConfig(r=4, lora_alpha=8), W, full, kind, size)


def test_row_shard_initialisation_slices_the_unsplit_init():
    """Under a row split each shard's A is the matching column block of the unsplit A (same seed)."""
    from dist_peft.methods.base import Site

    W = torch.randn(8, 12)
    torch.manual_seed(0)
    full = LoraAdapter(Site("s", "q_proj", 0, 8, 12, W), ShardSpec(), LoraConfig(r=2))
    for k in range(2):
        torch.manual_seed(0)
        spec = ShardSpec("row", k, 2)
        shard = LoraAdapter(Site("s", "q_proj", 0, 8, 12, spec.shard(W, 1)), spec, LoraConfig(r=2))
        assert torch.equal(shard.lora_A, spec.shard(full.lora_A, 1))


def test_shardspec_rejects_bad_layouts():
    with pytest.raises(ValueError, match="rank"):
        ShardSpec("column", 2, 2)
    with pytest.raises(ValueError, match="replicated"):
        ShardSpec("replicated", 0, 2)
    with pytest.raises(ValueError, match="not divisible"):
        ShardSpec("column", 0, 3).local_range(8)
    with pytest.raises(ValueError):
        ShardSpec("diagonal")
