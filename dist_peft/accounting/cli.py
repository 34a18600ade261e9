"""Arguments and command of ``dist-peft plan``:

    dist-peft plan --config FILE --gpus 16 --gpu h100-80gb [--set KEY=VALUE ...] [--search]
    dist-peft plan --model llama-3.1-70b --method lora --targets q_proj,v_proj --r 16 --gpus 8 --gpu h100-80gb \
        --seq 4096 --micro-batch 1 --global-batch 32 [--tp 8 --pp 1 --vp 1 --zero 0 --recompute full --sp] [--search]

Without ``--search`` it plans the one layout (an error naming the reason when it does not fit); with it, every
TP × PP × VP × DP × ZeRO × recompute layout of the GPUs, fitting ones ranked by predicted tokens/s/GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from dist_peft.accounting.memory import GIB


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="a run config (its model needs model.preset or a folder with config.json)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--model", help="a preset of configs/models (without --config)")
    p.add_argument("--method", default="lora")
    p.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
    p.add_argument("--r", type=int, default=16, help="rank of the two-factor methods")
    p.add_argument("--gpus", type=int, required=True)
    p.add_argument("--gpu", default="h100-80gb", help="h100-80gb, h200-141gb, a100-80gb, a100-40gb, l40s-48gb")
    p.add_argument("--peak-tflops", type=float, help="override the GPU's peak (e.g. a CPU's measured matmul rate; "
                   "the efficiency then counts as 1)")
    p.add_argument("--memory-gib", type=float, help="override the GPU's memory")
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--global-batch", type=int, default=None, help="sequences per step (default: micro × dp)")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--vp", type=int, default=1)
    p.add_argument("--zero", type=int, default=0)
    p.add_argument("--sp", action="store_true", help="sequence parallelism")
    p.add_argument("--recompute", choices=("none", "full", "selective"), default="none")
    p.add_argument("--search", action="store_true", help="rank every layout of the GPUs")
    p.add_argument("--top", type=int, default=10, help="--search: layouts to show")


def _flag_config(args: argparse.Namespace) -> dict[str, Any]:
    """A run config equivalent to the flags (validated by the config loader like any file)."""
    if not args.model:
        raise ValueError("plan: give --config FILE or --model PRESET")
    dp = args.gpus // (args.tp * args.pp) if args.gpus % (args.tp * args.pp) == 0 else 1
    accum = (args.global_batch or args.micro_batch * dp) // max(1, args.micro_batch * dp)
    method = {"name": args.method, "target_modules": args.targets.split(",")}
    if args.method in ("lora", "odlora", "scalora", "folora"):
        method["r"] = args.r
    raw = {"model": {"source": f"/weights/{args.model}", "preset": args.model, "dtype": "bfloat16"},
           "method": method, "data": {"source": "synthetic", "seq_len": args.seq},
           "train": {"steps": 1, "micro_batch_size": args.micro_batch, "grad_accum": max(1, accum),
                     "precision": "bf16"}, "output": {"dir": "plan"}}
    if args.tp * args.pp > 1:
        raw["parallel"] = {"tensor": args.tp, "pipeline": args.pp, "virtual_pipeline": args.vp,
                           "sequence_parallel": args.sp}
    if args.zero:
        raw["deepspeed"] = {"zero_stage": args.zero}
    if args.recompute != "none":
        raw["recompute"] = {"granularity": args.recompute}
    return raw


def table(rows: list[dict[str, Any]]) -> str:
    keys = list(rows[0])
    widths = [max(len(str(k)), *(len(str(r[k])) for r in rows)) for k in keys]
    line = lambda vals: "  ".join(str(v).rjust(w) for v, w in zip(vals, widths))  # noqa: E731
    return "\n".join([line(keys)] + [line([r[k] for k in keys]) for r in rows])


def run_command(args: argparse.Namespace, overrides: dict[str, Any]) -> dict[str, Any]:
    from dist_peft.accounting.plan import describe, layout_of, make_plan, plan_rows, search, shape_of
    from dist_peft.accounting.roofline import get_gpu
    from dist_peft.train.config import ConfigError, from_dict, load_config

    try:
        cfg = load_config(args.config, overrides) if args.config else from_dict(_flag_config(args))
        shape, gpu = shape_of(cfg.model), get_gpu(args.gpu)
        if args.peak_tflops:
            gpu = dataclasses.replace(gpu, name=f"{gpu.name} at {args.peak_tflops:g} TFLOP/s",
                                      peak_flops=args.peak_tflops * 1e12, gemm_efficiency=1.0)
        if args.memory_gib:
            gpu = dataclasses.replace(gpu, hbm_bytes=args.memory_gib * GIB)
        layout = layout_of(cfg, args.gpus)
    except ValueError as e:
        raise e if isinstance(e, ConfigError) else ConfigError(str(e)) from None
    if args.search:
        plans = search(shape, cfg.method, args.gpus, gpu, layout.seq_len,
                       layout.micro_batch * layout.grad_accum * layout.dp, layout.micro_batch)
        fitting = [p for p in plans if p.fits]
        rows = [{"tp": p.layout.tp, "pp": p.layout.pp, "vp": p.layout.vp, "dp": p.layout.dp, "zero": p.layout.zero,
                 "sp": int(p.layout.sequence_parallel), "recompute": p.layout.recompute,
                 "peak_gib": round(p.peak_bytes / GIB, 1), "step_s": round(p.step_time, 2),
                 "tok/s/gpu": round(p.tokens_per_s_per_gpu)} for p in fitting[:args.top]]
        if rows:
            print(table(rows))
        return {"layouts": len(plans), "fitting": len(fitting), "best": describe(fitting[0]) if fitting else None,
                "dropped": sorted({q for p in plans if not p.fits for q in p.problems})[:20]}
    plan = make_plan(shape, cfg.method, layout, gpu)
    if plan.stages:
        print(table(plan_rows(plan)))
    if not plan.fits:
        raise ConfigError(f"plan: this layout does not fit: {'; '.join(plan.problems)}")
    return describe(plan)

