"""DeepSpeed ZeRO-1/2/3 on two gloo processes against the single-process plain engine on the same global batch:
losses and adapter weights, checkpoints of whole tensors (ZeRO-3 → one process, exact resume, merged export),
the gather access point, controllers that write gradients, weights and Adam moments, and config errors.

Launch: pytest tests/test_deepspeed.py (one spawned group of 2 ranks runs every distributed check: process
start-up dominates, so the stages share it)."""

from __future__ import annotations

import contextlib
import math
import pickle
import weakref
from pathlib import Path

import pytest
import torch

from accounting_checks import planned_state_bytes, record_state_bytes
from conftest import tiny_config
from distributed import run_dist
from dist_peft.integrations.transformers import adapted_sites
from dist_peft.methods.base import Controller
from dist_peft.parallel import collectives
from dist_peft.train import checkpoint as ckpt
from dist_peft.train.config import ConfigError, check_world_size, from_dict
from dist_peft.train.export import export
from dist_peft.train.loop import Trainer
from dist_peft.train.models import load_model, model_folder, pretrained_partitioned

WORLD, GLOBAL_BATCH = 2, 4
TRAIN = {"steps": 3, "micro_batch_size": GLOBAL_BATCH // WORLD, "grad_accum": 2, "weight_decay": 0.01, "threads": 1}
RESUME_TRAIN = {**TRAIN, "steps": 4, "save_every": 2, "keep_checkpoints": 3}
DROPOUT = {"lora_dropout": 0.1}  # the resumed run must restore the RNG to draw the same masks
# Every tensor of the tiny model partitioned, and released right after each use (DeepSpeed keeps small models
# whole by default), so that the gather access points are really needed.
ZERO3 = {"zero_stage": 3, "param_persistence_threshold": 0, "max_live_parameters": 0, "max_reuse_distance": 0,
         "prefetch_bucket_size": 0}
PROBE = torch.arange(2 * 12).reshape(2, 12) % 250
TARGETS = ["q_proj", "v_proj", "down_proj"]
METHOD_TRAIN = {**TRAIN, "steps": 6, "grad_accum": 1}
METHODS = {  # every other registered method: (method section, other sections); each runs under ZeRO-1, 2 and 3
    "odlora": ({"r": 4, "init_rounds": 2, "init_steps": 2}, {}),  # SVD events at steps 2 and 4: clear()
    # forward reads the frozen W. Not v_proj: on the tiny model its FRoD gradients are so small that Adam turns
    # the rounding of any other reduction order into visible updates (the plain 2-rank engine differs from one
    # process by 2e-4 there too).
    "frod": ({"sparse_rate": 0.05, "s_lr": 0.005, "target_modules": ["q_proj", "o_proj", "down_proj"]}, {}),
    "folora": ({"r": 4, "num_tasks": 2, "calibration_batches": 2, "refit_every": 3},
               {"data": {"source": None, "tasks": [{"name": "a", "source": "synthetic", "seed": 1},
                                                   {"name": "b", "source": "synthetic", "seed": 2}]}}),
    "scalora": ({"r": 8, "interval": 1, "lipschitz": 10.0}, {}),  # grads, weights, moments, frozen W; r = 8 meets
    # binding bounds of the NNLS solve (tests/test_scalora.py::test_zero_test_run_meets_binding_bounds), r = 4 does not
    "loca": ({"n_frequency": 64, "coef_steps": 2, "loc_steps": 3, "alternate_until": 10, "loc_lr": 0.01}, {}),
}
"""Sized to reach each method's controller work within 6 steps; loca alternates tensors without gradient and
has two optimizer groups (the ZeRO-1/2 state linking), folora records activation gradients in hooks."""


def _cfg(run_dir, world, deepspeed=None, train=TRAIN, **sections):
    """The same run for `world` ranks: the global batch stays GLOBAL_BATCH × grad_accum."""
    train = {**train, "micro_batch_size": train["micro_batch_size"] * WORLD // world}
    cfg = tiny_config(run_dir, train=train, **sections)
    if deepspeed is None:
        return cfg
    return from_dict({**cfg.to_dict(), "deepspeed": deepspeed})


class _Rescaler(Controller):
    """A controller that writes all three things ZeRO partitions: halves lora_B's gradient before the step,
    multiplies its Adam moments by 1.5 / 2.25 (optimizer-state interface), and scales lora_A by 0.9 after
    the step; under ZeRO-3 it also reads a frozen weight through ctx.gathered."""

    def before_optimizer_step(self, ctx):
        adapters = list(self.adapters.values())
        for a in adapters:
            a.lora_B.grad.mul_(0.5)
        ctx.optim_state.scale_moments_([a.lora_B for a in adapters], [torch.tensor(1.5)] * len(adapters))
        first = next(iter(self.adapters.values())).site.weight
        with ctx.gathered([first]):
            self.weight_sum = float(first.double().sum())

    @torch.no_grad()
    def after_optimizer_step(self, ctx):
        for a in self.adapters.values():
            a.lora_A.mul_(0.9)


STAGES = (1, 2, 3)
BF16_METHODS = {"lora": ({"r": 4, "lora_alpha": 8}, {}), **METHODS}
TIGHT = {"rtol": 2e-5, "atol": 2e-5}
"""bf16 runs against a one-process run of the same micro-batches: the fp32 methods' tolerance (fp32 sums of the
ranks' gradients and DeepSpeed's own norm in another order; measured: bitwise for LoRA and LoCA, 2e-7 for FRoD)."""
DEPTHS = (1, 3)
"""Decoder layers of the two models whose collectives per controller hook are compared."""


def _bf16_cfg(root, name, world, stage=None):
    """The method's run with bf16 frozen weights and bf16 autocast on `world` ranks under ZeRO `stage` (None: the
    plain engine). One process takes the WORLD ranks' micro-batches one after another (grad_accum × WORLD, FO-LoRA's
    calibration batches × WORLD): every bf16 product then sees the rows it sees on a rank, and only fp32 sums
    (gradient accumulation here, DeepSpeed's reduction there) join them."""
    options, sections = BF16_METHODS[name]
    split = WORLD // world
    method = {"name": name, "target_modules": TARGETS, **options}
    if "calibration_batches" in method:
        method["calibration_batches"] *= split
    train = {**METHOD_TRAIN, "precision": "bf16", "grad_accum": METHOD_TRAIN["grad_accum"] * split}
    raw = tiny_config(f"{root}/bf16-{name}-{world}-z{stage}", train=train, model={"dtype": "bfloat16"},
                      **sections).to_dict()
    if stage is not None:
        raw["deepspeed"] = ZERO3 if stage == 3 else {"zero_stage": stage}
    return from_dict({**raw, "method": method})


def _method_cfg(root, world, name, stage=None):
    """The method's run on `world` ranks under ZeRO `stage` (None: the plain engine)."""
    options, sections = METHODS[name]
    method = {"name": name, "target_modules": TARGETS, **options}  # options may name other targets
    zero = None if stage is None else ZERO3 if stage == 3 else {"zero_stage": stage}
    raw = _cfg(f"{root}/{name}-{world}-z{stage}", world, zero, train=METHOD_TRAIN, **sections).to_dict()
    return from_dict({**raw, "method": method})  # the whole section: tiny_config would merge LoRA's keys in


_COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "reduce_scatter_tensor",
                "reduce_scatter", "all_to_all_single", "reduce", "gather", "scatter", "all_gather_object", "barrier")


@contextlib.contextmanager
def _counting_collectives():
    """Inside: every torch.distributed collective call (ours through parallel/collectives.py, DeepSpeed's through
    deepspeed.comm, whose backend also holds all_gather_into_tensor and reduce_scatter_tensor bound at its start:
    ZeRO-3's parameter gathers) is counted in the yielded list's one element."""
    import torch.distributed as dist
    from deepspeed.comm import comm

    backend = [(comm.cdb, name) for name in ("all_gather_function", "reduce_scatter_function")
               if getattr(comm.cdb, name, None) is not None]
    targets = [(dist, name) for name in _COLLECTIVES] + backend
    calls, saved = [0], [(owner, name, getattr(owner, name)) for owner, name in targets]

    def counted(fn):
        def call(*args, **kwargs):
            calls[0] += 1
            return fn(*args, **kwargs)
        return call

    for owner, name, fn in saved:
        setattr(owner, name, counted(fn))
    try:
        yield calls
    finally:
        for owner, name, fn in saved:
            setattr(owner, name, fn)


def _counted_hooks(trainer) -> list[tuple[int, str, int]]:
    """Filled while ``trainer`` runs: (step, hook, torch.distributed calls) of each controller hook that runs,
    its engine view (gathers, gradients, write-back) included."""
    hooks, run = [], trainer.ds._run_hook

    def counted(controller, name, ctx):
        with _counting_collectives() as calls:
            run(controller, name, ctx)
        hooks.append((ctx.step, name, calls[0]))

    trainer.ds._run_hook = counted
    return hooks


def _hook_collectives(root, stage, layers) -> dict:
    """Collective calls of each controller hook (its engine view included) in one step of the _Rescaler run on a
    model with `layers` decoder layers."""
    zero = ZERO3 if stage == 3 else {"zero_stage": stage}
    t = Trainer(_cfg(f"{root}/count-z{stage}-{layers}", WORLD, zero, train={**TRAIN, "grad_accum": 1},
                     model={"tiny": {"num_hidden_layers": layers}}), echo=lambda m: None)
    t.controller = _Rescaler(t.controller.adapters)
    hooks = _counted_hooks(t)
    t.train_step()
    return {"counts": {name: calls for _, name, calls in hooks}, "tensors": len(t.params)}


def _traced_steps(trainer) -> list[dict[str, int]]:
    """Filled while ``trainer`` runs: the traced collective calls (``collectives.TRACE``, ours only) of each step."""
    steps, step = [], trainer.train_step

    def traced():
        collectives.TRACE.reset()
        try:
            return step()
        finally:
            steps.append(collectives.TRACE.reset()["calls"])

    trainer.train_step = traced
    return steps


def _bf16_run(root, name, stage):
    """A bf16 run of the method under ZeRO `stage` on WORLD ranks: logits at init through the engine, the dtypes of
    the trainable tensors and of DeepSpeed's reductions, and the record."""
    t = Trainer(_bf16_cfg(root, name, WORLD, stage), echo=lambda m: None)
    with t._autocast():
        init = _probe_logits(t)
    out = {"init": init, "dtypes": {str(p.dtype) for p in t.params.values()},
           "comm": str(t.ds.engine.communication_data_type)}
    t.run()
    return {**out, **_record(t)}


def _record(trainer):
    """Losses and whole adapter tensors of a finished run (whole tensors gathered on every rank)."""
    losses = [r["loss"] for r in trainer.history if "loss" in r]
    params = trainer.ds.full_params() if trainer.ds is not None else trainer.params
    return {"losses": losses, "params": {n: p.detach().numpy().copy() for n, p in params.items()}}


def _probe_logits(trainer):
    trainer.model.eval()
    with torch.no_grad():
        model = trainer.model if trainer.ds is None else trainer.ds.module
        return model(input_ids=PROBE, attention_mask=torch.ones_like(PROBE)).logits.float().numpy().copy()


def _zero3_access(trainer) -> dict:
    """The frozen weights are partitioned; `gathered` makes them whole (and writable); the adapters' forward
    sees Site.weight whole."""
    from dist_peft.integrations.deepspeed import gathered

    site = next(iter(adapted_sites(trainer.model).values()))
    weight = site.base_layer.weight
    seen = []
    hook = site.adapter.register_forward_pre_hook(lambda m, args: seen.append(m.site.weight.numel()))
    _probe_logits(trainer)
    hook.remove()
    partitioned = weight.numel()
    with gathered([weight]):
        whole = float(weight.double().sum())
    with gathered([weight], modify=True):
        weight.mul_(2.0)
    with gathered([weight], modify=True):
        doubled = float(weight.double().sum())
        weight.mul_(0.5)
    return {"partitioned": partitioned, "seen": seen, "whole": whole, "doubled": doubled,
            "numel": site.adapter.site.out_features * site.adapter.site.in_features}


LOAD_LAYERS = 8
"""Decoder layers of the model loaded under ZeRO-3: deep enough that a whole copy exceeds a share plus one layer."""


@contextlib.contextmanager
def _parameter_bytes_peak():
    """Inside: the peak bytes of parameter storage live in this process, over every ``nn.Parameter`` created inside
    (whole values and ZeRO-3 partitions, each storage counted once), sampled after every torch function call; the
    yielded list's one element holds it."""
    from torch.overrides import TorchFunctionMode

    live, peak, new = weakref.WeakSet(), [0], torch.nn.Parameter.__new__

    def tracked(cls, data=None, requires_grad=True):
        p = new(cls, data, requires_grad)
        live.add(p)
        return p

    def sample():
        storages = {}
        for p in list(live):
            for t in (p.data, getattr(p, "ds_tensor", None)):
                if t is not None and t.device.type != "meta" and t.untyped_storage().nbytes():
                    storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        peak[0] = max(peak[0], sum(storages.values()))

    class Sampler(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            sample()
            return out

    torch.nn.Parameter.__new__ = staticmethod(tracked)
    try:
        with Sampler():
            yield peak
        sample()
    finally:
        torch.nn.Parameter.__new__ = new


def _load_peaks(root: str) -> dict:
    """Peak parameter bytes on this rank while the LOAD_LAYERS-layer tiny model loads: unpartitioned (``load_model``,
    what every rank did before issue 13) and partitioned under ZeRO-3 from its folder (``pretrained_partitioned``,
    the Trainer's path through ``load_partitioned``); the bound is this rank's partitions of every tensor plus one
    decoder layer whole."""
    from dist_peft.integrations.deepspeed import ds_config

    cfg = _cfg(f"{root}/load", WORLD, ZERO3, model={"tiny": {"num_hidden_layers": LOAD_LAYERS}})
    with _parameter_bytes_peak() as before:
        load_model(cfg.model)
    folder, tok = model_folder(cfg.model, Path(cfg.output.dir), collectives.group_rank() == 0)  # whole on rank 0:
    with _parameter_bytes_peak() as after:  # the tiny model is built in code (load_partitioned)
        model = pretrained_partitioned(folder, cfg.model, ds_config(cfg, WORLD), tok)
    params = dict(model.named_parameters())
    size = params["model.embed_tokens.weight"].element_size()
    layer = sum(p.ds_numel for n, p in params.items() if n.startswith("model.layers.0.")) * size
    share = sum(p.ds_tensor.numel() for p in params.values()) * size
    return {"before": before[0], "after": after[0], "whole": sum(p.ds_numel for p in params.values()) * size,
            "bound": share + layer, "partitioned": all(p.numel() == 0 for p in params.values())}


def _zero_runs(root: str) -> dict:
    """Every distributed check on one group: ZeRO-1/2/3 (fp32), ZeRO-2 bf16, ZeRO-3 with a writing controller,
    and a ZeRO-3 run stopped at step 2 and resumed."""
    out = {"load": _load_peaks(root)}
    for stage in (1, 2, 3):
        zero = ZERO3 if stage == 3 else {"zero_stage": stage}
        t = Trainer(_cfg(f"{root}/z{stage}", WORLD, zero), echo=lambda m: None)
        state = record_state_bytes(t)
        traced = _traced_steps(t)
        t.run()
        out[f"z{stage}"] = {**_record(t), "state": state, "planned_state": planned_state_bytes(t.cfg, WORLD, 0),
                            "traced": traced}
    out["z3"]["probe"] = _probe_logits(t)
    out["z3"]["access"] = _zero3_access(t)
    t = Trainer(_cfg(f"{root}/bf16", WORLD, {"zero_stage": 2}, train={**TRAIN, "precision": "bf16"}),
                echo=lambda m: None)
    t.run()
    out["bf16"] = _record(t)
    t = Trainer(_cfg(f"{root}/ctl", WORLD, ZERO3), echo=lambda m: None)
    t.controller = _Rescaler(t.controller.adapters)
    t.run()
    out["ctl"] = {**_record(t), "weight_sum": t.controller.weight_sum}
    straight = Trainer(_cfg(f"{root}/straight", WORLD, ZERO3, train=RESUME_TRAIN, method=DROPOUT),
                       echo=lambda m: None)
    straight.run()
    out["straight"] = _record(straight)
    resumed = Trainer(_cfg(f"{root}/straight", WORLD, ZERO3, train=RESUME_TRAIN, method=DROPOUT),
                      echo=lambda m: None, resume=ckpt.checkpoint_dir(straight.run_dir, 2))
    resumed.run()
    out["resumed"] = _record(resumed)
    for name in METHODS:  # a method failing here is reported by its own assertion, not by the whole group
        for stage in STAGES:
            try:
                t = Trainer(_method_cfg(root, WORLD, name, stage), echo=lambda m: None)
                state, traced, hooks = record_state_bytes(t), _traced_steps(t), _counted_hooks(t)
                t.run()
                out[name, stage] = {**_record(t), "state": state, "hooks": hooks,
                                    "planned_state": planned_state_bytes(t.cfg, WORLD, 0), "traced": traced}
            except Exception as e:  # noqa: BLE001 — handed to the test
                out[name, stage] = f"{type(e).__name__}: {e}"
    for stage in (2, 3):  # LoCA's hook on whole gradients, as before issue 16
        t = Trainer(_method_cfg(f"{root}/whole", WORLD, "loca", stage), echo=lambda m: None)
        t.controller.gradient_access = lambda step: "whole"
        t.run()
        out["loca-whole", stage] = _record(t)
    for name in BF16_METHODS:
        for stage in STAGES:
            try:
                out["bf16", name, stage] = _bf16_run(root, name, stage)
            except Exception as e:  # noqa: BLE001 — handed to the test
                out["bf16", name, stage] = f"{type(e).__name__}: {e}"
    for stage in STAGES:
        for layers in DEPTHS:
            out["count", stage, layers] = _hook_collectives(root, stage, layers)
    # Results go through a file: a large result in the harness's queue would block the worker's exit.
    with open(f"{root}/result_{collectives.group_rank()}.pkl", "wb") as f:
        pickle.dump(out, f)


@pytest.fixture(scope="module")
def zero_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("zero")
    run_dist(_zero_runs, WORLD, root=str(root))
    return root, {r: pickle.loads((root / f"result_{r}.pkl").read_bytes()) for r in range(WORLD)}


@pytest.mark.parametrize("name", list(METHODS))
def test_every_other_method_under_zero_matches_the_single_process_run(zero_runs, tmp_path, name):
    """Each registered method runs unchanged under ZeRO-1, ZeRO-2 and ZeRO-3 on 2 ranks with the losses and
    adapter weights of its single-process run: its controller's reads and writes of gradients, weights, Adam
    moments (optimizer-state interface) and frozen weights (ctx.gathered) reach DeepSpeed's partitions."""
    _, results = zero_runs
    t = Trainer(_method_cfg(tmp_path, 1, name), echo=lambda m: None)
    t.run()
    for stage in STAGES:
        got = results[0][name, stage]
        assert not isinstance(got, str), (stage, got)
        _assert_same_run(got, _record(t), rtol=2e-5, atol=2e-5)


def test_planned_zero_state_bytes_equal_deepspeeds_tensors(zero_runs):
    """dist-peft plan's per-rank frozen, adapter, gradient and optimizer bytes under ZeRO-1, 2 and 3 equal the
    distinct storages DeepSpeed holds on each rank at their peak (tests/accounting_checks.py: ZeRO-3's partitions,
    the padded flat adapter buffer, gradient partitions, fp32 master partitions, AdamW moments; ZeRO-1's whole
    gradients at the end of the last backward, before DeepSpeed reduces them; its reduction bucket on its own:
    ``reduce_bucket_size`` fp32 elements at every stage, by default the rank's trainable count), for LoRA
    (accumulation 2), OD-LoRA (whose bases are buffers) and the two-group methods (FRoD's S under s_lr, LoCA's locations: each group flattened, padded and
    stepped on its own). One data rank: ``test_planned_zero1_state_bytes_on_one_rank``."""
    _, results = zero_runs
    for r in results.values():
        for key in ("z1", "z2", "z3", *((m, s) for m in ("odlora", "frod", "loca") for s in STAGES)):
            got = r[key]
            assert not isinstance(got, str), (key, got)
            assert got["state"] == got["planned_state"], key


def test_collectives_per_zero_controller_hook_do_not_grow_with_the_layers(zero_runs):
    """Under ZeRO-1, 2 and 3 each controller hook, with the engine's view of whole values, gradients and moments,
    makes as many torch.distributed calls (DeepSpeed's included) on a model of 3 decoder layers as on one of 1
    (3× the trainable tensors), and at most 3: one flat buffer per hook, not one call per tensor."""
    _, results = zero_runs
    for stage in STAGES:
        few, many = (results[0]["count", stage, layers] for layers in DEPTHS)
        assert many["tensors"] == DEPTHS[1] * few["tensors"]
        assert set(few["counts"]) == {"before_optimizer_step", "after_optimizer_step"}
        assert few["counts"] == many["counts"], (stage, few, many)
        assert max(few["counts"].values()) <= 3, (stage, few)


def test_zero2_hooks_without_whole_gradients_add_no_collective(zero_runs):
    """Under ZeRO-2 the traced collectives (``collectives.TRACE``) of every step of LoCA (``gradient_access``
    local: it drops a tensor's gradient and clamps loca_loc's elementwise, on this rank's part) and of FO-LoRA's
    steps without a refit (none) are LoRA's, the loop's 2 step scalars: the controller view adds no collective
    (before issue 16 it added one all-reduce of the whole adapter gradient per step). FO-LoRA's refit steps (2 and
    5) read whole gradients: one all-gather of the fragments (the first time also the fragment layout's
    all_gather_object), not an all-reduce of a zero-filled whole. LoCA's run on local gradients is bitwise its
    run on whole ones (ZeRO-2 and ZeRO-3)."""
    _, results = zero_runs
    for r in results.values():
        lora = r["z2"]["traced"]
        assert lora == [{"all_reduce": 2}] * TRAIN["steps"], lora
        assert r["loca", 2]["traced"] == lora[:1] * METHOD_TRAIN["steps"], r["loca", 2]["traced"]
        folora = r["folora", 2]["traced"]
        assert len(folora) == METHOD_TRAIN["steps"]
        for step, calls in enumerate(folora):
            if step in (2, 5):
                assert calls["all_gather"] == 1 and calls.get("all_gather_object", 0) == (step == 2), (step, calls)
            else:
                assert calls == lora[0], (step, calls)
        for stage in (2, 3):
            local, whole = r["loca", stage], r["loca-whole", stage]
            assert local["losses"] == whole["losses"], stage
            for name, value in whole["params"].items():
                assert (local["params"][name] == value).all(), (stage, name)


def test_hooks_declaring_no_values_or_whole_gradients_make_no_collective(zero_runs):
    """Under ZeRO-1, 2 and 3, counting every torch.distributed call (DeepSpeed's included) of each controller hook
    and its engine view: LoCA's before-step hooks (local gradients, no values: under ZeRO-3 a NaN placeholder of
    each tensor's shape, not a gather), its after-step hooks outside location steps, and FO-LoRA's hooks outside
    refit steps (no gradients, no values) make none; before issue 16's ``value_access`` every ZeRO-3 hook made
    one all-gather of the adapter's values. LoCA's location steps gather (ZeRO-3: DeepSpeed's coalesced
    all-gather) or need nothing (ZeRO-1/2)."""
    _, results = zero_runs
    loca = dict(METHODS["loca"][0])
    for r in results.values():
        for stage in STAGES:
            for step, hook, calls in r["loca", stage]["hooks"]:
                location = step % (loca["coef_steps"] + loca["loc_steps"]) >= loca["coef_steps"] \
                    and step < loca["alternate_until"]
                gathers = hook == "after_optimizer_step" and location and stage == 3
                assert 0 < calls <= 3 if gathers else calls == 0, (stage, step, hook, calls)
            hooks = r["folora", stage]["hooks"]
            assert len(hooks) == 2 * METHOD_TRAIN["steps"]
            assert all(calls == 0 for step, hook, calls in hooks if step not in (2, 5)), (stage, hooks)


def _single(tmp_path, name, controller=None, **kw):
    t = Trainer(_cfg(tmp_path / name, 1, **kw), echo=lambda m: None)
    if controller is not None:
        t.controller = controller(t.controller.adapters)
    t.run()
    return t, _record(t)


def _assert_same_run(got, want, rtol=1e-5, atol=1e-6):
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(want["losses"]), rtol=rtol, atol=0)
    for name, value in want["params"].items():
        torch.testing.assert_close(torch.from_numpy(got["params"][name]), torch.from_numpy(value), rtol=rtol,
                                   atol=atol, msg=name)


def test_zero_stages_1_2_3_match_the_single_process_run(zero_runs, tmp_path):
    """ZeRO-1, ZeRO-2 and ZeRO-3 (every tensor partitioned) on 2 ranks give the single-process losses and
    adapter weights (fp32, weight decay, accumulation 2, clipping on); both ranks hold the same values. bf16
    ZeRO-2 (bf16 weights, fp32 master copy) gives the fp32 losses within bf16 rounding; its weights are not
    compared elementwise: Adam's first steps move each weight by about ±lr whatever the gradient's size, so
    bf16 rounding of near-zero gradients flips single updates."""
    _, results = zero_runs
    _, want = _single(tmp_path, "single")
    assert len(want["losses"]) == 3 and want["losses"][0] > want["losses"][-1]
    for key in ("z1", "z2", "z3"):
        _assert_same_run(results[0][key], want)
        _assert_same_run(results[1][key], results[0][key], rtol=0, atol=0)
    torch.testing.assert_close(torch.tensor(results[0]["bf16"]["losses"]), torch.tensor(want["losses"]), rtol=2e-3,
                               atol=0)
    _assert_same_run(results[1]["bf16"], results[0]["bf16"], rtol=0, atol=0)


def test_controller_writes_reach_the_partitions_under_zero3(zero_runs, tmp_path):
    """A controller that scales gradients, Adam moments and weights (through .grad, ctx.optim_state and the
    tensors themselves, as in the plain engine) gives under ZeRO-3 the run it gives in one process; the
    frozen weight it reads through ctx.gathered is the whole one."""
    _, results = zero_runs
    single, want = _single(tmp_path, "single", controller=_Rescaler)
    _, plain = _single(tmp_path, "plain")
    assert not math.isclose(want["losses"][-1], plain["losses"][-1], rel_tol=1e-4), "the controller must act"
    _assert_same_run(results[0]["ctl"], want)
    assert math.isclose(results[0]["ctl"]["weight_sum"], single.controller.weight_sum, rel_tol=1e-12)


def test_zero3_partitions_frozen_weights_and_gathers_them_on_request(zero_runs):
    """Under ZeRO-3 (tensors released right after use) a frozen weight is an empty shard outside a forward; the
    adapter's forward sees it whole (the engine's external-parameter registration: without it the adapter sees
    an empty shard, checked by hand); `gathered` gives the whole value, and with modify=True a write reaches
    every rank's shard."""
    _, results = zero_runs
    for r in results.values():
        a = r["z3"]["access"]
        assert a["partitioned"] == 0 and a["seen"] == [a["numel"]]
        assert math.isclose(a["doubled"], 2 * a["whole"], rel_tol=1e-12)


def test_zero3_loading_holds_a_share_plus_one_layer_per_rank(zero_runs):
    """Under ZeRO-3 the model is built partitioned (``load_partitioned``): no rank ever holds more parameter bytes
    than its share of every tensor plus one decoder layer, on a model whose whole copy exceeds that bound (the
    unpartitioned load holds the whole model on each rank); every frozen tensor arrives partitioned."""
    _, results = zero_runs
    for r in results.values():
        load = r["load"]
        assert load["whole"] > load["bound"] and load["before"] >= load["whole"]
        assert load["partitioned"] and load["after"] <= load["bound"], load


def test_zero3_checkpoint_loads_in_one_process_resumes_exactly_and_exports(zero_runs, tmp_path):
    """A ZeRO-3 checkpoint holds whole tensors: loaded by the single-process engine it gives the ZeRO-3
    model's outputs exactly; resuming it under ZeRO-3 reproduces the straight run bitwise (dropout on and
    accumulation 2: RNG and data position restored); the merged export from it equals the adapter model."""
    root, results = zero_runs
    ckpt_dir = ckpt.checkpoint_dir(root / "z3", 3)
    c = ckpt.load_checkpoint(ckpt_dir)
    assert all(t.numel() > 0 for t in c.tensors.values())
    plain = from_dict({k: v for k, v in c.config.items() if k != "deepspeed"})  # the same run, plain engine
    single = Trainer(plain, echo=lambda m: None, resume=ckpt_dir)
    assert single.ds is None and single.step == 3
    assert torch.equal(torch.from_numpy(_probe_logits(single)), torch.from_numpy(results[0]["z3"]["probe"]))
    straight, resumed = results[0]["straight"], results[0]["resumed"]
    assert resumed["losses"] == straight["losses"][2:]
    _assert_same_run(resumed, {"losses": straight["losses"][2:], "params": straight["params"]}, rtol=0, atol=0)
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(export(ckpt_dir, tmp_path / "merged", merged=True))
    with torch.no_grad():
        logits = merged(input_ids=PROBE, attention_mask=torch.ones_like(PROBE)).logits
    torch.testing.assert_close(logits, torch.from_numpy(results[0]["z3"]["probe"]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("section, message", [
    ({"zero_stage": 0}, "deepspeed.zero_stage: must be 1, 2 or 3, got 0"),
    ({"zero_stage": 4}, "deepspeed.zero_stage: must be 1, 2 or 3, got 4"),
    ({"train_batch_size": 6}, "deepspeed.train_batch_size: 6 is not a multiple of"),
    ({"stage": 2}, "deepspeed.stage: unknown key"),
    ({"param_persistence_threshold": -1}, "deepspeed.param_persistence_threshold: must be >= 0"),
])
def test_bad_deepspeed_section_is_one_clear_error(tmp_path, section, message):
    """Each bad deepspeed key is refused when the config is read, naming the key."""
    with pytest.raises(ConfigError, match=message):
        _cfg(tmp_path, WORLD, section)


def test_world_size_that_the_batch_layout_does_not_fit_is_refused_before_any_group(tmp_path):
    """train_batch_size = micro_batch × accumulation × world: 2 ranks fit 8, 3 ranks are refused with the
    fitting world size named, and the Trainer refuses before creating a process group."""
    import os

    import torch.distributed as dist

    cfg = _cfg(tmp_path, WORLD, {"zero_stage": 2, "train_batch_size": 8})
    check_world_size(cfg, 2)
    with pytest.raises(ConfigError, match=r"do not split over 3 ranks .* launch 2 ranks"):
        check_world_size(cfg, 3)
    env = {"WORLD_SIZE": "3", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    old = {k: os.environ.get(k) for k in env}
    had_group = dist.is_initialized()
    os.environ.update(env)
    try:
        with pytest.raises(ConfigError, match="do not split over 3 ranks"):
            Trainer(cfg, echo=lambda m: None)
        assert dist.is_initialized() == had_group
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def test_one_process_with_a_deepspeed_section_equals_the_plain_engine(one_rank_group, tmp_path):
    """A single process (no launcher) with ZeRO-2 creates its own one-rank group and trains exactly as the
    plain engine."""
    _, got = _single(tmp_path, "zero", deepspeed={"zero_stage": 2})
    _, want = _single(tmp_path, "plain")
    _assert_same_run(got, want, rtol=1e-6, atol=1e-7)


@pytest.fixture(scope="module")
def one_rank_group():
    """The one-rank group that this module's one-process DeepSpeed runs create, removed after the last of them:
    DeepSpeed keeps the group it first saw, so a second group in the same process would be refused. Its users
    come last in this file: the world-size check above needs the process without a group."""
    import torch.distributed as dist

    had_group = dist.is_initialized()
    yield
    if dist.is_initialized() and not had_group:
        dist.destroy_process_group()


def test_planned_zero1_state_bytes_on_one_rank(one_rank_group, tmp_path):
    """On one data rank ZeRO-1's step holds more than the whole gradients (LoCA: the padded partitions of both
    groups and the flat gradient of the first, 6144 bytes against 4608): planned exactly."""
    t = Trainer(_method_cfg(tmp_path, 1, "loca", 1), echo=lambda m: None)
    state = record_state_bytes(t)
    t.run()
    assert state == planned_state_bytes(t.cfg, 1, 0)


def _one_process_zero3(root, name):
    """The bf16 run under ZeRO-3 in this process (the one_rank_group fixture's group)."""
    t = Trainer(_bf16_cfg(root, name, 1, 3), echo=lambda m: None)
    t.run()
    return _record(t)


@pytest.mark.parametrize("name", list(BF16_METHODS))
def test_bf16_frozen_weights_under_zero_keep_adapters_fp32_and_match_one_process(zero_runs, one_rank_group, tmp_path,
                                                                                 name):
    """bf16 frozen weights and bf16 autocast, every method under ZeRO-1, 2 and 3 on 2 ranks: the trainable tensors
    and DeepSpeed's reductions are fp32; the model at init gives the frozen base model's logits bitwise (a zero
    update stays exactly zero: FRoD's Σ − σ⁰, LoCA's locations); training gives the one-process bf16 run of the
    same micro-batches within TIGHT (ZeRO-1/2: the plain engine's run). ZeRO-3 is held to TIGHT against the plain
    engine's one-process ZeRO-3 run, and to a few bf16 ulps (1e-2; measured 3e-4 to 5e-4, ScaLoRA 3e-3: it merges
    every step into the bf16 frozen weights, where a last-bit change rounds W anew) against the plain engine's: its
    module hooks wrap every module's inputs and outputs in autograd nodes, which changes the order in which autograd
    sums a tensor's bf16 activation gradients from its consumers (q, k, v and each adapter read one normed input);
    the grads then differ in bf16's last bit from the second step on (the first has zero adapter contributions),
    and Adam's normalised steps carry that into the weights. One rank or two give the same ZeRO-3 run."""
    _, results = zero_runs
    plain = Trainer(_bf16_cfg(tmp_path, name, 1), echo=lambda m: None)
    base, _ = load_model(plain.cfg.model)  # the frozen model without adapters
    with plain._autocast(), torch.no_grad():
        want_init = base(input_ids=PROBE, attention_mask=torch.ones_like(PROBE)).logits.float()
    plain.run()
    want = _record(plain)
    for stage in STAGES:
        got = results[0]["bf16", name, stage]
        assert not isinstance(got, str), (stage, got)
        assert got["dtypes"] == {"torch.float32"} and got["comm"] == "torch.float32", (stage, got["dtypes"])
        assert torch.equal(torch.from_numpy(got["init"]), want_init), stage
        if stage < 3:
            _assert_same_run(got, want, **TIGHT)
    got = results[0]["bf16", name, 3]
    _assert_same_run(got, _one_process_zero3(tmp_path, name), **TIGHT)
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(want["losses"]), rtol=1e-2, atol=0)
