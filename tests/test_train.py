"""The training loop: exact resume, accumulation ≡ larger batch, hooks, checkpoints, config errors, export."""

import json
import math

import pytest
import torch

from conftest import tiny_config
from dist_peft.cli import main
from dist_peft.files import BadFileError
from dist_peft.integrations.transformers import adapted_sites, load_adapter
from dist_peft.methods.base import Controller
from dist_peft.methods.lora import LoraAdapter
from dist_peft.train import checkpoint as ckpt
from dist_peft.train.config import ConfigError, TrainConfig, from_dict, load_config
from dist_peft.train.export import export
from dist_peft.train.loop import Trainer, lr_at
from dist_peft.train.models import build_tiny_llama

DROPOUT = {"name": "lora", "target_modules": ["q_proj", "v_proj", "down_proj"], "r": 4, "lora_alpha": 8,
           "lora_dropout": 0.1}


def _adapter_state(trainer):
    return {n: p.detach().clone() for n, p in trainer.params.items()}


def test_resume_is_bitwise_identical_to_a_straight_run(tmp_path):
    """6 steps straight vs 3 steps, stop, resume, 3 steps: identical losses and adapter weights (dropout and
    gradient accumulation on, so RNG and data position must both be restored)."""
    train = {"steps": 6, "micro_batch_size": 2, "grad_accum": 2}
    straight = Trainer(tiny_config(tmp_path / "a", method=DROPOUT, train=train), echo=lambda m: None)
    straight.run()
    first = Trainer(tiny_config(tmp_path / "b", method=DROPOUT, train={**train, "steps": 3}), echo=lambda m: None)
    first.run()
    resumed = Trainer(tiny_config(tmp_path / "b", method=DROPOUT, train=train), echo=lambda m: None,
                      resume=ckpt.latest_checkpoint(tmp_path / "b"))
    assert resumed.step == 3
    resumed.run()
    losses = [r["loss"] for r in straight.history if "loss" in r]
    assert losses[3:] == [r["loss"] for r in resumed.history if "loss" in r]
    assert losses[:3] == [r["loss"] for r in first.history if "loss" in r]
    for name, value in _adapter_state(straight).items():
        assert torch.equal(value, resumed.params[name]), name


def test_gradient_accumulation_equals_one_larger_batch(tmp_path):
    """k micro-batches of b give the losses and weights of one micro-batch of k·b (token-normalised loss)."""
    big = Trainer(tiny_config(tmp_path / "a", train={"steps": 3, "micro_batch_size": 4}), echo=lambda m: None)
    acc = Trainer(tiny_config(tmp_path / "b", train={"steps": 3, "micro_batch_size": 2, "grad_accum": 2}),
                  echo=lambda m: None)
    big.run(), acc.run()
    for a, b in zip([r["loss"] for r in big.history if "loss" in r], [r["loss"] for r in acc.history if "loss" in r]):
        assert math.isclose(a, b, rel_tol=1e-5)
    for name, value in _adapter_state(big).items():
        torch.testing.assert_close(acc.params[name], value, rtol=1e-4, atol=1e-6)


def test_training_lowers_heldout_loss_and_writes_logs(tmp_path):
    summary = Trainer(tiny_config(tmp_path, train={"steps": 12, "eval_every": 6}), echo=lambda m: None).run()
    assert summary["eval_after"]["eval_loss"] < summary["eval_before"]["eval_loss"] - 0.05
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 13))
    assert [r["step"] for r in records if "eval_loss" in r] == [0, 6, 12]
    assert all(r["tokens_per_s"] > 0 and r["grad_norm"] >= 0 for r in records if "loss" in r)


class _Recorder(Controller):
    calls: list = []

    def gradient_access(self, step):
        return "none" if step == 1 else "whole"

    def before_optimizer_step(self, ctx):
        grads = [a.lora_B.grad for a in self.adapters.values()]
        self.calls.append(("before", ctx.step, all(g is not None for g in grads)))

    def after_optimizer_step(self, ctx):
        self.calls.append(("after", ctx.step, all(a.lora_B.grad is not None for a in self.adapters.values())))


def test_controller_hooks_run_once_per_optimizer_step(tmp_path, monkeypatch):
    """With grad_accum 3, each optimizer step calls before (gradients final) then after, exactly once; the hooks
    see gradients only where declared (``gradient_access``: none in step 1; after-step hooks none), in every
    engine, as ZeRO's partitioned gradients are."""
    monkeypatch.setattr(LoraAdapter, "controller_cls", _Recorder)
    _Recorder.calls = []
    Trainer(tiny_config(tmp_path, train={"steps": 2, "micro_batch_size": 1, "grad_accum": 3}), echo=lambda m: None).run()
    assert _Recorder.calls == [("before", 0, True), ("after", 0, False), ("before", 1, False), ("after", 1, False)]


class _Undeclared(Controller):
    """Declares no gradients and no values, then writes one (``_Undeclared.writes``)."""
    writes = "grad"

    def gradient_access(self, step):
        return "none"

    def value_access(self, hook, ctx):
        return False

    @torch.no_grad()
    def before_optimizer_step(self, ctx):
        a = next(iter(self.adapters.values()))
        if self.writes == "grad":
            a.lora_B.grad = torch.ones_like(a.lora_B)
        else:
            a.lora_B.add_(1.0)


@pytest.mark.parametrize("writes", ["grad", "value"])
def test_a_hook_that_touches_what_it_declared_untouched_is_an_error(tmp_path, monkeypatch, writes):
    """A hook that sets a gradient under ``gradient_access`` none, or writes a value under ``value_access`` False,
    is refused in the single-process engine too (a partitioning engine would have dropped the write silently)."""
    monkeypatch.setattr(LoraAdapter, "controller_cls", _Undeclared)
    monkeypatch.setattr(_Undeclared, "writes", writes)
    with pytest.raises(RuntimeError, match=f"_Undeclared.before_optimizer_step of step 0 wrote .*lora_B"
                                           f"{'.grad' if writes == 'grad' else ''}.*fix its declaration"):
        Trainer(tiny_config(tmp_path, train={"steps": 1}), echo=lambda m: None).run()


def test_lr_schedule_warmup_then_cosine():
    cfg = TrainConfig(steps=10, lr=1.0, warmup_steps=2, min_lr_ratio=0.1)
    lrs = [lr_at(s, cfg) for s in range(10)]
    assert lrs[:3] == [0.5, 1.0, 1.0]
    assert all(a > b for a, b in zip(lrs[2:], lrs[3:]))
    assert math.isclose(lr_at(10, cfg), 0.1)


def test_corrupted_or_foreign_checkpoints_are_refused(tmp_path):
    """An altered checkpoint fails its checksum; a checkpoint of another config is refused on resume."""
    Trainer(tiny_config(tmp_path / "a", train={"steps": 2}), echo=lambda m: None).run()
    path = ckpt.latest_checkpoint(tmp_path / "a")
    other = tiny_config(tmp_path / "a", method={**DROPOUT, "r": 2}, train={"steps": 4})
    with pytest.raises(ValueError, match="method.r"):
        Trainer(other, resume=path, echo=lambda m: None)
    data = bytearray((path / "state.safetensors").read_bytes())
    data[len(data) // 2] ^= 1
    (path / "state.safetensors").write_bytes(bytes(data))
    with pytest.raises(BadFileError, match="checksum"):
        ckpt.load_checkpoint(path)


def test_interrupted_checkpoint_write_leaves_no_checkpoint(tmp_path, monkeypatch):
    """A write that fails midway (tensors written, metadata not) leaves neither a partial folder under the
    final name nor a temporary folder."""
    trainer = Trainer(tiny_config(tmp_path, train={"steps": 1}), echo=lambda m: None)

    def disk_full(*args):
        raise RuntimeError("disk full")

    monkeypatch.setattr(ckpt, "write_json", disk_full)
    with pytest.raises(RuntimeError, match="disk full"):
        trainer.save()
    assert ckpt.latest_checkpoint(tmp_path) is None
    assert not list((tmp_path / "checkpoints").iterdir())


@pytest.mark.parametrize("change, message", [
    ({"train": {"steps": 0}}, "train.steps: must be > 0"),
    ({"train": {"steps": 2, "learning_rate": 1}}, "train.learning_rate: unknown key"),
    ({"method": {"name": "lora", "rank": 4}}, "method.rank: unknown key"),
    ({"method": {"name": "lorax"}}, "method.name: unknown method 'lorax'"),
    ({"data": {"source": "synthetic", "format": "instruction"}}, "data.format"),
    ({"model": {"source": "tiny-llama", "dtype": "float8"}}, "model.dtype: must be one of"),
])
def test_bad_config_is_one_clear_error_naming_the_key(tmp_path, change, message):
    raw = {"model": {"source": "tiny-llama"}, "method": {"name": "lora"}, "data": {"source": "synthetic"},
           "train": {"steps": 2}, "output": {"dir": str(tmp_path)}}
    raw.update(change)
    with pytest.raises(ConfigError, match=message):
        from_dict(raw)


def test_cli_reports_bad_config_without_traceback(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {source: tiny-llama}\ntrain: {steps: -1}\n")
    assert main(["train", "--config", str(bad)]) == 2
    assert "error: train.steps: must be > 0" in capsys.readouterr().err


def test_cli_train_resume_and_export(tmp_path, capsys):
    """`dist-peft train`, `--resume` and `export` (adapter and merged) from the command line."""
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(open("configs/tiny-lora.yaml").read().replace("runs/tiny-lora", str(tmp_path / "run")))
    assert main(["train", "--config", str(cfg), "--set", "train.steps=2", "--set", "train.progress=false"]) == 0
    assert main(["train", "--config", str(cfg), "--resume", "--set", "train.steps=3",
                 "--set", "train.progress=false"]) == 0
    assert "resumed from" in capsys.readouterr().err  # the run's messages are logged (logs.py: stderr)
    last = ckpt.latest_checkpoint(tmp_path / "run")
    assert last.name == "step_0000003"
    assert main(["export", "--checkpoint", str(last), "--out", str(tmp_path / "merged"), "--merged"]) == 0
    assert main(["export", "--checkpoint", str(last), "--out", str(tmp_path / "adapter")]) == 0
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    config = load_config(cfg)
    with_adapter = build_tiny_llama(config.model.tiny)
    load_adapter(with_adapter, tmp_path / "adapter")
    assert any(s.adapter.lora_B.abs().sum() > 0 for s in adapted_sites(with_adapter).values())
    ids = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(merged(ids).logits, with_adapter(ids).logits, rtol=1e-4, atol=1e-5)


def test_loss_is_chunked_over_tokens_and_equals_the_full_vocabulary_loss():
    """causal_lm_loss with 8 positions per chunk (the batch has 48) gives the loss, argmax hits and gradients of
    F.cross_entropy on the whole batch's fp32 logits, while no tensor of more than one chunk's logits
    (8 × V) is created or saved for backward, in the forward or the backward (recomputation included)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from dist_peft.train.data import IGNORE
    from dist_peft.train.loss import causal_lm_loss

    cfg = load_config("configs/tiny-lora.yaml").model.tiny
    model, vocab, chunk = build_tiny_llama(cfg), cfg.vocab_size, 8
    ids = torch.randint(0, vocab, (3, 17), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[0, :6] = IGNORE
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    logits = model(input_ids=ids).logits.float()[:, :-1].reshape(-1, vocab)
    targets = labels[:, 1:].reshape(-1)
    reference = torch.nn.functional.cross_entropy(logits, targets, ignore_index=IGNORE, reduction="sum")
    hits = ((logits.argmax(-1) == targets) & (targets != IGNORE)).sum()
    expected = torch.autograd.grad(reference, list(model.parameters()))

    largest = {"created": 0, "saved": 0}

    def logits_shaped(t):  # (..., V), not the output weight's transpose (d × V)
        return t.dim() > 1 and t.shape[-1] == vocab and tuple(t.shape) != (cfg.hidden_size, vocab)

    class Created(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and logits_shaped(t):
                    largest["created"] = max(largest["created"], t.numel())
            return out

    def pack(t):
        if logits_shaped(t):
            largest["saved"] = max(largest["saved"], t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), Created():
        loss, correct = causal_lm_loss(model, batch, with_correct=True, budget=4 * vocab * chunk)
        grads = torch.autograd.grad(loss, list(model.parameters()))
    torch.testing.assert_close(loss, reference, rtol=1e-6, atol=0)
    assert int(correct) == int(hits)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    assert 0 < largest["created"] <= chunk * vocab < targets.numel() * vocab
    assert largest["saved"] <= chunk * vocab


SYNC_METHODS = {"lora": {"r": 4, "lora_alpha": 8}, "loca": {"n_frequency": 32}, "scalora": {"r": 4, "lora_alpha": 8}}
"""Methods whose step is checked for host synchronisations, with their options (OD-LoRA ({"r": 4}) and FRoD ({})
pass too; left out to keep the suite short)."""
METHOD_SYNCS = {"scalora": 3}
"""A method's own synchronisations per step (a constant: ScaLoRA's solve), beside the Trainer's one."""


@pytest.mark.parametrize("method", SYNC_METHODS)
def test_a_training_step_synchronises_with_the_host_a_constant_number_of_times(tmp_path, monkeypatch, method):
    """Calls that wait for the device (.item, float/int/bool of a tensor, .cpu, .tolist, .numpy, torch.equal) made by
    dist_peft code during one optimizer step: the same small number with 2 layers and 1 micro-batch as with 4 layers
    and 3 micro-batches. (torch's own AdamW reads its host-resident step counters: not device syncs, not counted.)"""
    import sys

    counts, counting_now = [], [False]

    def counting(original):
        def wrapper(*args, **kwargs):
            if counting_now[0] and "/dist_peft/" in sys._getframe(1).f_code.co_filename:
                counts[-1] += 1
            return original(*args, **kwargs)
        return wrapper

    for name in ("item", "__float__", "__int__", "__bool__", "cpu", "tolist", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, counting(getattr(torch.Tensor, name)))
    monkeypatch.setattr(torch, "equal", counting(torch.equal))
    for layers, accum in ((2, 1), (4, 3)):
        run = tmp_path / f"{layers}-{accum}"
        cfg = from_dict({"model": {"source": "tiny-llama", "tiny": {"num_hidden_layers": layers}},
                         "method": {"name": method, "target_modules": ["q_proj", "v_proj", "down_proj"],
                                    **SYNC_METHODS[method], **({"hjd_cache": str(run / "hjd")} if method == "frod" else {})},
                         "data": {"source": "synthetic", "seq_len": 16, "eval_examples": 8},
                         "train": {"steps": 4, "micro_batch_size": 2, "grad_accum": accum, "progress": False},
                         "output": {"dir": str(run)}})
        trainer = Trainer(cfg, echo=lambda m: None)
        trainer.train_step()  # first step: lazy optimizer state
        counts.append(0)
        counting_now[0] = True
        trainer.train_step()
        counting_now[0] = False
    assert counts[0] == counts[1] <= 1 + METHOD_SYNCS.get(method, 0), counts


def test_each_rank_saves_and_restores_only_its_current_cuda_generator(tmp_path, monkeypatch):
    """With CUDA present (simulated: this machine has none) a checkpoint holds the writing rank's CPU and current-device
    generators under rng/<rank>/; restoring sets the current device's generator only, whatever the device count,
    and a rank the checkpoint has no entry for (a resume on more ranks) takes rank 0's instead of failing."""
    from dist_peft.parallel import collectives

    trainer = Trainer(tiny_config(tmp_path, train={"steps": 1}), echo=lambda m: None)
    cuda_state, restored = torch.arange(16, dtype=torch.uint8), []

    def get_rng_state(device="cuda"):
        assert device == 3, f"read the generator of device {device}, not the current one"
        return cuda_state.clone()

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setattr(torch.cuda, "get_rng_state", get_rng_state)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: pytest.fail("read every device's generator"))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": restored.append((device, state)))
    c = ckpt.load_checkpoint(trainer.save())
    assert sorted(k for k in c.tensors if k.startswith("rng/")) == ["rng/0/cpu", "rng/0/cuda"]
    cpu_state = torch.get_rng_state()
    torch.rand(4)
    for rank in (0, 5):
        monkeypatch.setattr(collectives, "group_rank", lambda group=None, r=rank: r)
        ckpt.restore(c, trainer.params, trainer.optimizer, trainer.controller)
        assert torch.equal(torch.get_rng_state(), cpu_state)
    assert [(device, state.tolist()) for device, state in restored] == [(3, cuda_state.tolist())] * 2


def test_a_mixed_batch_of_instruction_and_packed_rows_keeps_each_rows_targets():
    """Multitask data concatenates instruction rows (labels: the answer) with packed causal-LM rows (labels None in
    the mixed set: every token is a target)."""
    from dist_peft.train.data import IGNORE, collate

    batch = collate([{"input_ids": [5, 6, 7], "labels": [IGNORE, 6, 7], "task_id": 0},
                     {"input_ids": [8, 9], "labels": None, "task_id": 1}], pad_id=0)
    assert batch["labels"].tolist() == [[IGNORE, 6, 7], [8, 9, IGNORE]]
    assert batch["task_ids"].tolist() == [0, 1]


def test_an_unknown_gradient_access_is_refused(tmp_path, monkeypatch):
    """A controller declaring a gradient access other than whole / local / none is refused by name, in every
    engine (``hook_access``; the ZeRO view asks the same function before any collective)."""
    monkeypatch.setattr(LoraAdapter, "controller_cls", _Undeclared)
    monkeypatch.setattr(_Undeclared, "gradient_access", lambda self, step: "Whole")
    with pytest.raises(ValueError, match="_Undeclared.gradient_access: 'Whole' is not 'whole', 'local' or 'none'"):
        Trainer(tiny_config(tmp_path, train={"steps": 1}), echo=lambda m: None).run()
