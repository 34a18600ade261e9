"""Per-rank records → one summary per configuration → ``profile.json``, ``profile.md`` and PNG plots.

Over ranks: each rank's median over the measured steps, then min / median / max over ranks with the slowest
rank named. The job's step time is, per step, the slowest rank's (every rank waits for it at the next
collective), then the median over steps. Tokens are the step's tokens over all data-parallel ranks.

``profile.json`` carries ``schema`` (``SCHEMA``); a change that renames or removes a key bumps its version.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
from pathlib import Path
from typing import Any, Sequence

from dist_peft.profile.flops import device_peak, step_flops, utilisation
from dist_peft.profile.interleave import paired_ratio
from dist_peft.profile.timer import STEP_PHASES, UNACCOUNTED

SCHEMA = "dist-peft-profile/1"


def _spread(values: dict[int, float]) -> dict[str, Any]:
    ranks = sorted(values, key=values.get)
    return {"min": values[ranks[0]], "median": statistics.median(values.values()), "max": values[ranks[-1]],
            "slowest_rank": ranks[-1]}


def _phase_order(names: set[str]) -> list[str]:
    known = [p for p in STEP_PHASES if p in names]
    return known + sorted(names - set(known) - {UNACCOUNTED}) + ([UNACCOUNTED] if UNACCOUNTED in names else [])


def summarize(name: str, cfg: Any, ranks: Sequence[dict[str, Any]], settings: Any, shape: Any = None,
              adapters: bool = True) -> dict[str, Any]:
    """One configuration's figures over all ranks (module docstring). ``shape``: the model's
    ``accounting.ModelShape`` for FLOPs (None: left out); ``adapters=False`` for the frozen floor."""
    ranks = sorted(ranks, key=lambda r: r["rank"])
    n = min(len(r["steps"]) for r in ranks)
    world = len(ranks)
    job_steps = [max(r["steps"][i]["time_s"] for r in ranks) for i in range(n)]
    step_time = statistics.median(job_steps)
    per_rank = {r["rank"]: statistics.median(s["time_s"] for s in r["steps"][:n]) for r in ranks}
    names = _phase_order({k for r in ranks for s in r["steps"] for k in s["phases"]})
    rank_phases = {r["rank"]: {phase: statistics.median(s["phases"].get(phase, 0.0) for s in r["steps"][:n])
                               for phase in names} for r in ranks}
    # share: the phase's part of the rank's total measured time (so a rank's shares add up to 1, which medians
    # of separate phases need not on a noisy machine), median over ranks
    totals = {r["rank"]: sum(s["time_s"] for s in r["steps"][:n]) for r in ranks}
    shares = {r["rank"]: {phase: sum(s["phases"].get(phase, 0.0) for s in r["steps"][:n]) / totals[r["rank"]]
                          for phase in names} for r in ranks}
    phases = {}
    for phase in names:
        spread = _spread({rank: times[phase] for rank, times in rank_phases.items()})
        phases[phase] = {**spread, "share": statistics.median(shares[rank][phase] for rank in shares)}
    tokens = statistics.median(s["tokens"] for s in ranks[0]["steps"][:n])
    mp = cfg.parallel.tensor * cfg.parallel.pipeline if cfg.parallel else 1
    samples = cfg.train.micro_batch_size * cfg.train.grad_accum * (world // mp)
    out: dict[str, Any] = {
        "name": name, "method": cfg.method.name if adapters else "frozen", "world": world,
        "layout": {"tensor": cfg.parallel.tensor if cfg.parallel else 1,
                   "pipeline": cfg.parallel.pipeline if cfg.parallel else 1,
                   "data": world // mp, "zero_stage": cfg.deepspeed.zero_stage if cfg.deepspeed else 0},
        "device_name": ranks[0]["device_name"], "steps": n,
        "step_time_s": {**_spread(per_rank), "job_median": step_time, "per_step": job_steps},
        "phases": phases, "rank_phases": rank_phases,
        "rank_steps": {r["rank"]: [{"time_s": st["time_s"], "phases": st["phases"]} for st in r["steps"][:n]]
                       for r in ranks},
        "throughput": {"tokens_per_step": tokens, "tokens_per_s": tokens / step_time,
                       "tokens_per_s_per_device": tokens / step_time / world, "samples_per_s": samples / step_time},
        "trainable": ranks[0]["trainable"] if adapters else 0,
        "collectives": {r["rank"]: r["collectives"] for r in ranks},
        "collective_counts_per_step": {r["rank"]: r["steps"][0]["collectives"] for r in ranks},
        "memory": {r["rank"]: r["memory"] for r in ranks},
        "losses": [s["loss"] for s in ranks[0]["steps"][:n]],
    }
    if shape is not None:
        flops = step_flops(shape, cfg, int(tokens), world // mp, adapters=adapters)
        peak, why = device_peak(ranks[0]["device_name"], settings.peak_tflops)
        out["flops"] = {**flops, **utilisation(flops, step_time, world, peak, why)}
    return out


def compare_table(summaries: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each configuration's step time and its ratios to the frozen floor and to LoRA (when profiled); ``paired``:
    ``interleave.paired_ratio`` of its steps and the frozen floor's."""
    floor = next((s for s in summaries if s["method"] == "frozen"), None)
    lora = next((s for s in summaries if s["method"] == "lora"), None)
    rows = []
    for s in summaries:
        t = s["step_time_s"]["job_median"]
        paired = paired_ratio(s["step_time_s"]["per_step"], floor["step_time_s"]["per_step"]) if floor else None
        saved = [m.get("saved_for_backward", {}).get("peak_live") for m in s["memory"].values()]
        rows.append({"name": s["name"], "method": s["method"], "trainable": s["trainable"], "median_s": t,
                     "tokens_per_s": s["throughput"]["tokens_per_s"],
                     "vs_frozen": t / floor["step_time_s"]["job_median"] if floor else None, "paired": paired,
                     "vs_lora": t / lora["step_time_s"]["job_median"] if lora else None,
                     "saved_for_backward_bytes": max((v for v in saved if v is not None), default=None),
                     "executed_tflop_per_step": s["flops"]["executed"] / 1e12 if "flops" in s else None,
                     "hfu": s.get("flops", {}).get("hfu")})
    return rows


def _gib(b: float | None) -> str:
    if b is None:
        return "-"
    return f"{b / 2**30:.3f} GiB" if b >= 2**27 else f"{b / 2**20:.1f} MiB" if b >= 2**20 else f"{b / 2**10:.1f} KiB"


def _ms(s: float) -> str:
    return f"{s * 1e3:.1f}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def markdown(summary: dict[str, Any]) -> str:
    """The tables a person reads, for one configuration."""
    s, lay = summary, summary["layout"]
    st = s["step_time_s"]
    lines = [f"# Profile: {s['name']} ({s['method']})", "",
             f"{s['world']} rank(s) on {s['device_name']}: tensor {lay['tensor']} × pipeline {lay['pipeline']} × "
             f"data {lay['data']}" + (f", ZeRO-{lay['zero_stage']}" if lay["zero_stage"] else "") +
             f"; {s['steps']} measured steps.", "",
             "| step time (job) | tokens/s | tokens/s/device | samples/s | slowest rank |",
             "|---:|---:|---:|---:|---:|",
             f"| {_ms(st['job_median'])} ms | {s['throughput']['tokens_per_s']:.1f} | "
             f"{s['throughput']['tokens_per_s_per_device']:.1f} | {s['throughput']['samples_per_s']:.2f} | "
             f"{st['slowest_rank']} ({_ms(st['max'])} ms; fastest {_ms(st['min'])} ms) |", "",
             "## Phases (exclusive; they add up to the step)", "",
             "| phase | median ms | min ms | max ms | slowest rank | share |", "|---|---:|---:|---:|---:|---:|"]
    for name, p in s["phases"].items():
        lines.append(f"| {name} | {_ms(p['median'])} | {_ms(p['min'])} | {_ms(p['max'])} | {p['slowest_rank']} | "
                     f"{_pct(p['share'])} |")
    if "flops" in s:
        f = s["flops"]
        lines += ["", "## FLOPs", "",
                  f"Model FLOPs per step {f['model'] / 1e12:.4g} TFLOP (Megatron's formula), executed "
                  f"{f['executed'] / 1e12:.4g} TFLOP (frozen weights: forward + input gradient; adapters as "
                  f"declared). Achieved per device: {f['model_tflops_per_device']:.4g} model / "
                  f"{f['executed_tflops_per_device']:.4g} executed TFLOP/s.",
                  f"MFU {_pct(f['mfu'])}, HFU {_pct(f['hfu'])}" + (f" — {f['mfu_omitted']}" if f["mfu"] is None
                                                                  else f" (peak: {f['peak_source']})")]
    lines += ["", "## Collectives per step (rank 0)", "",
              "| op | group (size) | calls | bytes | ms | algbw GB/s | busbw GB/s |",
              "|---|---|---:|---:|---:|---:|---:|"]
    if not s["collectives"][min(s["collectives"])]:
        lines.append("| none (one process, or no collective in the step) | | | | | | |")
    for c in s["collectives"][min(s["collectives"])]:
        bw = ("-" if c["algbw_GBps"] is None else f"{c['algbw_GBps']:.3f}",
              "-" if c["busbw_GBps"] is None else f"{c['busbw_GBps']:.3f}")
        lines.append(f"| {c['op']} | {c['group']} ({c['group_size']}) | {c['calls_per_step']:g} | "
                     f"{c['bytes_per_step']:,.0f} | {_ms(c['time_per_step_s'])} | {bw[0]} | {bw[1]} |")
    lines += ["", "## Memory per rank", "",
              "| rank | peak | frozen weights | adapter params | gradients | optimizer state | method buffers | "
              "saved for backward (peak) |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for rank, m in s["memory"].items():
        a, t = m["allocator"], m["tensors"]
        peak = a["peak_allocated"] if a["kind"] == "cuda" else a["peak_rss"]
        lines.append(f"| {rank} | {_gib(peak)}{' RSS' if a['kind'] == 'cpu' else ''} | {_gib(t['frozen_weights'])} | "
                     f"{_gib(t['adapter_params'])} | {_gib(t['gradients'])} | {_gib(t['optimizer_state'])} | "
                     f"{_gib(t['method_buffers'])} | {_gib(m.get('saved_for_backward', {}).get('peak_live'))} |")
    nv = s.get("nvml")
    if nv is not None:
        lines += ["", "## GPU (NVML)", ""]
        if not nv.get("available"):
            lines.append(f"nvml: unavailable ({nv['reason']})")
        else:
            lines.append(f"{nv['gpu']}: utilisation {nv.get('util_pct', {}).get('mean', 0):.0f}% mean, power "
                         f"{nv.get('power_w', {}).get('mean', 0):.0f} W mean, SM clock "
                         f"{nv.get('sm_clock_mhz', {}).get('mean', 0):.0f} MHz, energy "
                         f"{nv.get('energy_j_per_step', float('nan')):.2f} J/step, throttling: "
                         f"{', '.join(nv['throttle_reasons']) or 'none'}")
    if s.get("traces"):
        lines += ["", "Traces: " + ", ".join(s["traces"])]
    return "\n".join(lines) + "\n"


def compare_markdown(rows: Sequence[dict[str, Any]], note: str) -> str:
    lines = ["# Profile: configurations compared (interleaved in one process)", "", note, "",
             "| config | trainable | median step ms | tokens/s | × frozen | × frozen, paired | × lora | "
             "saved for backward | executed TFLOP/step | HFU |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ratio = ["-" if r[k] is None else f"{r[k]:.3f}" for k in ("vs_frozen", "paired", "vs_lora")]
        tf = "-" if r["executed_tflop_per_step"] is None else f"{r['executed_tflop_per_step']:.4g}"
        lines.append(f"| {r['name']} | {r['trainable']:,} | {_ms(r['median_s'])} | {r['tokens_per_s']:.1f} | "
                     f"{' | '.join(ratio)} | {_gib(r['saved_for_backward_bytes'])} | {tf} | {_pct(r['hfu'])} |")
    return "\n".join(lines) + "\n"


def atomic_write(path: Path, data: str | bytes) -> None:
    """Write ``path`` through a temporary file in its folder and a rename (no half-written report)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def write_reports(out_dir: str | Path, document: dict[str, Any], md: str) -> list[Path]:
    """profile.json (``document`` with the schema tag), profile.md and the PNG plots; returns the paths."""
    from dist_peft.profile.plots import plot_phases, plot_steps

    out = Path(out_dir)
    atomic_write(out / "profile.json", json.dumps({"schema": SCHEMA, **document}, indent=2, default=str) + "\n")
    atomic_write(out / "profile.md", md)
    paths = [out / "profile.json", out / "profile.md"]
    paths.append(plot_phases(document["configs"], out / "phases.png"))
    paths.append(plot_steps(document["configs"], out / "steps.png"))
    return paths
