"""Numerical faults and hangs (issue 14, ``dist_peft/train/guards.py``): a NaN in one rank's loss skips that step
on every rank and leaves the run equal, bit for bit, to one whose data never held that batch (weights, optimizer
state and method state, on the plain engine, and on 2 ranks: data parallelism, ZeRO-2, ZeRO-3 and megatron TP2);
``train.max_bad_steps`` NaN steps in a row end the run with one error; the skip counts survive a resume; a rank that
sleeps inside a collective is ended by its step watchdog within ``train.step_timeout_s`` with a report naming it
and the collective (its restart by the launchers: tests/test_faults.py).

Launch: pytest tests/test_numerics_faults.py (two 2-rank launches: the NaN runs share one, the hang has its own)."""

from __future__ import annotations

import contextlib
import json
import os
import time

import pytest
import torch
from torch.multiprocessing.spawn import ProcessException, ProcessExitedException

from conftest import tiny_config
from distributed import run_dist
from dist_peft.parallel import collectives
from dist_peft.train import guards
from dist_peft.train.config import from_dict
from dist_peft.train.loop import Trainer

NAN_AT = 2
"""The attempted step whose loss is made NaN (0-based): the run's third step."""
STEPS = 5
METHODS = {  # each with controller work in the first steps, on or right after step NAN_AT
    "lora": ({}, {}),
    "scalora": ({"r": 8, "interval": 1, "lipschitz": 10.0}, {}),
    "loca": ({"n_frequency": 64, "coef_steps": 2, "loc_steps": 2, "alternate_until": 8, "loc_lr": 0.01}, {}),
    "odlora": ({"r": 4, "init_rounds": 2, "init_steps": 2}, {}),
    "folora": ({"r": 4, "num_tasks": 2, "calibration_batches": 2, "refit_every": 3},
               {"data": {"source": None, "tasks": [{"name": "a", "source": "synthetic", "seed": 1},
                                                   {"name": "b", "source": "synthetic", "seed": 2}]}}),
}


@contextlib.contextmanager
def _nan_in(spec: str):
    saved = os.environ.get(guards.NAN_ENV)
    os.environ[guards.NAN_ENV] = spec
    try:
        yield
    finally:
        os.environ.pop(guards.NAN_ENV) if saved is None else os.environ.__setitem__(guards.NAN_ENV, saved)


def _cfg(run_dir, method="lora", deepspeed=None, train=None, parallel=None):
    options, sections = METHODS[method]
    raw = tiny_config(run_dir, train={"steps": STEPS, **(train or {})}).to_dict()
    raw["method"] = {"name": method, "target_modules": ["q_proj", "v_proj", "down_proj"], **options}
    if method == "lora":
        raw["method"].update(r=4, lora_alpha=8)
    if "data" in sections:
        raw["data"] = {**raw["data"], **sections["data"]}
    if deepspeed:
        raw["deepspeed"] = deepspeed
    if parallel:
        raw["parallel"] = parallel
    return from_dict(raw)


def _reference(cfg) -> Trainer:
    """The run whose data never held batch NAN_AT: its steps (records in ``history``), with the data position moved
    past that batch."""
    ref = Trainer(cfg, echo=lambda m: None)
    for attempt in range(STEPS + 1):
        if attempt == NAN_AT:
            ref.position += cfg.train.grad_accum
            continue
        ref.history.append(ref.train_step())
    return ref


def _state(t: Trainer) -> dict:
    params = t.ds.full_params() if t.ds is not None else t.params
    out = {f"param/{n}": p.detach().clone() for n, p in params.items()}
    if t.ds is None:
        ordered = (t.optimizer.state.get(p, {}) for g in t.optimizer.param_groups for p in g["params"])
        out |= {f"optim/{i}/{k}": v.clone() for i, s in enumerate(ordered) for k, v in s.items()
                if isinstance(v, torch.Tensor)}  # by position in the groups: a restored state has another order
    out |= {f"method/{k}": v.clone() for k, v in t.controller.state_dict().items()}
    return out


def _assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs from the run that skipped the batch"


@pytest.mark.parametrize("method", sorted(METHODS))
def test_nan_step_is_skipped_and_the_run_equals_one_without_that_batch(tmp_path, method):
    """A NaN loss at attempt NAN_AT: that step is logged as skipped, and the final adapter tensors, Adam state and
    controller state equal (bitwise) a run that moved past the batch without touching it."""
    with _nan_in(f"0:{NAN_AT}"):
        t = Trainer(_cfg(tmp_path / "nan", method), echo=lambda m: None)
        t.run()
    ref = _reference(_cfg(tmp_path / "ref", method))
    steps = [r for r in t.history if "lr" in r]
    assert [r.get("skipped", False) for r in steps] == [i == NAN_AT for i in range(STEPS + 1)]
    assert steps[NAN_AT]["loss"] is None and steps[NAN_AT]["step"] == NAN_AT and steps[-1]["skipped_steps"] == 1
    assert t.step == ref.step == STEPS and t.position == ref.position
    _assert_same_state(_state(t), _state(ref))
    logged = [json.loads(line) for line in (tmp_path / "nan" / "metrics.jsonl").read_text().splitlines()]
    assert sum(bool(r.get("skipped")) for r in logged) == 1


def test_max_bad_steps_in_a_row_stop_the_run_with_one_error(tmp_path, capsys):
    """train.max_bad_steps NaN steps in a row end `dist-peft train` with one error line naming the key; fewer in a
    row (a finite step between) do not."""
    from dist_peft import cli
    import yaml

    cfg = _cfg(tmp_path / "run", train={"max_bad_steps": 3})
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    with _nan_in("0:1,2,4,5"):  # two in a row, a good step, two in a row: the run finishes
        t = Trainer(_cfg(tmp_path / "ok", train={"max_bad_steps": 3}), echo=lambda m: None)
        t.run()
    assert t.step == STEPS and t.skipped_steps == 4
    with _nan_in("0:1,2,3"):
        code = cli.main(["train", "--config", str(tmp_path / "cfg.yaml"), "--set", "train.progress=false",
                         "--log-level", "WARNING"])  # the run's INFO lines (stderr) off: only problems show
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: train.max_bad_steps: 3 steps in a row"), err


def test_skip_counts_survive_a_resume(tmp_path):
    """NaN losses at attempts 1 and 2 of 5 steps, a checkpoint every 2: step 2's checkpoint (after both skips)
    holds skipped_steps 2; a run resumed from it starts with that count and no bad steps in a row (a checkpoint
    follows an applied step), logs the straight run's records of steps 3-5 (the count included: one that restarted
    at 0 would log 0) and ends with its tensors."""
    keys = ("step", "loss", "grad_norm", "lr", "skipped_steps")

    def records(t: Trainer) -> list[tuple]:
        return [tuple(r[k] for k in keys) for r in t.history if "lr" in r and r["step"] > 2]

    train = {"save_every": 2, "keep_checkpoints": 3}
    with _nan_in("0:1,2"):
        straight = Trainer(_cfg(tmp_path / "a", train=train), echo=lambda m: None)
        straight.run()
        saved = tmp_path / "a" / "checkpoints" / "step_0000002"
        resumed = Trainer(_cfg(tmp_path / "a", train=train), resume=str(saved), echo=lambda m: None)
    assert json.loads((saved / "state.json").read_text())["skipped_steps"] == 2
    assert (resumed.step, resumed.skipped_steps, resumed.bad_steps) == (2, 2, 0)
    resumed.run()
    assert records(resumed) == records(straight) and records(straight)[-1][-1] == 2
    _assert_same_state(_state(resumed), _state(straight))


NAN_LAYOUTS = {"dp": {}, "zero2": {"deepspeed": {"zero_stage": 2}}, "zero3": {"deepspeed": {"zero_stage": 3}},
               "megatron-tp2": {"parallel": {"tensor": 2}}}
"""The 2-rank layouts of the shared NaN launch. Megatron TP2: both ranks are one data replica, and rank 1's NaN is in
its copy of the loss, which the step's sum does not count (TP rank 0's does) and whose gradients stay finite: only
its "not finite" flag makes every rank skip."""


def _nan_runs(root: str) -> dict:
    """On 2 ranks, rank 1's loss is NaN at attempt NAN_AT: plain data parallelism, ZeRO-2, ZeRO-3 and megatron
    TP2, each beside its reference run."""
    from distributed import release_model_parallel

    out = {}
    for name, layout in NAN_LAYOUTS.items():
        cfg = _cfg(f"{root}/{name}", train={"micro_batch_size": 2, "threads": 1}, **layout)
        with _nan_in(f"1:{NAN_AT}"):
            t = Trainer(cfg, echo=lambda m: None)
            t.run()
        a = _state(t)
        if "parallel" in layout:  # megatron's groups are per process: one engine at a time
            release_model_parallel()
        ref = _reference(_cfg(f"{root}/{name}-ref", train={"micro_batch_size": 2, "threads": 1}, **layout))
        b = _state(ref)
        if "parallel" in layout:
            release_model_parallel()
        out[name] = {"skipped": [bool(r.get("skipped")) for r in t.history if "lr" in r],
                     "same": sorted(k for k in a if k in b and torch.equal(a[k], b[k])), "keys": sorted(a),
                     "ref_keys": sorted(b), "losses": [r["loss"] for r in t.history if "lr" in r],
                     "ref_losses": [r["loss"] for r in ref.history if "lr" in r]}
    return out


def test_nan_on_one_rank_skips_the_step_on_every_rank(tmp_path):
    """Rank 1 alone sees a NaN loss: both ranks skip that step (DP, ZeRO-2, ZeRO-3, megatron TP2), and each ends with
    the tensors (its own shards) of the run that skipped the batch, bitwise. Launch: pytest
    tests/test_numerics_faults.py -k every_rank"""
    results = run_dist(_nan_runs, 2, root=str(tmp_path))
    for name in NAN_LAYOUTS:
        for rank in (0, 1):
            r = results[rank][name]
            assert r["skipped"] == [i == NAN_AT for i in range(STEPS + 1)], (name, rank, r["skipped"])
            assert r["keys"] == r["ref_keys"] and r["same"] == r["keys"], (name, rank, set(r["keys"]) - set(r["same"]))
            # megatron: the logged loss is TP rank 0's, the only copy counted, and finite; rank 1's NaN copy
            # reaches the step check through its "not finite" flag alone
            assert (r["losses"][NAN_AT] is None) == (name != "megatron-tp2"), (name, rank, r["losses"][NAN_AT])
            assert r["losses"][:NAN_AT] + r["losses"][NAN_AT + 1:] == r["ref_losses"]


def _sleep_in_collective(run_dir: str, sleep_from: int) -> dict:
    """Rank 1 sleeps inside the first collective of attempted step ``sleep_from`` (the traced layer's bracket);
    rank 0 waits for it in that collective. Rank 1's watchdog (2 s) fires first; rank 0's (60 s) would later."""
    rank = collectives.group_rank()
    t = Trainer(_cfg(run_dir, train={"steps": 50, "micro_batch_size": 2, "threads": 1,
                                     "step_timeout_s": 2.0 if rank == 1 else 60.0}), echo=lambda m: None)

    def sleeper(op, nbytes, group):
        if rank == 1 and t.position == sleep_from and not os.path.exists(f"{run_dir}/slept"):
            with open(f"{run_dir}/slept", "w") as f:
                f.write(str(time.time()))
            time.sleep(120)
        return contextlib.nullcontext()

    collectives.TRACE.observer = sleeper
    t.run()
    return {"finished": True}


def test_rank_asleep_in_a_collective_is_ended_by_its_watchdog_with_a_hang_report(tmp_path):
    """The job ends within step_timeout_s + a margin of rank 1 falling asleep inside a collective; rank 1 exits
    with the watchdog's code and hang-rank1.txt names the rank, the step, the collective and the sleeping frame.
    Launch: pytest tests/test_numerics_faults.py -k watchdog"""
    with pytest.raises(ProcessException) as info:  # rank 1's exit, or rank 0's error once its peer is gone
        run_dist(_sleep_in_collective, 2, run_dir=str(tmp_path), sleep_from=2)
    ended = time.time()
    slept = float((tmp_path / "slept").read_text())
    assert ended - slept < 2.0 + 15.0, f"the job ran {ended - slept:.1f} s past the sleep"
    if isinstance(info.value, ProcessExitedException) and info.value.error_index == 1:
        assert info.value.exit_code == guards.HANG_EXIT_CODE, info.value
    report = (tmp_path / "hang-rank1.txt").read_text()
    head = report.splitlines()
    assert head[0].startswith("rank 1: step 2 has run ") and "train.step_timeout_s = 2 s" in head[0], head[0]
    assert head[1].startswith("last collective entered: all_reduce of 8 bytes over world"), head[1]
    assert "sleeper" in report and "train_step" in report, report
    assert not (tmp_path / "hang-rank0.txt").exists()
