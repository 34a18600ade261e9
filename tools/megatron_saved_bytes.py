"""Planned against measured bytes saved for backward under the megatron-core engine, at any width (issue 12).

The suite's check (tests/test_megatron.py::test_planned_activation_bytes_match_saved_tensors) runs tiny fp32
shapes; this runs the same configs (the suite's ``_cfg``: synthetic data, LoRA on all seven projections, 2
micro-batches per step) at a width given on the command line, one step per variant, and prints per rank the peak
of the saved-tensor meter against the plan's activations and saved log-softmax. A benchmark, not a
test: real widths take minutes and gigabytes here. Llama-3.1-70B's widths at TP2 (the issue's row):

    python tools/megatron_saved_bytes.py --world 2 --layout 2,1,1 --dtype bfloat16 --seq 32 \\
        --model '{"hidden_size": 8192, "intermediate_size": 28672, "num_attention_heads": 64,
                  "num_key_value_heads": 8, "vocab_size": 512, "num_hidden_layers": 2}'
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

VARIANTS = {
    "plain": {},
    "sp": {"parallel": {"sequence_parallel": True}},
    "full": {"recompute": {"granularity": "full"}},
    "sp-full": {"parallel": {"sequence_parallel": True}, "recompute": {"granularity": "full"}},
    "selective": {"recompute": {"granularity": "selective"}},
}


def measure(run_dir: str, variants: list[str], method: str, layout: tuple, ranks: int, model: dict | None,
            seq: int | None, dtype: str) -> dict:
    """Per variant on this rank: the meter's peak and the plan's bytes saved for backward for its stage (the
    suite's own helpers, tests/accounting_checks.py)."""
    from accounting_checks import planned_saved_bytes, record_saved_bytes
    from distributed import release_model_parallel
    from test_megatron import _cfg

    from dist_peft.train.loop import Trainer

    out = {}
    for variant in variants:
        extra = {**VARIANTS[variant], "train": {"steps": 1}, "model": {"dtype": dtype, **({"tiny": model} if model
                                                                                            else {})}}
        if seq:
            extra["data"] = {"seq_len": seq}
        cfg = _cfg(f"{run_dir}/{variant}", method, layout, model["num_hidden_layers"] if model else 2, extra)
        trainer = Trainer(cfg, echo=lambda m: None)
        saved = record_saved_bytes(trainer.mg)
        trainer.run()
        pp_rank = trainer.mg.layout.pp_rank
        out[variant] = {"measured": saved["peak"], "planned": planned_saved_bytes(cfg, ranks, pp_rank),
                        "pp": pp_rank, "tp": trainer.mg.layout.tp_rank}
        release_model_parallel()
    return out


def main() -> None:
    from distributed import run_dist

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default="plain,sp,full,sp-full", help=f"of {', '.join(VARIANTS)}")
    parser.add_argument("--method", default="lora")
    parser.add_argument("--world", type=int, default=4)
    parser.add_argument("--layout", default="2,2,1", help="tensor,pipeline,virtual pipeline")
    parser.add_argument("--model", default=None, help="the tiny model's fields (JSON): the widths to measure")
    parser.add_argument("--seq", type=int, default=None)
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    variants, layout = args.variants.split(","), tuple(int(v) for v in args.layout.split(","))
    results = run_dist(measure, args.world, run_dir=tempfile.mkdtemp(), variants=variants, method=args.method,
                       layout=layout, ranks=args.world, model=json.loads(args.model) if args.model else None,
                       seq=args.seq, dtype=args.dtype)
    print("| variant | rank (pp, tp) | measured MiB | planned MiB | error |\n|---|---|---|---|---|")
    for variant in variants:
        for rank, r in sorted(results.items()):
            got = r[variant]
            print(f"| {variant} | {rank} ({got['pp']}, {got['tp']}) | {got['measured'] / 2**20:.2f} | "
                  f"{got['planned'] / 2**20:.2f} | {got['planned'] / got['measured'] - 1:+.1%} |")


if __name__ == "__main__":
    main()
