"""Predicted step time (``dist-peft plan``'s roofline) against the profiler's measured step on this machine.

A benchmark, not a test. The "GPU" of the roofline is this process's device as measured here:
  peak FLOP/s   the rate of a GEMM of the run's own largest shape (micro-batch tokens × hidden by hidden ×
                intermediate, the run's dtype, ``train.threads`` threads), median of ``--probe-reps``; the
                roofline's ``gemm_efficiency`` is then 1 (the measured rate is already an achieved one);
  bandwidth     the median rate of copying a 256 MiB tensor (bytes read + written per second), the HBM term;
  both probed before and after the measured steps, the mean used (their difference shows the machine's drift);
  links         none: one process, no collectives.
The prediction is ``accounting.plan.make_plan`` on ``shape_of(cfg.model)`` and ``layout_of(cfg, 1)``, the same
functions ``dist-peft plan`` runs (no second formula). The measured step is ``dist-peft profile``'s median step
(``profile.run.profile``: every configuration interleaved round by round, warm-up steps first, no saved-tensor
hooks). Printed per configuration: predicted, measured, error = predicted / measured − 1.

    python tools/plan_vs_measured.py --config configs/demo-smollm2-lora.yaml
    python tools/plan_vs_measured.py --smollm2-random --methods lora,frod,loca --seq 64 --steps 5
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from dist_peft.accounting.plan import layout_of, make_plan, shape_of
from dist_peft.accounting.roofline import Gpu
from dist_peft.profile.run import profile
from dist_peft.profile.session import Settings
from dist_peft.train.config import from_dict, load_config

SMOLLM2 = {"vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
           "num_attention_heads": 9, "num_key_value_heads": 3, "tie_word_embeddings": True}
"""SmolLM2-135M's shape at its full 30 layers (random weights: the tiny-llama source)."""
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _median_time(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measured_device(cfg: Any, reps: int) -> Gpu:
    """This CPU as a roofline device: the run's largest GEMM's rate and a large copy's bandwidth."""
    torch.set_num_threads(cfg.train.threads or torch.get_num_threads())
    shape = shape_of(cfg.model)
    dtype = torch.bfloat16 if cfg.model.dtype == "bfloat16" else torch.float32
    tokens = cfg.train.micro_batch_size * cfg.data.seq_len
    x = torch.randn(tokens, shape.hidden, dtype=dtype)
    w = torch.randn(shape.hidden, shape.intermediate, dtype=dtype)
    flops = 2 * tokens * shape.hidden * shape.intermediate / _median_time(lambda: x @ w, reps)
    src = torch.ones(2**26)  # 256 MiB of fp32
    dst = torch.empty_like(src)
    bandwidth = 2 * src.nbytes / _median_time(lambda: dst.copy_(src), reps)
    inf = float("inf")
    return Gpu("this-cpu", flops, 2**50, bandwidth, inf, inf, per_node=1, gemm_efficiency=1.0,
               link_efficiency=1.0, reserved=0)


def predicted_step(cfg: Any, device: Gpu) -> float:
    plan = make_plan(shape_of(cfg.model), cfg.method, layout_of(cfg, 1), device)
    if plan.problems:
        raise SystemExit(f"plan: {'; '.join(plan.problems)}")
    return plan.step_time


def configs(args: argparse.Namespace) -> list[tuple[str, Any]]:
    overrides = {"train.threads": args.threads, "data.seq_len": args.seq, "train.micro_batch_size": args.micro_batch}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if args.smollm2_random:
        raw = {"model": {"source": "tiny-llama", "tiny": SMOLLM2}, "method": {"name": "lora", "r": 8},
               "data": {"source": "synthetic", "seq_len": 64, "synthetic_examples": 256},
               "train": {"steps": 1000, "micro_batch_size": 4, "threads": 1, "progress": False},
               "output": {"dir": tempfile.mkdtemp(prefix="plan-vs-measured-")}}
    else:
        raw = load_config(args.config).to_dict()
        raw["output"]["dir"] = tempfile.mkdtemp(prefix="plan-vs-measured-")
    for dotted, value in overrides.items():
        section, key = dotted.split(".")
        raw[section][key] = value
    methods = args.methods.split(",") if args.methods else [raw["method"]["name"]]
    targets = raw["method"].get("target_modules") or TARGETS
    out = []
    for m in methods:
        method = raw["method"] if m == raw["method"]["name"] else {"name": m}
        out.append((m, from_dict({**raw, "method": {**method, "target_modules": targets}})))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", help="a run config (one process)")
    src.add_argument("--smollm2-random", action="store_true", help="30-layer random SmolLM2 on synthetic data")
    p.add_argument("--methods", help="comma list of methods (default: the config's)")
    p.add_argument("--threads", type=int, help="override train.threads")
    p.add_argument("--seq", type=int, help="override data.seq_len")
    p.add_argument("--micro-batch", type=int, help="override train.micro_batch_size")
    p.add_argument("--steps", type=int, default=5, help="measured steps per configuration (default 5)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--probe-reps", type=int, default=7, help="repetitions of the GEMM and copy probes")
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args()

    cfgs = configs(args)
    before = measured_device(cfgs[0][1], args.probe_reps)
    settings = Settings(steps=args.steps, warmup=args.warmup, saved_tensors=False, nvml_interval_s=0)
    head = profile(cfgs, settings, tempfile.mkdtemp(prefix="plan-vs-measured-profile-"), frozen=False,
                   echo=lambda _m: None)
    after = measured_device(cfgs[0][1], args.probe_reps)  # the probes bracket the steps: their drift shows load
    device = dataclasses.replace(before, peak_flops=(before.peak_flops + after.peak_flops) / 2,
                                 hbm_bandwidth=(before.hbm_bandwidth + after.hbm_bandwidth) / 2)
    predicted = {name: predicted_step(cfg, device) for name, cfg in cfgs}
    measured = {r["name"]: r["median_s"] for r in head["compare"]} if head["compare"] else \
        {cfgs[0][0]: head["step_time_s"]}
    rows = [{"config": name, "predicted_s": round(predicted[name], 4), "measured_s": round(measured[name], 4),
             "error": round(predicted[name] / measured[name] - 1, 4)} for name, _ in cfgs]
    device_row = {"gemm_gflops": [round(d.peak_flops / 1e9, 2) for d in (before, after)],
                  "copy_gb_s": [round(d.hbm_bandwidth / 1e9, 2) for d in (before, after)],
                  "threads": torch.get_num_threads()}
    print(f"device (before, after the steps; the mean is the peak): GEMM {device_row['gemm_gflops']} GFLOP/s, "
          f"copy {device_row['copy_gb_s']} GB/s, {device_row['threads']} thread(s)")
    print(f"{'config':<10} {'predicted s':>12} {'measured s':>11} {'error':>8}")
    for r in rows:
        print(f"{r['config']:<10} {r['predicted_s']:>12.4f} {r['measured_s']:>11.4f} {r['error']:>+8.1%}")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": device_row, "rows": rows,
                                               "settings": dataclasses.asdict(settings)}, indent=1))


if __name__ == "__main__":
    main()
