"""`dist-peft plan`: one layout from flags or a config, the layout search, refusals with their reason (from plan
and from train, before any weight is read), the recommended cluster configs, and width-growing method costs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dist_peft.accounting.memory import GIB
from dist_peft.accounting.plan import check_fits, make_plan, search, shape_of
from dist_peft.accounting.presets import load_preset
from dist_peft.accounting.roofline import get_gpu
from dist_peft.accounting.shape import ModelShape
from dist_peft.cli import main
from dist_peft.train.config import load_config

SCALE = sorted(Path(__file__).resolve().parents[1].glob("configs/scale/*.yaml"))


def _run(capsys, *argv) -> tuple[int, str, str]:
    rc = main(["plan", *argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_flag_plan_reports_bytes_flops_collectives_and_throughput(capsys):
    """70B LoRA, TP8 on 8 H100s with full recompute: a stage table, FLOPs, TP collectives and a prediction."""
    rc, out, _ = _run(capsys, "--model", "llama-3.1-70b", "--gpus", "8", "--tp", "8", "--recompute", "full",
                      "--global-batch", "32")
    assert rc == 0
    report = json.loads(out[out.index("{"):])
    (stage,) = report["stages_gib"]
    assert 16 < stage["frozen"] < 17  # 141 GB of bf16 weights over 8 ranks
    assert report["executed_tflop_per_step"] > report["model_tflop_per_step"] > 0  # + the recomputed forward
    assert {c["axis"] for c in report["collectives"]} == {"tensor"}
    assert report["fits"] and report["tokens_per_s_per_gpu"] > 0


def test_a_layout_that_cannot_fit_is_an_error_naming_the_reason(capsys):
    """70B on one 80 GB GPU: exit 2 and one error line with the stage's bytes and the largest parts."""
    rc, _, err = _run(capsys, "--model", "llama-3.1-70b", "--gpus", "1")
    assert rc == 2 and "does not fit" in err and "frozen 131" in err


def test_search_ranks_fitting_layouts_and_drops_the_others_with_reasons():
    """16 GPUs, 70B: fitting layouts come first, ranked by predicted tokens/s/GPU; the others name why."""
    shape = ModelShape.from_hf(load_preset("llama-3.1-70b"))
    method = load_config(SCALE[0]).method if SCALE else None
    plans = search(shape, method, 16, get_gpu("h100-80gb"), 4096, 32)
    fitting = [p for p in plans if p.fits]
    assert fitting and len(fitting) < len(plans)
    speeds = [p.tokens_per_s_per_gpu for p in fitting]
    assert speeds == sorted(speeds, reverse=True)
    reasons = {q for p in plans if not p.fits for q in p.problems}
    assert any("GiB usable" in r for r in reasons) and any("num_hidden_layers 80 %" in r for r in reasons)


@pytest.mark.parametrize("path", SCALE, ids=[p.stem for p in SCALE])
def test_every_scale_config_fits_on_its_gpus(path, capsys):
    """Each configs/scale run config fits (plan --config, the GPU count in its header)."""
    gpus = int(path.read_text().split("--gpus ")[1].split()[0])
    rc, out, err = _run(capsys, "--config", str(path), "--gpus", str(gpus), "--gpu", "h100-80gb")
    assert rc == 0, err
    assert json.loads(out[out.index("{"):])["fits"]


def test_train_refuses_a_weights_folder_that_is_not_the_preset(tmp_path, capsys):
    """`train` with model.preset compares the folder's config.json before reading any weight (there are none)."""
    fields = {**load_preset("mistral-nemo-base-2407"), "head_dim": 160}
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "config.json").write_text(json.dumps(fields))
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model: {{preset: mistral-nemo-base-2407, source: {tmp_path / 'w'}}}\n"
                   f"data: {{source: synthetic}}\ntrain: {{steps: 1}}\noutput: {{dir: {tmp_path / 'run'}}}\n")
    assert main(["train", "--config", str(cfg)]) == 2
    assert "head_dim: preset 128, folder 160" in capsys.readouterr().err


def test_train_check_refuses_a_layout_larger_than_the_gpu(tmp_path):
    """With a device memory known (a GPU), the check runs the plan; the tiny model does not fit in 1 KiB."""
    from conftest import tiny_config

    cfg = tiny_config(tmp_path)
    check_fits(cfg, 1, None)  # CPU: no memory size, nothing to check
    check_fits(cfg, 1, 80 * GIB)
    with pytest.raises(ValueError, match="does not fit"):
        check_fits(cfg, 1, get_gpu("h100-80gb").reserved + 1024)


def test_frod_flags_its_width_growing_basis():
    """FRoD with down_proj on the input side: the 28672 x 28672 fp32 basis (3.3 GB) is flagged, not averaged."""
    from types import SimpleNamespace

    from dist_peft.methods.frod import FrodConfig

    method = SimpleNamespace(name="frod", options=FrodConfig(output_side_modules=("o_proj",)),
                             target_modules=("down_proj",))
    from dist_peft.accounting.memory import Layout

    plan = make_plan(shape_of(SimpleNamespace(preset="llama-3.1-70b")), method, Layout(tp=8, recompute="full"),
                     get_gpu("h100-80gb"))
    assert any("28672x28672" in w and "6.12 GiB" in w for w in plan.width_costs), plan.width_costs
    assert plan.stages[0].buffers >= 2 * 28672**2 * 4


def test_zero_plans_deepspeeds_reduction_bucket(tmp_path):
    """Under ZeRO (every stage) the plan's buffers hold DeepSpeed's fp32 gradient-reduction bucket,
    ``reduce_bucket_size`` elements allocated whole (measured on every rank at stages 1-3): by default the rank's
    trainable count, capped at DeepSpeed's 5e8 (2 GB), which ``ds_config`` hands DeepSpeed; a config's
    ``deepspeed.reduce_bucket_size`` sizes it; without ZeRO there is none."""
    from conftest import tiny_config

    from dist_peft.accounting.memory import stage_memory
    from dist_peft.accounting.plan import layout_of

    def buffers(**sections):
        cfg = tiny_config(tmp_path, **sections)
        return [s.buffers for s in stage_memory(shape_of(cfg.model), cfg.method, layout_of(cfg, 2))]

    from dist_peft.accounting.flops import param_counts
    from dist_peft.accounting.memory import reduce_bucket_elements
    from dist_peft.integrations.deepspeed import ds_config

    cfg = tiny_config(tmp_path)
    trainable = param_counts(shape_of(cfg.model), cfg.method).trainable
    assert buffers() == [0]
    for stage in (1, 2, 3):
        assert buffers(deepspeed={"zero_stage": stage}) == [4 * trainable]
    assert buffers(deepspeed={"zero_stage": 2, "reduce_bucket_size": 1000}) == [4000]
    ds = tiny_config(tmp_path, deepspeed={"zero_stage": 2})
    assert ds_config(ds, 2, trainable)["zero_optimization"]["reduce_bucket_size"] == trainable
    assert "reduce_bucket_size" not in ds_config(ds, 2)["zero_optimization"]  # before the adapters exist
    assert reduce_bucket_elements(None, 10**12) == 5 * 10**8 and reduce_bucket_elements(1000, 10**12) == 1000
