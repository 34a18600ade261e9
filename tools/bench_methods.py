"""Step-time benchmark of the adapter methods against the frozen base (the physical floor) and LoRA.

One process builds every configuration on the same random SmolLM2-135M-shaped Llama (hidden 576, 9/3 heads,
intermediate 1536; ``--layers`` of them), then times training steps round-robin (A B C … A B C …) so that
machine noise hits every configuration alike; it reports the median step and its ratios to ``frozen`` and
``lora`` from this one run. Never compare absolute times across runs.

One step = forward + backward + AdamW step + zero_grad on a batch of random tokens with the causal-LM loss.
``frozen`` has no trainable tensor; its embedding output requires grad, so backward still computes every
activation gradient (≈4N FLOPs/token: the floor of any adapter method).

    python tools/bench_methods.py --configs frozen,lora,peft-lora --layers 4 --rounds 10 --threads 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Callable

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from dist_peft.integrations.transformers import CANONICAL_TARGETS, adapted_sites, inject_adapters
from dist_peft.methods.base import Controller, StepContext, get_method

ALL = list(CANONICAL_TARGETS)


def smollm2_shaped(layers: int) -> nn.Module:
    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
                      num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg)


def ours(method: str, **options) -> Callable[[nn.Module], nn.Module]:
    def build(model: nn.Module) -> nn.Module:
        inject_adapters(model, method, get_method(method).config_cls(**options), ALL)
        return model
    return build


def frozen(model: nn.Module) -> nn.Module:
    model.requires_grad_(False)
    model.get_input_embeddings().register_forward_hook(lambda m, i, out: out.requires_grad_(True))
    return model


def peft_lora(model: nn.Module) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=ALL))


CONFIGS: dict[str, Callable[[nn.Module], nn.Module]] = {
    "frozen": frozen,
    "lora": ours("lora", r=16, lora_alpha=32),
    "peft-lora": peft_lora,
    # LoCA with B = FourierFT's n_frequency (1000 coefficients per matrix, plus 2B location parameters):
    # coefficient-only steps (the steady state; alternate_until=0), per path, and with location gradients too.
    "loca-auto": ours("loca", n_frequency=1000, alternate_until=0),
    "loca-spectral": ours("loca", n_frequency=1000, alternate_until=0, path="spectral"),
    "loca-gathered": ours("loca", n_frequency=1000, alternate_until=0, path="gathered"),
    "loca-dense": ours("loca", n_frequency=1000, alternate_until=0, path="dense"),
    "loca-spectral-loc": ours("loca", n_frequency=1000, path="spectral"),
    # FO-LoRA, 2 tasks at LoRA's rank: every sample of task 0 (one plain GEMM), or mixed tasks in every batch
    # (task ids in TASK_IDS: V_t gathered per sample, one batched GEMM).
    "folora": ours("folora", r=16, lora_alpha=32, num_tasks=2),
    "folora-mixed": ours("folora", r=16, lora_alpha=32, num_tasks=2),
    "peft-fourierft": lambda model: __import__("peft").get_peft_model(
        model, __import__("peft").FourierFTConfig(n_frequency=1000, target_modules=ALL)),
    # FRoD at HF PEFT's defaults (s = 0.01, π = 1e-3); ours with its default sides (o_proj, down_proj: output).
    "frod": ours("frod", sparse_rate=0.01),
    "peft-frod": lambda model: __import__("peft").get_peft_model(
        model, __import__("peft").FrodConfig(target_modules=ALL, sparse_rate=0.01, progressbar=False)),
    # OD-LoRA and ScaLoRA do their work in Controller hooks, which every step calls as the Trainer does
    # (OD-LoRA: the switch to the OD form after step 1 of a one-step Phase I, then QR refreshes; ScaLoRA: the
    # transform every I steps).
    "odlora": ours("odlora", r=16, lora_alpha=4, init_rounds=1, init_steps=1),
    "scalora": ours("scalora", r=16, lora_alpha=32),
    "scalora-i10": ours("scalora", r=16, lora_alpha=32, interval=10),
    "scalora-paper": ours("scalora", r=16, lora_alpha=32, solver="paper"),  # the paper's closed form + fallback
}


TASK_IDS = {"folora-mixed": [0, 1]}
"""Per-sample task ids (repeated over the batch) handed to the controller before every step, as the Trainer does."""


class Runner:
    def __init__(self, name: str, layers: int, batch: int, seq: int):
        self.name = name
        self.model = CONFIGS[name](smollm2_shaped(layers)).train()
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.trainable = sum(p.numel() for p in params)
        self.opt = torch.optim.AdamW(params, lr=1e-4) if params else None
        adapters = {name: s.adapter for name, s in adapted_sites(self.model).items()}
        self.controller = next(iter(adapters.values())).controller_cls(adapters) if adapters else Controller({})
        self.done = 0
        self.ids = torch.randint(0, 49152, (batch, seq), generator=torch.Generator().manual_seed(1))
        tasks = TASK_IDS.get(name)
        self.batch = {"input_ids": self.ids} | ({"task_ids": torch.tensor(tasks * batch)[:batch]} if tasks else {})
        self.times: list[float] = []

    def step(self) -> float:
        start = time.perf_counter()
        self.controller.on_batch(self.batch)
        loss = self.model(input_ids=self.ids, labels=self.ids).loss
        loss.backward()
        if self.opt is not None:  # the Trainer's order: hooks around the optimizer step
            ctx = StepContext(self.done, 1e-4, self.opt)
            self.controller.before_optimizer_step(ctx)
            self.opt.step()
            self.controller.after_optimizer_step(ctx)
            self.opt.zero_grad(set_to_none=True)
        self.done += 1
        return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", default="frozen,lora,peft-lora", help=f"comma list of {', '.join(CONFIGS)}")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    names = args.configs.split(",")
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown configs {unknown}; known: {', '.join(CONFIGS)}")
    runners = [Runner(n, args.layers, args.batch, args.seq) for n in names]
    for r in range(args.warmup + args.rounds):
        for runner in runners if r % 2 == 0 else reversed(runners):  # alternate order: no fixed predecessor
            t = runner.step()
            if r >= args.warmup:
                runner.times.append(t)
    med = {r.name: statistics.median(r.times) for r in runners}
    print(f"threads={args.threads} layers={args.layers} batch={args.batch}x{args.seq} rounds={args.rounds} "
          f"(median of interleaved steps; ratios from this run only)")
    print(f"{'config':<22}{'trainable':>12}{'median s':>10}{'/frozen':>9}{'/lora':>8}")
    for r in runners:
        row = f"{r.name:<22}{r.trainable:>12,}{med[r.name]:>10.3f}"
        row += f"{med[r.name] / med['frozen']:>9.2f}" if "frozen" in med else f"{'-':>9}"
        row += f"{med[r.name] / med['lora']:>8.2f}" if "lora" in med else f"{'-':>8}"
        print(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "median_s": med, "trainable": {r.name: r.trainable for r in runners}}, f,
                      indent=2)


if __name__ == "__main__":
    main()
