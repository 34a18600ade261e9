"""The compare file: one base run config, the methods to run on it, a budget rule and the seeds.

    base: configs/folora-smollm2-chat-news.yaml    # a run config (path relative to this file) or a mapping
    set: {train.steps: 40}                         # overrides of the base, for every entry
    entries:
      - {label: lora, method: {name: lora, r: 8, lora_alpha: 16}}
      - {label: loca-fixed, method: {name: loca, alternate_until: 0}, set: {train.lr: 0.01}}
    budget: {rule: trainable_params, reference: lora, tolerance: 0.05}    # or {rule: steps}, {rule: wall_time, seconds: 600}
    seeds: [0, 1, 2]
    vary_data_order: false                          # true: each seed also draws its own training order
    profile: {steps: 4, warmup: 1}                  # the interleaved step-time run; false: none
    output: {dir: runs/compare-smollm2}

Every entry's run config is the base with the entry's method section (its ``target_modules`` default to the base
method's) and ``set`` overrides, then the budget rule, then ``train.seed`` and ``output.dir`` per seed. Everything
is checked here, before a model is built; an unmeetable budget is one ConfigError naming the entry.

Decision (seeds): ``train.seed`` sets the adapters' initialisation only; the data's split and order are the base's,
so a method whose initialisation ignores the seed (FRoD) gives identical runs. ``vary_data_order: true`` also sets
``data.order_seed`` (every task's too) to the run's seed: each seed trains on its own order of the same training
examples, and the held-out sets (drawn by ``data.seed``) stay the same. Default false: earlier compare files keep
their meaning.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dist_peft.train.config import ConfigError, RunConfig, from_dict, read_yaml, set_dotted

RULES = ("steps", "trainable_params", "wall_time")


@dataclass(frozen=True)
class Entry:
    label: str
    cfg: RunConfig
    """The entry's run config at seed ``seeds[0]``, its budget applied (``run_config`` derives each seed's)."""


@dataclass(frozen=True)
class CompareSpec:
    entries: tuple[Entry, ...]
    seeds: tuple[int, ...]
    rule: str
    reference: str
    """The entry the budget and the step-time ratios refer to (default: the first)."""
    seconds: float | None
    """wall_time: each entry's steps are this budget over its profiled median step time."""
    profile_steps: int
    profile_warmup: int
    out: Path
    vary_data_order: bool = False
    """Each run's ``data.order_seed`` (and its tasks') is its seed: the training order varies with the seed."""

    def run_config(self, entry: Entry, seed: int, steps: int | None = None) -> RunConfig:
        d = entry.cfg.to_dict()
        d["train"] = {**d["train"], "seed": seed, "progress": False, **({"steps": steps} if steps else {})}
        if self.vary_data_order:
            for source in (d["data"], *d["data"].get("tasks", ())):
                source["order_seed"] = seed
        d["output"] = {**d["output"], "dir": str(self.run_dir(entry.label, seed))}
        return from_dict(d)

    def run_dir(self, label: str, seed: int) -> Path:
        return self.out / "runs" / label / f"seed{seed}"


def _mapping(value: Any, key: str) -> dict:
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
    return value


def load_spec(path: str | Path, overrides: dict[str, Any] | None = None) -> CompareSpec:
    """Read and check a compare file; ``overrides`` (``--set``) apply to every entry's run config."""
    path = Path(path)
    raw = _mapping(read_yaml(path), "compare")
    unknown = set(raw) - {"base", "set", "entries", "budget", "seeds", "vary_data_order", "profile", "output"}
    if unknown:
        raise ConfigError(f"compare: unknown key(s) {', '.join(sorted(unknown))}")
    base = raw.get("base")
    if isinstance(base, str):
        beside = path.parent / base
        base = read_yaml(beside if not Path(base).is_absolute() and beside.is_file() else base)
    base = copy.deepcopy(_mapping(base, "base"))
    for dotted, value in {**_mapping(raw.get("set", {}), "set"), **(overrides or {})}.items():
        set_dotted(base, dotted, value, "set")
    entries_raw = raw.get("entries")
    if not isinstance(entries_raw, list) or not entries_raw:
        raise ConfigError("entries: expected a non-empty list of {label, method, set}")
    entries = []
    for i, e in enumerate(entries_raw):
        e = _mapping(e, f"entries[{i}]")
        if set(e) - {"label", "method", "set"}:
            raise ConfigError(f"entries[{i}]: unknown key(s) {', '.join(sorted(set(e) - {'label', 'method', 'set'}))}")
        label = e.get("label") or _mapping(e.get("method", {}), f"entries[{i}].method").get("name")
        if not isinstance(label, str) or not label or "/" in label or label.startswith("."):
            raise ConfigError(f"entries[{i}].label: a plain name is required, got {label!r}")
        d = copy.deepcopy(base)
        method = dict(_mapping(e.get("method"), f"entries[{i}].method"))
        method.setdefault("target_modules", base.get("method", {}).get("target_modules"))
        d["method"] = method
        for dotted, value in _mapping(e.get("set", {}), f"entries[{i}].set").items():
            set_dotted(d, dotted, value, f"entries[{i}].set")
        try:
            entries.append(Entry(label, from_dict(d)))
        except ConfigError as err:
            raise ConfigError(f"entries[{i}] ({label}): {err}") from None
    labels = [e.label for e in entries]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"entries: labels must be unique, got {labels}")
    budget = _mapping(raw.get("budget", {"rule": "steps"}), "budget")
    unknown = set(budget) - {"rule", "reference", "tolerance", "seconds"}
    if unknown:
        raise ConfigError(f"budget: unknown key(s) {', '.join(sorted(unknown))}")
    tolerance = budget.get("tolerance", 0.05)
    if not (isinstance(tolerance, (int, float)) and 0 < tolerance < 1):
        raise ConfigError(f"budget.tolerance: a fraction in (0, 1), got {tolerance!r}")
    rule = budget.get("rule", "steps")
    if rule not in RULES:
        raise ConfigError(f"budget.rule: one of {', '.join(RULES)}, got {rule!r}")
    reference = budget.get("reference", labels[0])
    if reference not in labels:
        raise ConfigError(f"budget.reference: {reference!r} is not an entry label ({', '.join(labels)})")
    seconds = budget.get("seconds")
    if rule == "wall_time" and not (isinstance(seconds, (int, float)) and seconds > 0):
        raise ConfigError("budget.seconds: a positive number of seconds is required with rule wall_time")
    seeds = raw.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds) \
            or len(set(seeds)) != len(seeds):
        raise ConfigError(f"seeds: a non-empty list of distinct integers, got {seeds!r}")
    vary = raw.get("vary_data_order", False)
    if not isinstance(vary, bool):
        raise ConfigError(f"vary_data_order: true or false, got {vary!r}")
    fixed = [e.label for e in entries
             if vary and any(s.order_seed is not None for s in (e.cfg.data, *e.cfg.data.tasks))]
    if fixed:
        raise ConfigError(f"vary_data_order: it sets data.order_seed to each run's seed, but entry {fixed[0]} sets "
                          f"data.order_seed itself (remove it from the base or the entry's set)")
    prof = raw.get("profile", {})
    if prof is False:
        prof = {"steps": 0}
    prof = _mapping(prof, "profile")
    steps, warmup = prof.get("steps", 4), prof.get("warmup", 1)
    if not (isinstance(steps, int) and steps >= 0 and isinstance(warmup, int) and warmup >= 0):
        raise ConfigError("profile: steps and warmup are integers >= 0")
    if rule == "wall_time" and steps == 0:
        raise ConfigError("budget.rule wall_time: needs the profile run (profile.steps > 0)")
    out = _mapping(raw.get("output", {}), "output").get("dir")
    if not isinstance(out, str) or not out:
        raise ConfigError("output.dir: required (the compare's folder)")
    if rule == "trainable_params":
        entries = match_trainable(entries, reference, float(tolerance))
    return CompareSpec(tuple(entries), tuple(seeds), rule, reference, seconds, steps, warmup, Path(out), vary)


def trainable_count(cfg: RunConfig) -> int:
    """Trainable adapter elements of a run config, from the methods' declarations (no model is built)."""
    from dist_peft.accounting.flops import param_counts
    from dist_peft.accounting.plan import shape_of

    try:
        return param_counts(shape_of(cfg.model), cfg.method).trainable
    except ValueError as e:
        raise ConfigError(f"budget: cannot count trainable parameters without the model's shape ({e})") from None


def _with_knob(cfg: RunConfig, knob: str, value: Any) -> RunConfig:
    d = cfg.to_dict()
    d["method"] = {**d["method"], knob: value}
    return from_dict(d)


def match_trainable(entries: list[Entry], reference: str, tolerance: float) -> list[Entry]:
    """Each entry's size knob (``Adapter.size_knob``) set so its trainable count is nearest the reference's;
    ConfigError when the nearest is off by more than ``tolerance`` (relative). Counts rise with the knob, so an
    integer knob is found by bisection and a fractional one (FRoD's rate) by 60 bisection steps in (0, 1]."""
    from dist_peft.methods.base import get_method

    target = trainable_count(next(e for e in entries if e.label == reference).cfg)
    out = []
    for e in entries:
        if e.label == reference:
            out.append(e)
            continue
        knob = get_method(e.cfg.method.name).adapter_cls.size_knob
        if knob is None:
            raise ConfigError(f"budget: {e.label}: method {e.cfg.method.name} declares no size knob")
        integer = isinstance(getattr(e.cfg.method.options, knob), int)

        def count(v: Any) -> int:
            try:
                return trainable_count(_with_knob(e.cfg, knob, v))
            except ConfigError:
                return math.inf  # beyond what the method accepts (e.g. more coefficients than weights)

        lo, hi = (1, 1) if integer else (0.0, 1.0)
        if integer:
            while count(hi) < target and hi < 2 ** 40:
                lo, hi = hi, hi * 2
            while hi - lo > 1:
                mid = (lo + hi) // 2
                lo, hi = (mid, hi) if count(mid) < target else (lo, mid)
        else:
            for _ in range(60):
                mid = (lo + hi) / 2
                lo, hi = (mid, hi) if count(mid) < target else (lo, mid)
            lo = max(lo, 1e-12)
        best = min((v for v in (lo, hi)), key=lambda v: abs(count(v) - target))
        got = count(best)
        if not abs(got - target) <= tolerance * target:
            raise ConfigError(f"budget: {e.label} cannot match {reference}'s {target:,} trainable parameters within "
                              f"{tolerance:.0%} through {knob} (nearest: {knob}={best} gives {got:,})")
        out.append(Entry(e.label, _with_knob(e.cfg, knob, best)))
    return out
