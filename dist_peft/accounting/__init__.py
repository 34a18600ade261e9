"""Accounting: pure functions (no torch.distributed, no timing) for what a model, a layout and a method cost —
parameters, bytes per rank, FLOPs per step and collectives per step. Read by ``dist-peft plan`` and the
throughput profiler; the methods declare their own share beside their math (``Adapter.extra_flops`` …)."""

from dist_peft.accounting.flops import (FlopBreakdown, ParamCounts, attention_flops, executed_flops,
                                        flop_breakdown, model_flops, param_counts, target_sites)
from dist_peft.accounting.shape import MODULE_TYPES, ModelShape

__all__ = ["FlopBreakdown", "MODULE_TYPES", "ModelShape", "ParamCounts", "attention_flops", "executed_flops",
           "flop_breakdown", "model_flops", "param_counts", "target_sites"]
