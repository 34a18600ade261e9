"""Two gloo processes: traced collectives count what they send, data-parallel training equals the
single-process run on the same global batch, and a checkpoint holds and restores each rank's own RNG state. One launch serves all checks (process start-up dominates)."""

import torch
import torch.distributed as dist

from conftest import tiny_config
from distributed import run_dist
from dist_peft.parallel import collectives, runtime
from dist_peft.train import checkpoint as ckpt
from dist_peft.train.loop import Trainer

GLOBAL_BATCH = 4


def _rank_checks(run_dir: str) -> dict:
    rank = collectives.group_rank()
    collectives.TRACE.reset()
    tensors = [torch.full((3,), float(rank + 1)), torch.full((2, 2), float(rank + 1)), torch.ones(4, dtype=torch.float64)]
    collectives.all_reduce_coalesced(tensors)
    trace = collectives.TRACE.reset()
    gathered = collectives.all_gather_cat(torch.full((1, 2), float(rank)), dim=0)
    b = collectives.broadcast(torch.full((2,), float(rank + 10)), src=1)
    with runtime.default_group_timeout(1234):  # how DeepSpeed's engine is built: its new_group calls take none
        inside = dist.new_group([0, 1])
    timeouts = [g._get_backend(torch.device("cpu")).options._timeout.total_seconds()
                for g in (inside, dist.new_group([0, 1]))]
    collectives.TRACE.reset()
    trainer = Trainer(tiny_config(run_dir, train={"steps": 3, "micro_batch_size": GLOBAL_BATCH // 2}),
                      echo=lambda m: None)
    trainer.run()
    step_trace = collectives.TRACE.reset()
    # RNG: each rank's own generator state goes into rank 0's checkpoint and comes back to that rank
    torch.manual_seed(100 + rank)
    saved_rng = torch.get_rng_state()
    path = collectives.all_gather_object(str(trainer.save()))[0]  # rank 0's path, once it is written
    torch.rand(3)
    c = ckpt.load_checkpoint(path)
    ckpt.restore(c, trainer.params, trainer.optimizer, trainer.controller)
    return {"timeouts": timeouts, "rng_restored": torch.equal(torch.get_rng_state(), saved_rng),
            "rng_keys": sorted(k for k in c.tensors if k.startswith("rng/")),
            "rng_ranks_differ": not torch.equal(c.tensors["rng/0/cpu"], c.tensors["rng/1/cpu"]),"sums": [t.tolist() for t in tensors], "trace": trace, "gathered": gathered.tolist(), "broadcast": b.tolist(),
            "losses": [r["loss"] for r in trainer.history if "loss" in r],
            "params": {n: p.detach().numpy().copy() for n, p in trainer.params.items()}, "run_trace": step_trace}


def test_collectives_and_data_parallel_training_match_single_process(tmp_path):
    """Coalesced all-reduce is one call per dtype with the bytes counted; DP=2 gives the losses and adapter
    weights of one process with the same global batch. Launch: pytest tests/test_multiprocess.py"""
    results = run_dist(_rank_checks, 2, run_dir=str(tmp_path / "dp"))
    single = Trainer(tiny_config(tmp_path / "single", train={"steps": 3, "micro_batch_size": GLOBAL_BATCH}),
                     echo=lambda m: None)
    single.run()
    r0, r1 = results[0], results[1]
    assert r0["sums"] == r1["sums"] == [[3.0] * 3, [[3.0, 3.0], [3.0, 3.0]], [2.0] * 4]
    assert r0["trace"] == {"calls": {"all_reduce": 2}, "bytes": {"all_reduce": 7 * 4 + 4 * 8}}
    assert r0["gathered"] == [[0.0, 0.0], [1.0, 1.0]] and r1["broadcast"] == r0["broadcast"] == [11.0, 11.0]
    losses = [r["loss"] for r in single.history if "loss" in r]
    assert r0["losses"] == r1["losses"]
    torch.testing.assert_close(torch.tensor(r0["losses"]), torch.tensor(losses), rtol=1e-5, atol=0)
    for name, value in single.params.items():
        assert (r0["params"][name] == r1["params"][name]).all(), "replicas must stay identical"
        torch.testing.assert_close(torch.from_numpy(r0["params"][name]), value.detach(), rtol=1e-4, atol=1e-6)
    # per step: one count reduction, one coalesced gradient reduction, the step check (train/guards.py); two eval
    # reductions; the final checkpoint's and the adapter files' write checks (checkpoint.written_together); the data
    # builder's failure check (collectives.failed_rank, traced since it replaced an untraced dist.all_reduce)
    assert r0["run_trace"]["calls"]["all_reduce"] == 3 * 3 + 2 + 2 + 1
    assert r0["timeouts"] == [1234.0, 1800.0], "groups made inside default_group_timeout take its timeout"
    # the final checkpoint gathered both ranks' generators (one all-gather each: CPU here, + CUDA on GPUs)
    assert r0["run_trace"]["calls"]["all_gather"] == 1
    assert r0["rng_keys"] == r1["rng_keys"] == ["rng/0/cpu", "rng/1/cpu"] and r0["rng_ranks_differ"]
    assert r0["rng_restored"] and r1["rng_restored"], "each rank restores its own generator"


def test_torchrun_launch_matches_single_process(tmp_path):
    """launch/torchrun.sh with 2 ranks (the CLI path, process group from torchrun's environment) logs the
    losses of the single-process run with the same global batch."""
    import json
    import os
    import subprocess
    import sys

    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(open("configs/tiny-lora.yaml").read().replace("runs/tiny-lora", str(tmp_path / "dp")))
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    sets = ["--set", "train.progress=false", "--set", "train.threads=1", "--set", "train.steps=3"]
    subprocess.run(["bash", "launch/torchrun.sh", str(cfg), *sets, "--set", "train.micro_batch_size=2"],
                   env=env, check=True, timeout=300, capture_output=True)
    subprocess.run([sys.executable, "-m", "dist_peft.train", "--config", str(cfg), *sets,
                    "--set", f"output.dir={tmp_path / 'single'}"], env=env, check=True, timeout=300, capture_output=True)

    def losses(run):
        return [r["loss"] for r in map(json.loads, (tmp_path / run / "metrics.jsonl").read_text().splitlines())
                if "loss" in r]

    assert len(losses("dp")) == 3
    torch.testing.assert_close(torch.tensor(losses("dp")), torch.tensor(losses("single")), rtol=1e-5, atol=0)
