"""Running a compare: the interleaved profile of every entry (step time against the frozen floor and the
reference, bytes saved for backward), then every entry × seed as an ordinary training run, then the claims and
the report.

Resumable: a finished run leaves ``runs/<label>/seed<S>/result.json`` (written atomically, last) and is never run
again; a run without it (killed) is started over from an empty folder; the profile is kept in
``profile/profile.json`` likewise. So a killed compare, started again with the same command, continues. Every rank
of a launch runs the same sequence (runs hold collectives); the folder must be one every rank sees, and rank 0
writes.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any, Callable

from dist_peft.compare.probes import GradientCosine, snapshot_weights, unsupported, update_ranks
from dist_peft.compare.spec import CompareSpec, Entry
from dist_peft.parallel import collectives
from dist_peft.profile.report import atomic_write

COSINE_METHODS = ("lora", "odlora")
"""Entries whose gradient cosine is measured when the compare has an OD-LoRA entry (its claim)."""
RANK_METHODS = ("lora", "scalora")
"""Entries whose update rank is measured (ScaLoRA's claim, LoRA's rank-r reference)."""


def _main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _quiet(_msg: str) -> None:
    return None


def profile_entries(spec: CompareSpec, echo: Callable[[str], None]) -> dict[str, Any] | None:
    """Each entry's median step time, ratios to the frozen floor and to the reference, bytes saved for backward:
    one interleaved ``dist-peft profile`` run of the entries at the first seed (``profile/``)."""
    if not spec.profile_steps:
        return None
    out = spec.out / "profile"
    done = out / "compare.json"
    if done.is_file():
        return json.loads(done.read_text())
    from dist_peft.profile.run import profile
    from dist_peft.profile.session import Settings

    from dist_peft.train.config import from_dict

    cfgs = []
    for e in spec.entries:
        d = spec.run_config(e, spec.seeds[0]).to_dict()
        d["output"]["dir"] = str(out / "runs" / e.label)  # the profile's trainers write apart from the runs
        cfgs.append((e.label, from_dict(d)))
    echo(f"profiling {len(cfgs)} entries interleaved ({spec.profile_steps} steps each, frozen floor first)")
    frozen = cfgs[0][1].deepspeed is None or cfgs[0][1].deepspeed.zero_stage != 3
    profile(cfgs, Settings(steps=spec.profile_steps, warmup=spec.profile_warmup, nvml_interval_s=0), out,
            frozen=frozen, echo=_quiet)
    result = _profile_table(spec, out) if _main() else None
    return collectives.all_gather_object(result)[0]  # rank 0's table on every rank (wall_time budgets read it)


def _profile_table(spec: CompareSpec, out: Path) -> dict[str, Any]:
    document = json.loads((out / "profile.json").read_text())
    rows = {r["name"]: r for r in document["compare"]}
    ref = rows[spec.reference]["median_s"]
    table = {label: {"median_s": r["median_s"], "vs_frozen": r["vs_frozen"], "vs_reference": r["median_s"] / ref,
                     "saved_for_backward_bytes": r["saved_for_backward_bytes"]}
             for label, r in rows.items() if label != "frozen"}
    result = {"entries": table, "device": document["configs"][0]["device_name"],
              "world": document["configs"][0]["world"], "steps": spec.profile_steps}
    atomic_write(out / "compare.json", json.dumps(result, indent=2))
    return result


def budget_steps(spec: CompareSpec, prof: dict[str, Any] | None) -> dict[str, int | None]:
    """Steps per entry: the config's, or under ``wall_time`` the budget over the entry's profiled step time."""
    if spec.rule != "wall_time":
        return {e.label: None for e in spec.entries}
    return {e.label: max(1, math.floor(spec.seconds / prof["entries"][e.label]["median_s"])) for e in spec.entries}


def run_one(spec: CompareSpec, entry: Entry, seed: int, steps: int | None, cosine: bool,
            echo: Callable[[str], None]) -> dict[str, Any]:
    """One entry at one seed: its result, from ``result.json`` when the run finished before."""
    from dist_peft.train.loop import Trainer

    folder = spec.run_dir(entry.label, seed)
    done = folder / "result.json"
    if done.is_file():
        echo(f"{entry.label} seed {seed}: finished before, kept")
        return json.loads(done.read_text())
    if folder.exists() and _main():
        shutil.rmtree(folder)  # a killed run: start it over (its log would otherwise hold two runs)
    cfg = spec.run_config(entry, seed, steps)
    echo(f"{entry.label} seed {seed}: {cfg.method.name}, {cfg.train.steps} steps")
    trainer = Trainer(cfg, echo=_quiet)
    why = unsupported(trainer)
    probe = GradientCosine(trainer) if cosine and why is None and cfg.method.name in COSINE_METHODS else None
    w0 = snapshot_weights(trainer) if why is None and cfg.method.name in RANK_METHODS else None
    summary = trainer.run()
    if probe is not None:
        probe.close()
    result = {"label": entry.label, "seed": seed, "method": cfg.method.name, "options": cfg.to_dict()["method"],
              "trainable": sum(p.numel() for p in trainer.params.values()), "steps": cfg.train.steps,
              "eval_before": summary["eval_before"], "eval_after": summary["eval_after"],
              "history": trainer.history, "probes_skipped": why,
              "gradient_cosine": probe.values if probe is not None else None,
              "update_rank": update_ranks(trainer, w0) if w0 is not None else None}
    if _main():
        atomic_write(done, json.dumps(result))
    return result


def run_compare(spec: CompareSpec, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Profile, run every entry × seed (skipping finished ones), evaluate the claims, write the report."""
    from dist_peft.compare.claims import evaluate_claims
    from dist_peft.compare.report import write_report

    prof = profile_entries(spec, echo)
    steps = budget_steps(spec, prof)
    cosine = any(e.cfg.method.name == "odlora" for e in spec.entries)
    results = {e.label: [run_one(spec, e, s, steps[e.label], cosine, echo) for s in spec.seeds]
               for e in spec.entries}
    if not _main():
        return {}
    claims = evaluate_claims(spec, results)
    paths = write_report(spec, results, prof, claims)
    return {"report": str(spec.out / "report.md"), "files": [str(p) for p in paths],
            "claims": {f"{c['claim']}: {c['paper']}": c["verdict"] for c in claims}}
