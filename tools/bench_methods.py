"""Step-time benchmark of the adapter methods against the frozen base (the physical floor) and LoRA: the
profiler's interleaved mode (``dist_peft.profile.interleave``, the one timing harness) on random-weight models.

One process builds every configuration on the same random Llama of one ``--shape``, then times training steps
round-robin (A B C … C B A …) so that machine noise hits every configuration alike, in ``--runs`` runs of which
every second one takes the configurations in reversed order; it reports the median step (all runs), each run's
median, ratios to ``frozen`` and ``lora`` from this one invocation, and the paired ratio to ``frozen`` (``paired``: the
median over rounds of step ÷ the frozen step of the same round). Never compare absolute times across runs.

Shapes (``SHAPES``): ``smollm2`` is SmolLM2-135M at its full 30 layers (hidden 576, 9/3 heads, intermediate
1536, vocab 49152; ``--layers`` for quick looks only: at a few layers the 49152×576 head dominates); the
width-true ``llama8b`` (Llama-3.1-8B's layers: hidden 4096, intermediate 14336, 32/8 heads of 128) and
``llama70b-tp8`` (the per-rank slice of Llama-3.1-70B under TP8: hidden 8192, 8/1 heads of 128, intermediate
3584 — the matrices one rank multiplies) run 2 layers with a 1024-token vocabulary, so the layers dominate.

One step = forward + backward + AdamW step + zero_grad on a batch of random tokens with the causal-LM loss, the
controller hooks called as the Trainer calls them. ``frozen`` has no trainable tensor; its embedding output
requires grad, so backward still computes every activation gradient (≈4N FLOPs/token: the floor of any adapter
method). Beside time, each configuration's memory (one extra untimed step: bytes saved for backward, and the peak
bytes allocated in the step and live at once: activations, gradients and temporaries; ``allocation_peak``, since
in one process every model is resident and the heap keeps freed memory, so a peak RSS is the same for all) and
FLOP floor (executed FLOPs with the method's declared extra work ÷ the frozen model's,
``dist_peft.accounting``: the ratio its extra FLOPs alone would give).

    python tools/bench_methods.py --configs frozen,lora,peft-lora --rounds 8 --threads 2 --json out.json
    python tools/bench_methods.py --shape llama8b --seq 64 --configs frozen,lora,loca-auto,frod
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from dist_peft.integrations.transformers import CANONICAL_TARGETS, adapted_sites, inject_adapters
from dist_peft.methods.base import Controller, StepContext, get_method
from dist_peft.profile.interleave import interleave, paired_ratio
from dist_peft.profile.memory import SavedTensorMeter, allocation_peak

ALL = list(CANONICAL_TARGETS)


SHAPES = {  # name: LlamaConfig keys (num_hidden_layers: the default depth)
    "smollm2": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True),
    "llama8b": dict(vocab_size=1024, hidden_size=4096, intermediate_size=14336, num_hidden_layers=2,
                    num_attention_heads=32, num_key_value_heads=8, head_dim=128),
    "llama70b-tp8": dict(vocab_size=1024, hidden_size=8192, intermediate_size=28672 // 8, num_hidden_layers=2,
                         num_attention_heads=64 // 8, num_key_value_heads=8 // 8, head_dim=128),
}


def shaped(shape: str, layers: int | None = None) -> nn.Module:
    """A random Llama of ``SHAPES[shape]`` with ``layers`` decoder layers (None: the shape's default)."""
    keys = SHAPES[shape] | ({"num_hidden_layers": layers} if layers else {})
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**keys))


def smollm2_shaped(layers: int) -> nn.Module:
    return shaped("smollm2", layers)


def ours(method: str, targets: tuple[str, ...] = tuple(ALL), **options) -> Callable[[nn.Module], nn.Module]:
    def build(model: nn.Module) -> nn.Module:
        inject_adapters(model, method, get_method(method).config_cls(**options), list(targets))
        return model
    build.method = (method, options, targets)  # for the FLOP floor (flop_floor)
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
    # FRoD at HF PEFT's defaults (s = 0.01, π = 1e-3); ours with its default sides (o_proj, down_proj: output),
    # path auto (per site, from the tokens) and each path forced.
    "frod": ours("frod", sparse_rate=0.01),
    "frod-transform": ours("frod", sparse_rate=0.01, path="transform"),
    "frod-merged": ours("frod", sparse_rate=0.01, path="merged"),
    # Width-true shapes run 2 layers: k/v's stacked input-side HJD then has rank L·rows < hidden (2·1024 < 4096 at
    # llama8b), which FRoD refuses; this one adapts the other five projections (as tools/bench_distributed.sh).
    "frod-5": ours("frod", targets=("q_proj", "o_proj", "gate_proj", "up_proj", "down_proj"), sparse_rate=0.01),
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
    """One configuration's model, optimizer and controller; ``step()`` runs and times one training step."""

    def __init__(self, name: str, layers: int | None, batch: int, seq: int, shape: str = "smollm2"):
        self.name = name
        self.model = CONFIGS[name](shaped(shape, layers)).train()
        vocab = self.model.config.vocab_size
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.trainable = sum(p.numel() for p in params)
        self.opt = torch.optim.AdamW(params, lr=1e-4) if params else None
        adapters = {name: s.adapter for name, s in adapted_sites(self.model).items()}
        self.controller = next(iter(adapters.values())).controller_cls(adapters) if adapters else Controller({})
        self.done = 0
        self.ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(1))
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


    def memory(self) -> dict[str, int]:
        """One untimed step: peak bytes saved for backward (parameters excluded) and the peak bytes allocated in
        the step and live at once (``allocation_peak``; the optimizer's state, made by the first step, is held
        from before: trainable × 8 B)."""
        meter = SavedTensorMeter(exclude=list(self.model.parameters()))
        with meter.measuring():
            peak = allocation_peak(self.step)
        return {"saved_for_backward": meter.peak, "step_peak": peak}


def flop_floor(name: str, model: nn.Module, batch: int, seq: int) -> float | None:
    """Executed FLOPs of a step of ``name`` ÷ the frozen model's (accounting: 4N + attention + the method's
    declared extra work); 1 for ``frozen``, None for configurations that are not ours."""
    from dist_peft.accounting import ModelShape, executed_flops
    from dist_peft.train.config import MethodConfig

    if name == "frozen":
        return 1.0
    spec = getattr(CONFIGS[name], "method", None)
    if spec is None:
        return None
    method = MethodConfig(name=spec[0], target_modules=spec[2], options=get_method(spec[0]).config_cls(**spec[1]))
    shape = ModelShape.from_hf(model.config)
    return executed_flops(shape, batch * seq, seq, method) / executed_flops(shape, batch * seq, seq)


def measure(runners: list[Runner], warmup: int, rounds: int, runs: int = 2) -> list[dict[str, float]]:
    """``runs`` interleaved runs (``interleave``), every second one over the reversed list; each runner's
    ``times`` collects every measured step; returns each run's medians by name."""
    medians = []
    for run in range(runs):
        order = runners if run % 2 == 0 else runners[::-1]
        start = {r.name: len(r.times) for r in runners}

        def step(runner: Runner, measured: bool) -> None:
            t = runner.step()
            if measured:
                runner.times.append(t)
        interleave(order, warmup, rounds, step)
        medians.append({r.name: statistics.median(r.times[start[r.name]:]) for r in runners})
    return medians


def paired(runners: list[Runner], base: str = "frozen") -> dict[str, float]:
    """Each runner's ``paired_ratio`` to ``base`` over all measured rounds (every runner steps once per round)."""
    ref = next(r for r in runners if r.name == base).times
    return {r.name: paired_ratio(r.times, ref) for r in runners}


def _table(args: argparse.Namespace, runners: list[Runner], med: dict, runs: list, extra: dict) -> None:
    print(f"shape={args.shape} threads={args.threads} layers={runners[0].model.config.num_hidden_layers} "
          f"batch={args.batch}x{args.seq} rounds={args.rounds} runs={args.runs} (median of interleaved steps; "
          f"ratios from this invocation only)")
    print(f"{'config':<20}{'trainable':>12}{'median s':>10}{'/frozen':>9}{'/lora':>8}"
          + "".join(f"{f'run{i + 1}/fr':>10}" for i in range(len(runs)))
          + f"{'paired/fr':>11}{'floor':>8}{'saved MiB':>11}{'peak MiB':>10}")
    for r in runners:
        row = f"{r.name:<20}{r.trainable:>12,}{med[r.name]:>10.3f}"
        row += f"{med[r.name] / med['frozen']:>9.2f}" if "frozen" in med else f"{'-':>9}"
        row += f"{med[r.name] / med['lora']:>8.2f}" if "lora" in med else f"{'-':>8}"
        row += "".join(f"{m[r.name] / m['frozen']:>10.2f}" if "frozen" in m else f"{'-':>10}" for m in runs)
        row += f"{extra['paired'][r.name]:>11.3f}" if extra["paired"] else f"{'-':>11}"
        floor, mem = extra["flop_floor"][r.name], extra["memory"][r.name]
        row += f"{'-' if floor is None else f'{floor:.3f}':>8}{mem['saved_for_backward'] / 2**20:>11.1f}"
        print(row + f"{mem['step_peak'] / 2**20:>10.1f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", default="frozen,lora,peft-lora", help=f"comma list of {', '.join(CONFIGS)}")
    p.add_argument("--shape", default="smollm2", choices=list(SHAPES))
    p.add_argument("--layers", type=int, help="decoder layers (default: the shape's; smollm2 30)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=10, help="measured rounds per run")
    p.add_argument("--runs", type=int, default=2, help="interleaved runs, every second one in reversed order")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    names = args.configs.split(",")
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown configs {unknown}; known: {', '.join(CONFIGS)}")
    runners = [Runner(n, args.layers, args.batch, args.seq, args.shape) for n in names]
    runs = measure(runners, args.warmup, args.rounds, args.runs)
    med = {r.name: statistics.median(r.times) for r in runners}
    extra = {"paired": paired(runners) if "frozen" in names else {}, "times": {r.name: r.times for r in runners},
             "memory": {r.name: r.memory() for r in runners},
             "flop_floor": {r.name: flop_floor(r.name, r.model, args.batch, args.seq) for r in runners}}
    _table(args, runners, med, runs, extra)
    if args.json:
        from dist_peft.profile.report import atomic_write

        atomic_write(Path(args.json), json.dumps({"args": vars(args), "median_s": med, "runs": runs,
                                                  "trainable": {r.name: r.trainable for r in runners}, **extra},
                                                 indent=2) + "\n")


if __name__ == "__main__":
    main()
