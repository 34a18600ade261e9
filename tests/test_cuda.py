"""The GPU leg: the key equivalences of the CPU suite, on a CUDA device. Run it first when a GPU is available:

    bash tools/test_cuda.sh            # = pytest -m cuda tests (skipped without CUDA; 2 GPUs for the DP test)

Tolerances (CPU/gloo tests compare bitwise where the arithmetic is identical; here it is not):
  * CUDA vs CPU, fp32: rtol 1e-4 on losses. cuBLAS and CPU BLAS sum a dot product in different orders (TF32 is
    off, torch's default); three optimizer steps grow the ~1e-7 differences to ~1e-5.
  * same GPU, resume vs straight and chunked vs whole-batch loss: rtol 1e-6 (deterministic algorithms on where an
    op has one: ``conftest._deterministic_cuda``; cuBLAS may still pick another kernel for another shape).
  * 2 GPUs (NCCL) vs 1 GPU: rtol 1e-5 on losses. NCCL's ring reduction orders the sum differently from one
    process's accumulation; the global batch is the same.
  * bf16 autocast: rtol 2e-3 (bf16 keeps 8 bits of mantissa).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from dist_peft.train import checkpoint as ckpt
from dist_peft.train.config import from_dict
from dist_peft.train.loop import Trainer

pytestmark = pytest.mark.cuda

SAME_DEVICE = {"rtol": 1e-6, "atol": 1e-7}
CPU_VS_CUDA = {"rtol": 1e-4, "atol": 1e-6}
NCCL_VS_ONE = {"rtol": 1e-5, "atol": 1e-7}
BF16 = {"rtol": 2e-3, "atol": 1e-3}
METHOD_CONFIGS = {"lora": "tiny-lora", "folora": "folora-tiny", "frod": "frod-tiny", "odlora": "odlora-tiny",
                  "scalora": "scalora-tiny", "loca": "tiny-lora"}


def _config(run_dir, name: str, **sections):
    """Method ``name``'s tiny config for 3 steps in ``run_dir``; ``sections`` update or add config sections."""
    raw = yaml.safe_load(open(f"configs/{METHOD_CONFIGS[name]}.yaml"))
    if name == "loca":
        raw["method"] = {"name": "loca", "target_modules": raw["method"]["target_modules"], "n_frequency": 32}
    if name == "frod":
        raw["method"]["hjd_cache"] = str(run_dir.parent / "hjd")
    raw["train"].update(steps=3, progress=False)
    raw["output"]["dir"] = str(run_dir)
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value}
    return from_dict(raw)


def _losses(trainer) -> torch.Tensor:
    return torch.tensor([r["loss"] for r in trainer.history if "loss" in r], dtype=torch.float64)


@pytest.mark.parametrize("method", sorted(METHOD_CONFIGS))
def test_cuda_training_matches_the_cpu_run(tmp_path, monkeypatch, method):
    """Every method: 3 steps on the GPU log the CPU run's losses and end at its adapter weights (CPU_VS_CUDA)."""
    gpu = Trainer(_config(tmp_path / "gpu", method), echo=lambda m: None)
    gpu.run()
    assert all(p.device.type == "cuda" for p in gpu.params.values())
    with monkeypatch.context() as m:
        m.setattr(torch.cuda, "is_available", lambda: False)
        cpu = Trainer(_config(tmp_path / "cpu", method), echo=lambda m: None)
        cpu.run()
    torch.testing.assert_close(_losses(gpu), _losses(cpu), **CPU_VS_CUDA)
    for name, value in cpu.params.items():
        torch.testing.assert_close(gpu.params[name].detach().cpu(), value.detach(), rtol=1e-3, atol=1e-5)


def test_cuda_resume_equals_the_straight_run(tmp_path):
    """LoRA with dropout on the GPU: 4 steps straight vs 2, checkpoint, resume, 2 (the rank's own CUDA generator
    restored): the same losses and weights (SAME_DEVICE)."""
    dropout = {"lora_dropout": 0.1}

    def trainer(run, steps, resume=None):
        return Trainer(_config(tmp_path / run, "lora", method=dropout, train={"steps": steps}), resume=resume,
                       echo=lambda m: None)

    straight = trainer("a", 4)
    straight.run()
    trainer("b", 2).run()
    resumed = trainer("b", 4, resume=ckpt.latest_checkpoint(tmp_path / "b"))
    resumed.run()
    torch.testing.assert_close(_losses(resumed), _losses(straight)[2:], **SAME_DEVICE)
    for name, value in straight.params.items():
        torch.testing.assert_close(resumed.params[name], value, **SAME_DEVICE)


def test_cuda_generator_of_the_current_device_round_trips(tmp_path):
    """After a restore the current device's generator continues from the checkpoint: the same draws again."""
    trainer = Trainer(_config(tmp_path, "lora", train={"steps": 1}), echo=lambda m: None)
    c = ckpt.load_checkpoint(trainer.save())
    first = torch.rand(8, device="cuda")
    ckpt.restore(c, trainer.params, trainer.optimizer, trainer.controller)
    assert torch.equal(torch.rand(8, device="cuda"), first)


@pytest.mark.parametrize("precision, tol", [("fp32", SAME_DEVICE), ("bf16", BF16)])
def test_cuda_chunked_loss_equals_the_whole_batch_loss(precision, tol):
    """causal_lm_loss in 8-token chunks equals cross-entropy over the whole batch's fp32 logits on the GPU."""
    from dist_peft.train.data import IGNORE
    from dist_peft.train.loss import causal_lm_loss
    from dist_peft.train.models import build_tiny_llama

    cfg = from_dict(yaml.safe_load(open("configs/tiny-lora.yaml"))).model.tiny
    model = build_tiny_llama(cfg).cuda()
    ids = torch.randint(0, cfg.vocab_size, (4, 33), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16"):
        loss, correct = causal_lm_loss(model, batch, with_correct=True, budget=4 * cfg.vocab_size * 8)
        logits = model(input_ids=ids).logits
    logits = logits.float()[:, :-1].reshape(-1, cfg.vocab_size)
    reference = torch.nn.functional.cross_entropy(logits, ids[:, 1:].reshape(-1), ignore_index=IGNORE, reduction="sum")
    torch.testing.assert_close(loss, reference, **tol)
    if precision == "fp32":
        assert int(correct) == int((logits.argmax(-1) == ids[:, 1:].reshape(-1)).sum())


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_cuda_two_ranks_on_nccl_match_one_gpu(tmp_path):
    """launch/torchrun.sh with 2 ranks (nccl, one GPU each) logs the losses of one GPU with the same global batch
    (NCCL_VS_ONE)."""
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(open("configs/tiny-lora.yaml").read().replace("runs/tiny-lora", str(tmp_path / "dp")))
    env = {**os.environ, "PYTHON": sys.executable, "NPROC": "2"}
    sets = ["--set", "train.progress=false", "--set", "train.steps=3"]
    subprocess.run(["bash", "launch/torchrun.sh", str(cfg), *sets, "--set", "train.micro_batch_size=2"],
                   env=env, check=True, timeout=600)
    subprocess.run([sys.executable, "-m", "dist_peft.train", "--config", str(cfg), *sets,
                    "--set", f"output.dir={tmp_path / 'one'}"], env=env, check=True, timeout=600)

    def losses(run):
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return torch.tensor([r["loss"] for r in map(json.loads, lines) if "loss" in r], dtype=torch.float64)

    assert len(losses("dp")) == 3
    torch.testing.assert_close(losses("dp"), losses("one"), **NCCL_VS_ONE)


def test_cuda_zero2_alone_uses_a_one_rank_nccl_group_and_matches_the_plain_engine(tmp_path):
    """DeepSpeed ZeRO-2 in one process on the GPU (its one-rank group on nccl, not gloo with CUDA tensors) logs
    the plain engine's losses (NCCL_VS_ONE). Last in this file: the group stays for the process."""
    import torch.distributed as dist

    plain = Trainer(_config(tmp_path / "plain", "lora"), echo=lambda m: None)
    plain.run()
    zero = Trainer(_config(tmp_path / "zero2", "lora", deepspeed={"zero_stage": 2}), echo=lambda m: None)
    assert dist.get_backend() == "nccl"
    zero.run()
    torch.testing.assert_close(_losses(zero), _losses(plain), **NCCL_VS_ONE)
