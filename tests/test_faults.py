"""Faults survived (issue 14, part A): killed ranks and nodes restart by themselves and resume exactly; failed and
corrupted checkpoint writes leave the previous checkpoint in use, with one clear error or warning.

Faults are injected with the ``DIST_PEFT_FAULT`` hook (``dist_peft/train/faults.py``; it fires on a launch's first
attempt only). Multi-process checks share launches: each test starts its launches side by side and compares them
with an uninterrupted launch of the same config, bit for bit (losses of every step and the final adapter files).
Launch: pytest tests/test_faults.py"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch

from conftest import tiny_config
from dist_peft.files import StorageError, read_json
from dist_peft.train import checkpoint as ckpt
from dist_peft.train.loop import Trainer
from test_launchers import CONFIG, PLAIN, REPO, SETS, TIMEOUT_S, _env, _free_port, _losses, _run_side_by_side

STEPS = ["--set", "train.steps=6", "--set", "train.save_every=2"]


def _torchrun(config: Path, run_dir: Path, fault: str | None = None, restarts: int = 2, *extra: str, **env: str):
    """(command, env) of launch/torchrun.sh (2 ranks unless NPROC says otherwise) for 6 steps of ``config``."""
    env = {"NPROC": "2", **env, "MAX_RESTARTS": str(restarts), **({"DIST_PEFT_FAULT": fault} if fault else {})}
    return (["bash", "launch/torchrun.sh", str(config), *SETS, *STEPS, "--set", f"output.dir={run_dir}", *extra],
            _env(**env))


def _deepspeed(config: Path, run_dir: Path, fault: str, restarts: int, *extra: str):
    """(command, env) of launch/deepspeed.sh (its restart loop) for 2 ranks and 6 steps of ``config``."""
    return (["bash", "launch/deepspeed.sh", str(config), *SETS, *STEPS, "--set", f"output.dir={run_dir}", *extra],
            _env(NPROC="2", MASTER_PORT=str(_free_port()), MAX_RESTARTS=str(restarts), DIST_PEFT_FAULT=fault))


HANG_TIMEOUT_S = 10.0
"""train.step_timeout_s of the launches with a hang: past a tiny step's time under a loaded 2-core machine."""
KILL_THEN_HANG = "kill:step:3:1,hang:step:4:0:1"
"""Attempt 0: rank 1 SIGKILLed as step 4 begins (resume from step 2); attempt 1: rank 0 asleep inside step 5's
first collective, right after step 4's checkpoint (resume from step 4)."""


def _assert_hang_ended_the_attempt(run_dir: Path, out: str) -> None:
    """Rank 0 fell asleep inside a collective of step 5 (the hook's line); a watchdog (rank 0's, or its peer's,
    waiting in the same collective: their deadlines are a few ms apart) ended the attempt within step_timeout_s +
    a margin of it, with a report naming the step and the collective; the next attempt resumed from step 4."""
    asleep = re.search(r"DIST_PEFT_FAULT: rank 0 asleep inside \w+ after step 4 at ([0-9.]+)", out)
    assert asleep, out[-3000:]
    reports = sorted(run_dir.glob("hang-rank*.txt"))
    assert reports and {p.name for p in reports} <= {"hang-rank0.txt", "hang-rank1.txt"}, out[-3000:]
    for report in reports:
        head = report.read_text().splitlines()
        ran = re.fullmatch(rf"rank {report.stem[9:]}: step 4 has run ([0-9.]+) s, past train.step_timeout_s = .*",
                           head[0])
        assert ran and HANG_TIMEOUT_S <= float(ran[1]) < HANG_TIMEOUT_S + 2.0, head[0]
        assert head[1].startswith("last collective entered: "), head[1]
        assert report.stat().st_mtime - float(asleep[1]) < HANG_TIMEOUT_S + 5.0, report.name
    assert f"hung in step 4 (over train.step_timeout_s = {HANG_TIMEOUT_S:g} s)" in out, out[-3000:]
    assert f"resumed from {run_dir / 'checkpoints' / 'step_0000004'} at step 4" in out, out[-3000:]


def _train_records(run_dir: Path) -> list[int]:
    return [r["step"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def _assert_same_run(run_dir: Path, reference: Path, out: str) -> None:
    """Every step logged once with the reference's loss (eval records too), the same adapter files (their SHA-256
    manifests), and no temporary folder left behind."""
    assert _train_records(run_dir) == list(range(1, 7)), out[-3000:]
    assert _losses(run_dir) == _losses(reference), out[-3000:]
    assert read_json(run_dir / "adapter" / "manifest.json") == read_json(reference / "adapter" / "manifest.json")
    assert not [p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("config", [PLAIN, CONFIG], ids=["dp", "zero2"])
def test_a_killed_rank_restarts_the_job_which_resumes_bit_for_bit(tmp_path, config):
    """2 ranks, checkpoints every 2 of 6 steps: rank 1 SIGKILLed as step 4 begins (resumes from step 2) and, in the
    restarted job, rank 0 asleep inside a collective of step 5 (the step watchdog ends the attempt within
    train.step_timeout_s + a margin, resumes from step 4), under torchrun --max-restarts (DP) and under
    launch/deepspeed.sh's restart loop (ZeRO-2); and rank 0 SIGKILLed while writing step 4's checkpoint under
    torchrun (its temporary folder removed on restart, resumes from step 2): each restarts by itself and ends with
    the uninterrupted run's losses for every step and its adapter files. The plain engine also runs a write under
    ENOSPC with no restarts: both ranks end at once with one error naming the folder and the cause, and step 2's
    checkpoint stays verified."""
    hang = ("--set", f"train.step_timeout_s={HANG_TIMEOUT_S}")
    launches = {"straight": _torchrun(config, tmp_path / "straight"),
                "kill-step": _torchrun(config, tmp_path / "kill-step", KILL_THEN_HANG, 3, *hang) if config == PLAIN
                else _deepspeed(config, tmp_path / "kill-step", KILL_THEN_HANG, 3, *hang),
                "kill-write": _torchrun(config, tmp_path / "kill-write", "kill:ckpt-write:4:0")}
    if config == PLAIN:
        launches["enospc"] = _torchrun(config, tmp_path / "enospc", "enospc:ckpt-write:4:0", restarts=0)
    results = _run_side_by_side(launches)
    assert results["straight"][0] == 0, results["straight"][1][-3000:]
    for name in ("kill-step", "kill-write"):
        rc, out = results[name]
        assert rc == 0, f"{name}:\n{out[-3000:]}"
        assert f"resumed from {tmp_path / name / 'checkpoints' / 'step_0000002'} at step 2" in out, out[-3000:]
        _assert_same_run(tmp_path / name, tmp_path / "straight", out)
    _assert_hang_ended_the_attempt(tmp_path / "kill-step", results["kill-step"][1])
    if config == PLAIN:
        rc, out = results["enospc"]
        assert rc != 0
        message = (f"error: {tmp_path / 'enospc' / 'checkpoints' / 'step_0000004'}: writing the checkpoint failed on "
                   f"rank 0 (")
        assert out.count(message) == 2, out[-3000:]  # every rank, none left waiting
        assert "No space left on device" in out
        assert ckpt.newest_verified(tmp_path / "enospc", pytest.fail).name == "step_0000002"
        assert [p.name for p in (tmp_path / "enospc" / "checkpoints").iterdir()] == ["step_0000002"]


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_a_killed_node_is_started_again_and_both_nodes_resume(tmp_path):
    """Two torchrun "nodes" on this machine (NNODES=2, one rank each, c10d rendezvous on 127.0.0.1, restarts on):
    node 1's agent and worker are SIGKILLed as step 4 begins; started again, as a scheduler would, it rejoins
    node 0 (whose agent restarts its worker) and both resume from step 2 to the losses and adapter files of a
    straight run of the same two nodes."""
    port = _free_port()

    def node(run_dir: Path, fault: str | None = None) -> subprocess.Popen:
        cmd, env = _torchrun(PLAIN, run_dir, fault, NPROC="1", NNODES="2", RDZV=f"127.0.0.1:{port}",
                             RDZV_ID=run_dir.name)
        return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)

    def start_pair(run_dir: Path, fault: str | None = None) -> list[subprocess.Popen]:
        first = node(run_dir)
        deadline = time.monotonic() + 60
        while not _listening(port):  # node 0 hosts the rendezvous store: start it first
            assert time.monotonic() < deadline and first.poll() is None, "node 0 did not open the rendezvous"
            time.sleep(0.2)
        return [first, node(run_dir, fault)]

    procs: list[subprocess.Popen] = []
    try:
        procs = start_pair(tmp_path / "straight")
        outs = [p.communicate(timeout=TIMEOUT_S)[0] for p in procs]
        assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
        procs = start_pair(tmp_path / "killed", "kill-node:step:3:1")
        lost = procs[1].communicate(timeout=TIMEOUT_S)[0]
        assert procs[1].returncode == -signal.SIGKILL, lost[-3000:]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(procs[1].pid, signal.SIGKILL)  # anything of the lost node still alive
        procs[1] = node(tmp_path / "killed")  # the scheduler starts the node again
        outs = [p.communicate(timeout=TIMEOUT_S)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    assert f"resumed from {tmp_path / 'killed' / 'checkpoints' / 'step_0000002'} at step 2" in outs[0]
    _assert_same_run(tmp_path / "killed", tmp_path / "straight", outs[0])


def _losses_of(trainer: Trainer) -> list[float]:
    return [r["loss"] for r in trainer.history if "loss" in r]


def test_a_failed_write_and_a_corrupt_newest_checkpoint_fall_back_to_the_previous_one(tmp_path, monkeypatch):
    """One process, checkpoints every 2 of 6 steps. A checkpoint write under ENOSPC ends the run with one
    StorageError naming the folder and the cause, leaving step 2's checkpoint verified and no temporary folder;
    ``resume="auto"`` then continues from step 2 (stale temporary folders of killed writes removed first) to the
    straight run's losses and weights. A truncated newest checkpoint, and one without its manifest (incomplete),
    are skipped with a warning naming each, and the previous one is used."""
    train = {"steps": 6, "save_every": 2, "keep_checkpoints": 3}
    straight = Trainer(tiny_config(tmp_path / "straight", train=train), echo=lambda m: None)
    straight.run()
    run = tmp_path / "run"
    monkeypatch.setenv("DIST_PEFT_FAULT", "enospc:ckpt-write:4:0")
    with pytest.raises(StorageError, match=r"step_0000004: writing the checkpoint failed on rank 0 \(OSError: "
                                           r"\[Errno 28\] No space left on device"):
        Trainer(tiny_config(run, train=train), echo=lambda m: None).run()
    monkeypatch.delenv("DIST_PEFT_FAULT")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_0000002"]
    ckpt.verify_checkpoint(run / "checkpoints" / "step_0000002")
    for stale in (run / "checkpoints" / ".step_0000004.tmp-deadbeef", run / ".adapter.tmp-deadbeef"):
        stale.mkdir()
    said: list[str] = []
    resumed = Trainer(tiny_config(run, train=train), resume="auto", echo=said.append)
    assert resumed.step == 2 and not list(run.glob(".*")) and not list((run / "checkpoints").glob(".*"))
    resumed.run()
    assert _losses_of(resumed) == _losses_of(straight)[2:]
    assert _train_records(run) == list(range(1, 7))
    for name, value in straight.params.items():
        assert torch.equal(value, resumed.params[name]), name

    newest = run / "checkpoints" / "step_0000006"
    data = (newest / "state.safetensors").read_bytes()
    (newest / "state.safetensors").write_bytes(data[: len(data) // 2])
    (run / "checkpoints" / "step_0000004" / "manifest.json").unlink()
    Trainer(tiny_config(run, train=train), resume="auto", echo=said.append)
    assert any(m.startswith(f"warning: skipping checkpoint {newest}: ") and "checksum mismatch" in m for m in said)
    assert any(m.startswith(f"warning: skipping checkpoint {run / 'checkpoints' / 'step_0000004'}: ")
               and "no manifest.json" in m for m in said)
    assert said[-1] == f"resumed from {run / 'checkpoints' / 'step_0000002'} at step 2"


def test_auto_starts_fresh_without_a_checkpoint_and_latest_needs_one(tmp_path):
    """``auto`` with no checkpoint starts at step 0 and empties a log a killed first attempt left; ``latest`` (the
    bare ``--resume``) with none is one error naming the folder."""
    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "eval_loss": 1.0}\n{"step": 1, "loss": 2.0}\n{"st')
    trainer = Trainer(tiny_config(tmp_path, train={"steps": 1}), resume="auto", echo=lambda m: None)
    assert trainer.step == 0 and (tmp_path / "metrics.jsonl").read_text() == ""
    with pytest.raises(ValueError, match="--resume: no verified checkpoint under .*checkpoints"):
        Trainer(tiny_config(tmp_path, train={"steps": 1}), resume="latest", echo=lambda m: None)


def test_pruning_never_deletes_the_checkpoint_just_written(tmp_path):
    """keep_checkpoints 1 after writing step 4 of a run resumed past an unverifiable step 6: step 2 goes, step 4
    (just written, so verified) and step 6 (its step will be written again) stay."""
    for step in (2, 4, 6):
        ckpt.checkpoint_dir(tmp_path, step).mkdir(parents=True)
    ckpt.prune(tmp_path, 1, ckpt.checkpoint_dir(tmp_path, 4))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_0000004", "step_0000006"]
