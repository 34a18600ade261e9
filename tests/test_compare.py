"""``dist-peft compare`` on the tiny model: the report and plots, resuming a killed compare without rerunning
finished runs, budget matching and its clear error, claims decided within seed noise never called wins, and
seeds that also vary the training order (held-out sets fixed, exact resume)."""

import json

import pytest
import torch
import yaml

from dist_peft.cli import main
from dist_peft.compare import claims
from dist_peft.compare.spec import load_spec, trainable_count
from dist_peft.train.checkpoint import latest_checkpoint
from dist_peft.train.config import ConfigError, from_dict
from dist_peft.train.data import build_data
from dist_peft.train.loop import Trainer


def _write(tmp_path, **changes):
    spec = {"base": {"model": {"source": "tiny-llama"},
                     "method": {"name": "lora", "target_modules": ["q_proj", "v_proj"]},
                     "data": {"source": "synthetic", "seq_len": 16, "eval_examples": 8},
                     "train": {"steps": 4, "micro_batch_size": 4, "lr": 0.01, "warmup_steps": 1, "threads": 1,
                               "progress": False},
                     "output": {"dir": str(tmp_path / "unused")}},
            "entries": [{"label": "lora", "method": {"name": "lora", "r": 4, "lora_alpha": 8}},
                        {"label": "scalora", "method": {"name": "scalora", "r": 1, "interval": 2}}],
            "budget": {"rule": "trainable_params", "reference": "lora"},
            "seeds": [0, 1], "profile": {"steps": 1, "warmup": 0}, "output": {"dir": str(tmp_path / "cmp")}}
    spec.update(changes)
    path = tmp_path / "compare.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_compare_writes_its_report_and_a_killed_compare_resumes(tmp_path, monkeypatch):
    path = _write(tmp_path)
    runs, real_run = [], Trainer.run

    def dies_on_the_third(self):
        runs.append(self.cfg.output.dir)
        if len(runs) == 3:
            raise KeyboardInterrupt("killed")
        return real_run(self)

    monkeypatch.setattr(Trainer, "run", dies_on_the_third)
    with pytest.raises(KeyboardInterrupt):
        main(["compare", "--config", str(path)])
    out = tmp_path / "cmp"
    finished = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/*/result.json")}
    assert len(finished) == 2 and (out / "profile" / "compare.json").is_file()
    assert main(["compare", "--config", str(path)]) == 0
    assert len(runs) == 3 + 2  # only the killed run and the one never started ran again
    assert {p: p.stat().st_mtime_ns for p in finished} == finished
    assert len(list((out / "runs").glob("*/*/result.json"))) == 4
    for png in ("loss_vs_step.png", "loss_vs_time.png", "heldout.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (out / png).stat().st_size > 10_000
    report = (out / "report.md").read_text()
    assert "| lora | lora | r=4 |" in report and "| scalora | scalora | r=4 |" in report  # r matched to LoRA's
    rows = {(c["claim"], c["paper"]): c for c in json.loads((out / "claims.json").read_text())}
    rank = rows[("ScaLoRA", "rank(W_T − W_0) > r")]
    assert len(rank["values"]["scalora"]) == 2 and rank["verdict"] in ("supported", "contradicted")
    assert rows[("FRoD", "faster early convergence than LoRA")]["verdict"].startswith("not tested")
    metrics = [json.loads(line) for line in (out / "runs/lora/seed1/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in metrics if "loss" in r] == [1, 2, 3, 4]  # the re-run's log holds one run


def test_budget_matching_and_an_unmeetable_budget(tmp_path):
    spec = load_spec(_write(tmp_path, entries=[
        {"label": "lora", "method": {"name": "lora", "r": 8}},
        {"label": "loca", "method": {"name": "loca", "n_frequency": 10}},
        {"label": "frod", "method": {"name": "frod"}}]))
    target = trainable_count(spec.entries[0].cfg)
    for e in spec.entries[1:]:
        assert abs(trainable_count(e.cfg) - target) <= 0.05 * target, e.label
    with pytest.raises(ConfigError, match=r"budget: frod cannot match lora's .* within 5%"):
        load_spec(_write(tmp_path, entries=[{"label": "lora", "method": {"name": "lora", "r": 64}},
                                            {"label": "frod", "method": {"name": "frod"}}]))
    assert main(["compare", "--config", str(_write(tmp_path, seeds=[]))]) == 2
    for bad in ({"budget": {"rule": "trainable_params", "tolerance": "5%"}}, {"budget": {"rules": "steps"}},
                {"entries": [{"label": "lora", "methods": {"name": "lora"}}]}):
        with pytest.raises(ConfigError):
            load_spec(_write(tmp_path, **bad))


def test_a_difference_within_seed_noise_is_not_a_win():
    assert claims._verdict([1.0, 1.2, 0.9], [1.1, 1.0, 1.15], True)[0] == "not separable at this scale"
    assert claims._verdict([1.0, 1.01, 0.99], [2.0, 2.01, 1.99], True)[0] == "supported"
    assert claims._verdict([2.0, 2.01, 1.99], [1.0, 1.01, 0.99], True)[0] == "contradicted"
    assert claims._verdict([1.0], [2.0], True)[0] == "not separable at this scale"  # one seed decides nothing


def _orders(spec, seed, examples=64):
    """The first training examples' rows (in order) and the held-out sets of one seed's run config."""
    cfg = spec.run_config(spec.entries[0], seed)
    train, evals, order = build_data(cfg.data, None, 256)
    return [train[order.index(k)]["input_ids"] for k in range(examples)], \
        {name: ds["input_ids"] for name, ds in evals.items()}


def test_vary_data_order_draws_a_training_order_per_seed_keeps_held_out_sets_and_resumes_exactly(tmp_path):
    synthetic = {"source": "synthetic", "seq_len": 16, "eval_examples": 8}
    tasks = {"seq_len": 16, "eval_examples": 8, "tasks": [{"name": "a", "source": "synthetic"},
                                                          {"name": "b", "source": "synthetic", "seed": 3}]}
    for data in (synthetic, tasks):
        base = yaml.safe_load(_write(tmp_path).read_text())["base"]
        fixed = load_spec(_write(tmp_path, base={**base, "data": data}))
        varied = load_spec(_write(tmp_path, base={**base, "data": data}, vary_data_order=True))
        assert not fixed.vary_data_order and _orders(fixed, 0) == _orders(fixed, 1)  # the default: seeds share it
        (order0, held0), (order1, held1) = _orders(varied, 0), _orders(varied, 1)
        assert order0 != order1 and held0 == held1 and held0 == _orders(fixed, 0)[1]
    for bad, match in ((dict(vary_data_order="yes"), "vary_data_order: true or false"),
                       (dict(vary_data_order=True, set={"data.order_seed": 4}), "entry lora sets data.order_seed")):
        with pytest.raises(ConfigError, match=match):
            load_spec(_write(tmp_path, **bad))
    # resume: the order seed is part of the checkpointed config, so 2 + 2 steps equal 4 straight, and a resume
    # under another order seed is refused
    spec = load_spec(_write(tmp_path, vary_data_order=True))

    def trainer(folder, steps, seed=1, **kw):
        d = spec.run_config(spec.entries[0], seed, steps).to_dict()
        d["output"]["dir"] = str(tmp_path / folder)
        return Trainer(from_dict(d), echo=lambda m: None, **kw)

    straight = trainer("straight", 4)
    straight.run()
    trainer("cut", 2).run()
    with pytest.raises(ValueError, match="data.order_seed"):
        trainer("cut", 4, seed=2, resume=latest_checkpoint(tmp_path / "cut"))
    resumed = trainer("cut", 4, resume=latest_checkpoint(tmp_path / "cut"))
    resumed.run()
    losses = [[r["loss"] for r in t.history if "loss" in r] for t in (straight, resumed)]
    assert len(losses[0]) == 4 and losses[1] == losses[0][2:]
    assert all(torch.equal(p, straight.params[n]) for n, p in resumed.params.items())
