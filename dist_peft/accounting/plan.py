"""``dist-peft plan``: the bytes, FLOPs, collectives and predicted step time of a run on a cluster that need not
exist, a search over layouts, and the fit check ``train`` runs before any weight is read."""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from typing import Any

from dist_peft.accounting.comms import Collective, step_collectives
from dist_peft.accounting.flops import adapter_class, executed_flops, flop_breakdown, model_flops, target_sites
from dist_peft.accounting.memory import GIB, Layout, StageMemory, stage_memory
from dist_peft.accounting.roofline import Gpu, link_bandwidth
from dist_peft.accounting.shape import ModelShape


@dataclass
class Plan:
    layout: Layout
    stages: list[StageMemory]
    model_flops: int
    """Per step, whole model (Megatron's formula: MFU's numerator)."""
    executed_flops: int
    """Per step, whole model (what runs: HFU's numerator)."""
    collectives: list[Collective]
    step_time: float
    tokens_per_s_per_gpu: float
    problems: list[str] = field(default_factory=list)
    """Why the layout cannot run or does not fit; empty when it fits."""
    width_costs: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return not self.problems

    @property
    def peak_bytes(self) -> int:
        return max(s.total for s in self.stages) if self.stages else 0


def layout_problems(shape: ModelShape, layout: Layout) -> list[str]:
    """What the engines refuse for this layout (the same conditions as integrations.megatron.check_layout)."""
    tp, pp, vp = layout.tp, layout.pp, layout.vp
    out = [f"num_key_value_heads {shape.kv_heads} % tensor {tp}" if shape.kv_heads % tp else "",
           f"num_attention_heads {shape.heads} % tensor {tp}" if shape.heads % tp else "",
           f"intermediate_size {shape.intermediate} % tensor {tp}" if shape.intermediate % tp else "",
           f"vocab_size {shape.vocab} % tensor {tp}" if shape.vocab % tp else "",
           f"num_hidden_layers {shape.layers} % (pipeline {pp} × virtual_pipeline {vp})"
           if shape.layers % (pp * vp) else "",
           f"grad_accum {layout.grad_accum} % pipeline {pp} (interleaved schedule)"
           if vp > 1 and layout.grad_accum % pp else "",
           "ZeRO with tensor/pipeline parallelism (the megatron engine has no ZeRO)"
           if layout.zero and tp * pp > 1 else "",
           "sequence_parallel needs tensor > 1" if layout.sequence_parallel and tp == 1 else "",
           "selective recompute is megatron-core's (tensor or pipeline > 1)"
           if layout.recompute == "selective" and tp * pp == 1 else ""]
    return [p for p in out if p]


def make_plan(shape: ModelShape, method: Any, layout: Layout, gpu: Gpu) -> Plan:
    problems = layout_problems(shape, layout)
    stages = [] if problems else stage_memory(shape, method, layout)
    tokens = layout.micro_batch * layout.seq_len * layout.grad_accum * layout.dp
    recompute = None if layout.recompute == "none" else dataclasses.make_dataclass(
        "R", ["granularity", "method", "num_layers"])(layout.recompute, "uniform", None)
    plan = Plan(layout, stages, model_flops(shape, tokens, layout.seq_len),
                executed_flops(shape, layout.micro_batch * layout.seq_len, layout.seq_len, method, recompute, layout.pp,
                               layout.tp, layout.grad_accum * layout.dp, layout.dp),
                [] if problems else step_collectives(shape, method, layout), 0.0, 0.0, problems)
    for s in stages:
        if s.total > gpu.usable_bytes:
            plan.problems.append(f"stage {s.stage} needs {s.total / GIB:.1f} GiB per rank > {gpu.usable_bytes / GIB:.1f}"
                                 f" GiB usable on {gpu.name} ({_largest(s)})")
    if method is not None:
        cls = adapter_class(method)
        for site in target_sites(shape, method.target_modules, layout.tp, layout.weight_bytes):
            plan.width_costs += cls.width_costs(site, method.options)
    if not problems:
        plan.step_time = step_time(shape, method, layout, gpu, recompute, plan.collectives)
        plan.tokens_per_s_per_gpu = tokens / plan.step_time / layout.world
    return plan


def _largest(s: StageMemory) -> str:
    parts = {k: getattr(s, k) for k in ("frozen", "gathered", "adapters", "gradients", "optimizer", "buffers",
                                         "activations", "logits")}
    return ", ".join(f"{k} {v / GIB:.1f}" for k, v in sorted(parts.items(), key=lambda kv: -kv[1])[:3])


def step_time(shape: ModelShape, method: Any, layout: Layout, gpu: Gpu, recompute: Any,
              collectives: list[Collective]) -> float:
    """The roofline of ``roofline.py`` for one optimizer step."""
    lay = layout
    t_mb = lay.micro_batch * lay.seq_len
    fb = flop_breakdown(shape, t_mb, lay.seq_len, method, recompute, lay.pp, lay.tp)
    per_rank = lay.tp * lay.pp
    compute = (fb.total - fb.between_steps) / per_rank / (gpu.peak_flops * gpu.gemm_efficiency)
    reads = (3 if lay.recompute == "full" else 2) * lay.weight_bytes * shape.matmul_params() / per_rank
    micro = max(compute, reads / gpu.hbm_bandwidth)
    comm = {"tensor": 0.0, "pipeline": 0.0, "data": 0.0}
    for c in collectives:
        comm[c.axis] += c.bus_bytes / link_bandwidth(gpu, c.axis, lay.tp, lay.pp, lay.world)
    m = lay.grad_accum
    pipeline = (micro * m + comm["tensor"] + comm["pipeline"]) * (1 + (lay.pp - 1) / (lay.vp * m))
    between = fb.between_steps / per_rank / (gpu.peak_flops * gpu.gemm_efficiency)
    data = comm["data"] if lay.zero < 3 else max(0.0, comm["data"] - micro * m)
    return pipeline + data + between


def search(shape: ModelShape, method: Any, gpus: int, gpu: Gpu, seq_len: int, global_batch: int,
           micro_batch: int = 1, sequence_parallel: bool | None = None) -> list[Plan]:
    """Every TP × PP × VP × DP × ZeRO × recompute layout of ``gpus`` GPUs for ``global_batch`` sequences per step,
    fitting ones first by predicted tokens/s/GPU, then the others with their reasons."""
    plans = []
    divisors = [d for d in range(1, gpus + 1) if gpus % d == 0]
    for tp, pp in itertools.product([d for d in divisors if d <= gpu.per_node], divisors):
        if gpus % (tp * pp):
            continue
        dp = gpus // (tp * pp)
        if global_batch % (dp * micro_batch):
            continue
        accum = global_batch // (dp * micro_batch)
        for vp, zero, rec in itertools.product((1, 2, 4, 5) if pp > 1 else (1,), (0, 1, 2, 3) if tp * pp == 1 else (0,),
                                               ("none", "selective", "full")):
            for sp in ((False, True) if sequence_parallel is None and tp > 1 else (bool(sequence_parallel) and tp > 1,)):
                layout = Layout(tp=tp, pp=pp, vp=vp, dp=dp, zero=zero, sequence_parallel=sp, recompute=rec,
                                micro_batch=micro_batch, grad_accum=accum, seq_len=seq_len)
                plans.append(make_plan(shape, method, layout, gpu))
    return sorted(plans, key=lambda p: (not p.fits, -p.tokens_per_s_per_gpu, p.peak_bytes))


def shape_of(model_cfg: Any) -> ModelShape:
    """The model shape of a run's ``model`` section: its preset, the tiny model, or the config.json of its folder
    (a packaged model's converted folder included)."""
    import json
    from pathlib import Path

    from dist_peft.accounting.presets import load_preset

    if model_cfg.preset:
        return ModelShape.from_hf(load_preset(model_cfg.preset))
    if model_cfg.source == "tiny-llama":
        return ModelShape.from_hf({"model_type": "llama", **dataclasses.asdict(model_cfg.tiny)})
    from dist_peft.train.models import PACKAGED_GGUF, packaged_model_dir

    folder = packaged_model_dir(model_cfg.source) if model_cfg.source in PACKAGED_GGUF else Path(model_cfg.source)
    path = folder / "config.json"
    if not path.is_file():
        raise ValueError(f"model: give model.preset, or a model.source folder with a config.json (got "
                         f"{model_cfg.source!r})")
    return ModelShape.from_hf(json.loads(path.read_text()))


def layout_of(cfg: Any, gpus: int) -> Layout:
    """The layout a run config gives on ``gpus`` ranks."""
    par, ds, rec = cfg.parallel, cfg.deepspeed, cfg.recompute
    tp, pp = (par.tensor, par.pipeline) if par else (1, 1)
    if gpus % (tp * pp):
        raise ValueError(f"--gpus {gpus} is not a multiple of tensor × pipeline = {tp * pp}")
    bf16 = cfg.train.precision == "bf16" or cfg.model.dtype == "bfloat16"
    return Layout(tp=tp, pp=pp, vp=par.virtual_pipeline if par else 1, dp=gpus // (tp * pp),
                  zero=ds.zero_stage if ds else 0, sequence_parallel=bool(par and par.sequence_parallel),
                  recompute=rec.granularity if rec else "none", micro_batch=cfg.train.micro_batch_size,
                  grad_accum=cfg.train.grad_accum, seq_len=cfg.data.seq_len,
                  weight_bytes=2 if cfg.model.dtype == "bfloat16" else 4, act_bytes=2 if bf16 else 4,
                  **{k: v for k, v in (("zero3_live", ds and ds.max_live_parameters),
                                       ("zero3_persist", ds and ds.param_persistence_threshold),
                                       ("reduce_bucket", ds and ds.reduce_bucket_size)) if v is not None})


def check_fits(cfg: Any, world: int, memory_bytes: int | None) -> None:
    """``train``'s check before any weight is read: the preset matches the weights folder, and, where the device's
    memory is known (a GPU), the layout fits it. Raises ValueError with the reason."""
    from pathlib import Path

    from dist_peft.accounting.presets import check_folder
    from dist_peft.accounting.roofline import GPUS

    if cfg.model.preset and cfg.model.source != "tiny-llama":
        check_folder(cfg.model.preset, cfg.model.source)
    if memory_bytes is None:
        return
    try:
        shape = shape_of(cfg.model)
    except ValueError:  # a packaged model or a type the planner does not model: nothing to size
        return
    gpu = dataclasses.replace(GPUS["h100-80gb"], name="this GPU", hbm_bytes=memory_bytes)
    plan = make_plan(shape, cfg.method, layout_of(cfg, world), gpu)
    if not plan.fits:
        raise ValueError(f"this layout does not fit: {'; '.join(plan.problems)} (see `dist-peft plan`)")


def plan_rows(plan: Plan) -> list[dict[str, Any]]:
    """One row per pipeline stage, in GiB."""
    keys = ("frozen", "gathered", "adapters", "gradients", "optimizer", "buffers", "activations", "logits", "total")
    return [{"stage": s.stage, "layers": s.layers, **{k: round(getattr(s, k) / GIB, 2) for k in keys}}
            for s in plan.stages]


def describe(plan: Plan) -> dict[str, Any]:
    """Everything ``dist-peft plan`` reports for one layout."""
    lay = plan.layout
    return {"layout": {k: getattr(lay, k) for k in ("tp", "pp", "vp", "dp", "zero", "sequence_parallel",
                                                     "recompute", "micro_batch", "grad_accum", "seq_len")},
            "engine": lay.engine, "fits": plan.fits, "problems": plan.problems, "stages_gib": plan_rows(plan),
            "model_tflop_per_step": round(plan.model_flops / 1e12, 1),
            "executed_tflop_per_step": round(plan.executed_flops / 1e12, 1),
            "collectives": [{**dataclasses.asdict(c), "bus_gib_per_step": round(c.bus_bytes / GIB, 3)}
                            for c in plan.collectives],
            "step_time_s": round(plan.step_time, 3), "tokens_per_s_per_gpu": round(plan.tokens_per_s_per_gpu),
            "model_tflops_per_gpu": round(plan.model_flops / max(plan.step_time, 1e-12) / lay.world / 1e12, 1) if plan.fits else None,
            "width_costs": plan.width_costs}


def preflight(cfg: Any, world: int) -> None:
    """``check_fits`` with this process's device memory (a GPU's; None on CPU), as a ConfigError."""
    import torch

    from dist_peft.train.config import ConfigError

    memory = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory \
        if torch.cuda.is_available() else None
    try:
        check_fits(cfg, world, memory)
    except ValueError as e:
        raise e if isinstance(e, ConfigError) else ConfigError(f"model: {e}") from None
