"""``dist-peft profile``: real training steps of one or several configurations, measured on every rank.

Order: build every Trainer (and the frozen floor), run ``warmup`` unmeasured rounds, reset the allocator's peaks,
then ``steps`` measured rounds, interleaved (``interleave``) with the NVML sampler and, for a single
configuration, the bounded trace running; gather every rank's records to rank 0 (one ``all_gather_object``,
after the measured steps), which writes the reports. The configurations must share model, data, batch and
layout (so ratios compare methods, not set-ups).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from dist_peft.parallel import collectives
from dist_peft.profile.interleave import interleave
from dist_peft.profile.memory import reset_peaks
from dist_peft.profile.nvml import NvmlSampler
from dist_peft.profile.report import compare_markdown, compare_table, markdown, summarize, write_reports
from dist_peft.profile.session import RankProfiler, Settings, frozen_trainer
from dist_peft.profile.trace import StepTrace, adapter_ranges
from dist_peft.train.config import ConfigError

SHARED = ("model", "data", "parallel", "deepspeed", "recompute")
"""Sections every compared configuration must share (and train's batch keys)."""


def check_comparable(cfgs: Sequence[tuple[str, Any]]) -> None:
    """A ConfigError naming the first section in which two configurations differ (before any model is built)."""
    first_name, first = cfgs[0]
    for name, cfg in cfgs[1:]:
        a, b = first.to_dict(), cfg.to_dict()
        for key in SHARED:
            if a.get(key) != b.get(key):
                raise ConfigError(f"profile: {name} and {first_name} differ in their {key} section; compared "
                                  f"configurations must share model, data, batch and layout")
        for key in ("micro_batch_size", "grad_accum", "precision"):
            if a["train"][key] != b["train"][key]:
                raise ConfigError(f"profile: {name} and {first_name} differ in train.{key}")


def _shape(trainer: Any) -> tuple[Any, str | None]:
    """The model's accounting shape, or None and why (FLOPs are then left out of the report)."""
    from dist_peft.accounting import ModelShape

    try:
        return ModelShape.from_hf(trainer.mg.hf if trainer.mg is not None else trainer.model.config), None
    except (ValueError, KeyError, AttributeError) as e:
        return None, f"flops: unavailable ({e})"


def _sites(trainer: Any) -> list[tuple[str, torch.nn.Module]]:
    if trainer.mg is not None:
        return list(trainer.mg.sites.items())
    from dist_peft.integrations.transformers import adapted_sites

    return list(adapted_sites(trainer.model).items())


def profile(cfgs: Sequence[tuple[str, Any]], settings: Settings, out_dir: str | Path, frozen: bool = True,
            echo: Callable[[str], None] = print) -> dict[str, Any] | None:
    """Profile ``cfgs`` (name, RunConfig) interleaved, with the frozen floor first when ``frozen``; rank 0 writes
    ``out_dir``/profile.json, profile.md, phases.png, steps.png (and the trace files of the traced ranks) and
    returns the headline; other ranks return None."""
    from dist_peft.train.loop import Trainer

    check_comparable(cfgs)
    quiet = lambda _m: None  # noqa: E731 — a Trainer's own messages would repeat per configuration
    subjects = [(name, cfg, Trainer(cfg, echo=quiet), True) for name, cfg in cfgs]
    if frozen:
        subjects.insert(0, ("frozen", cfgs[0][1], frozen_trainer(cfgs[0][1]), False))
    rt = subjects[0][2].rt
    single = len(subjects) == 1
    traced = settings.trace and single and rt.rank in settings.trace_ranks
    profs = [RankProfiler(t, settings, traced) for _, _, t, _ in subjects]
    out = Path(out_dir)
    trace = StepTrace(out, rt.rank, rt.world, rt.device, active=settings.trace_active) if traced else None
    hooks = adapter_ranges(_sites(subjects[0][2])) if traced else []
    sampler = NvmlSampler(rt.device, settings.nvml_interval_s) if settings.nvml_interval_s else None

    def step(prof: RankProfiler, measured: bool) -> None:
        if not measured:
            prof.trainer.train_step()
            return
        prof.run_step()
        if trace is not None:
            trace.step()

    interleave(profs, settings.warmup, 0, step)
    reset_peaks(rt.device)
    rounds = max(settings.steps, trace.steps_needed if trace else 0)
    with sampler or contextlib.nullcontext(), trace or contextlib.nullcontext():
        interleave(profs, 0, rounds, step)
    for handle in hooks:
        handle.remove()
    local = {"records": [p.record() for p in profs],
             "nvml": sampler.summary() if sampler else {"available": False, "reason": "sampler off"},
             "trace": str(trace.written) if trace is not None and trace.written else None}
    gathered = collectives.all_gather_object(local)  # after the measured steps: not in any step's figures
    if rt.rank != 0:
        return None
    return _write(subjects, gathered, settings, out)


def _write(subjects: list, gathered: list[dict[str, Any]], settings: Settings, out: Path) -> dict[str, Any]:
    shape, why = _shape(subjects[-1][2])
    summaries = []
    for i, (name, cfg, _, adapters) in enumerate(subjects):
        s = summarize(name, cfg, [g["records"][i] for g in gathered], settings, shape, adapters)
        if shape is None:
            s["flops_omitted"] = why
        s["nvml"] = gathered[0]["nvml"]
        s["nvml_per_rank"] = {r: g["nvml"] for r, g in enumerate(gathered)}
        s["traces"] = [g["trace"] for g in gathered if g["trace"]]
        summaries.append(s)
    rows = compare_table(summaries) if len(summaries) > 1 else None
    document = {"settings": dataclasses.asdict(settings), "configs": summaries, "compare": rows}
    if rows is None:
        md = markdown(summaries[0])
    else:
        note = (f"{summaries[0]['world']} rank(s) on {summaries[0]['device_name']}, {settings.steps} interleaved "
                f"rounds after {settings.warmup} warm-up; ratios from this run only.")
        md = compare_markdown(rows, note) + "\n" + "\n".join(markdown(s) for s in summaries)
    paths = write_reports(out, document, md)
    head = summaries[-1]
    return {"profile": str(out / "profile.md"), "files": [str(p) for p in paths],
            "step_time_s": head["step_time_s"]["job_median"], "tokens_per_s": head["throughput"]["tokens_per_s"],
            "compare": [{k: r[k] for k in ("name", "median_s", "vs_frozen", "paired", "vs_lora")} for r in rows or []]}


def overhead(cfg: Any, settings: Settings, rounds: int = 20) -> dict[str, Any]:
    """The profiler's cost on ``cfg``: two Trainers of it, one plain (``NULL_TIMER``) and one profiled, stepped
    interleaved; each step is timed from outside by the same wall clock (device synchronized around the step,
    never inside it). Returns both medians and on/off − 1. A benchmark (run it on an idle machine)."""
    import statistics

    from dist_peft.train.loop import Trainer

    plain, profiled = Trainer(cfg, echo=lambda _m: None), Trainer(cfg, echo=lambda _m: None)
    prof = RankProfiler(profiled, settings)
    times: dict[str, list[float]] = {"off": [], "on": []}
    sync = torch.cuda.synchronize if plain.rt.device.type == "cuda" else (lambda: None)

    def step(subject: str, measured: bool) -> None:
        sync()
        start = time.perf_counter()
        plain.train_step() if subject == "off" else prof.run_step()
        sync()
        if measured:
            times[subject].append(time.perf_counter() - start)

    interleave(["off", "on"], settings.warmup, rounds, step)
    off, on = statistics.median(times["off"]), statistics.median(times["on"])
    return {"median_off_s": off, "median_on_s": on, "overhead": on / off - 1, "rounds": rounds}
