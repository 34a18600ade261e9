"""The ``dist-peft profile`` command's options and its run (``dist_peft/cli.py`` registers it).

    dist-peft profile --config FILE [--config FILE2 ...] [--methods lora,loca,...] [--steps N] [--warmup K]
                      [--set KEY=VALUE ...] [--out DIR] [--frozen | --no-frozen] [--trace] [--exact]
                      [--peak-tflops T] [--nvml-interval S] [--overhead ROUNDS]

Several configurations (``--config`` repeated, or ``--methods``: the first config with each named method at
its defaults on the same target modules) are measured interleaved in one process, with the frozen floor first
unless ``--no-frozen``; one configuration alone is profiled without it unless ``--frozen``. Under torchrun every
rank runs the command and rank 0 writes the reports.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from dist_peft.train.config import ConfigError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", action="append", required=True, help="a run config (repeat to compare)")
    p.add_argument("--methods", help="comma list: profile the first config with each of these methods")
    p.add_argument("--steps", type=int, default=10, help="measured steps per configuration (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="unmeasured steps first (default 2)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a key of every config")
    p.add_argument("--out", help="report folder (default: the first config's output.dir/profile)")
    p.add_argument("--frozen", action=argparse.BooleanOptionalAction, default=None,
                   help="also profile the frozen floor (default: when comparing)")
    p.add_argument("--trace", action="store_true", help="write a bounded torch.profiler trace (one configuration)")
    p.add_argument("--trace-ranks", default="0", help="comma list of ranks that trace (default 0)")
    p.add_argument("--exact", action="store_true", help="synchronize at every phase boundary (slower)")
    p.add_argument("--no-saved-tensors", action="store_true", help="skip the saved-for-backward measurement")
    p.add_argument("--peak-tflops", type=float, help="per-device peak for MFU/HFU (default: from the device name)")
    p.add_argument("--nvml-interval", type=float, default=0.2, help="NVML sampling period in s (0: off)")
    p.add_argument("--overhead", type=int, metavar="ROUNDS",
                   help="instead: the profiler's own cost on the first config (plain vs profiled, interleaved)")


def _configs(args: argparse.Namespace, overrides: dict[str, Any]) -> list[tuple[str, Any]]:
    from dist_peft.train.config import from_dict, load_config

    cfgs = [(Path(path).stem, load_config(path, overrides)) for path in args.config]
    if args.methods:
        base = cfgs[0][1].to_dict()
        cfgs = [(m, from_dict({**base, "method": {"name": m, "target_modules": base["method"]["target_modules"]}}))
                for m in args.methods.split(",")]
    names = [n for n, _ in cfgs]
    if len(set(names)) != len(names):
        raise ConfigError(f"profile: configuration names repeat ({', '.join(names)}); give files with distinct names")
    return cfgs


def run_command(args: argparse.Namespace, overrides: dict[str, Any]) -> dict[str, Any]:
    from dist_peft.profile.run import overhead, profile
    from dist_peft.profile.session import Settings

    cfgs = _configs(args, overrides)
    try:
        settings = Settings(steps=args.steps, warmup=args.warmup, exact=args.exact, trace=args.trace,
                            trace_ranks=tuple(int(r) for r in args.trace_ranks.split(",")),
                            saved_tensors=not args.no_saved_tensors, nvml_interval_s=args.nvml_interval,
                            peak_tflops=args.peak_tflops)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if args.overhead:
        return overhead(cfgs[0][1], settings, args.overhead)
    frozen = len(cfgs) > 1 if args.frozen is None else args.frozen
    out = args.out or str(Path(cfgs[0][1].output.dir) / "profile")
    return profile(cfgs, settings, out, frozen=frozen) or {}
