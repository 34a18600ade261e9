"""LoCA (arXiv:2502.06820): every path against a dense fp64 autograd Eq. 1, the location gradient against
explicit central differences of the loss, virtual shards, the alternating schedule through the real Trainer,
merge / save / load, and bad input."""

import dataclasses

import numpy as np
import pytest
import scipy.fft
import torch
from safetensors.torch import load_file, save_file

from conftest import check_merge_round_trip, tiny_config
from dist_peft.files import BadFileError
from dist_peft.integrations.transformers import adapted_sites, inject_adapters, load_adapter, save_adapter
from dist_peft.methods.base import Site, StepContext
from dist_peft.methods import loca
from dist_peft.methods.loca import LocaAdapter, LocaConfig, is_location_step, path_costs
from dist_peft.parallel.shard import ShardSpec
from dist_peft.train import checkpoint as ckpt
from dist_peft.train.config import ConfigError, TinyModelConfig, from_dict
from dist_peft.train.loop import Trainer
from dist_peft.train.models import build_tiny_llama
from host_syncs import syncs_per_step
from virtual_shards import compare_with_unsplit

PATHS = ["spectral", "gathered", "dense"]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _rounded(loc, m, n):
    """l̂ = round(clamp(l, 0, 1) · (dim - 1)) (specs/loca.md §1.3, §8.1)."""
    unit = loc.clamp(0, 1)
    return torch.round(unit[0] * (m - 1)).long(), torch.round(unit[1] * (n - 1)).long()


def _reference_delta(coef, rows, cols, m, n, scale):
    """ΔW = α Cᵀ S(a, l) D of Eq. 1 in fp64, with C and D from scipy's orthonormal DCT-II; differentiable in a."""
    C = torch.from_numpy(scipy.fft.dct(np.eye(m), norm="ortho", axis=0))
    D = torch.from_numpy(scipy.fft.dct(np.eye(n), norm="ortho", axis=0))
    S = torch.zeros(m, n, dtype=torch.float64).index_put((rows, cols), coef.double(), accumulate=True)
    return scale * C.T @ S @ D


def _adapter(m, n, path, budget=40, scale=1.5, seed=0, spec=ShardSpec(), **cfg):
    torch.manual_seed(seed)
    site = Site("layers.0.q_proj", "q_proj", 0, m, n, torch.zeros(m, n))
    adapter = LocaAdapter(site, spec, LocaConfig(n_frequency=budget, scale=scale, path=path, **cfg))
    with torch.no_grad():  # non-zero coefficients, duplicated positions and components on every edge
        adapter.loca_coef.normal_()
        adapter.loca_loc[:, :6] = torch.tensor([[0.0, 1.0, 0.5, 0.5, 0.0, 0.3], [0.4, 0.2, 0.0, 1.0, 0.0, 0.7]])
        adapter.loca_loc[:, 6] = adapter.loca_loc[:, 7]
    return adapter


def _run(adapter, tokens_shape, loss_fn, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*tokens_shape, adapter.site.in_features, generator=gen, requires_grad=True)
    y = adapter(x, torch.zeros(*tokens_shape, adapter.site.out_features))
    loss_fn(y).backward()
    return x, y


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("m, n", [(15, 8), (8, 15), (12, 12)])
def test_every_path_matches_dense_autograd_eq1(path, m, n):
    """Outputs, input gradients and coefficient gradients equal autograd through the dense fp64 Eq. 1
    (duplicate locations summed, α ≠ 1, batch dims, a non-linear loss)."""
    adapter = _adapter(m, n, path)
    x, y = _run(adapter, (2, 3), lambda y: (y ** 2).sum() + y.sum())
    coef = adapter.loca_coef.detach().double().requires_grad_(True)
    xr = x.detach().double().requires_grad_(True)
    yr = xr @ _reference_delta(coef, *_rounded(adapter.loca_loc.detach(), m, n), m, n, 1.5).T
    ((yr ** 2).sum() + yr.sum()).backward()
    assert yr.abs().max() > 0.1
    torch.testing.assert_close(y.double(), yr, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(adapter.loca_coef.grad.double(), coef.grad, rtol=1e-5, atol=1e-5)


def _moved(rows, cols, i, axis, step, m, n):
    """Component i moved by ``step`` index along ``axis``, clamped into the matrix."""
    rows, cols = rows.clone(), cols.clone()
    idx, size = (rows, m) if axis == 0 else (cols, n)
    idx[i] = (idx[i] + step).clamp(0, size - 1)
    return rows, cols, idx[i].item()


@pytest.mark.parametrize("path", PATHS)
def test_location_gradient_is_the_central_difference_of_the_loss(path):
    """For a loss linear in ΔW, ∂L/∂l of every component on both axes equals the explicit central difference
    (L(l̂+e) - L(l̂-e)) / distance of the loss, re-materialising ΔW, times (dim-1); one-sided at the edges."""
    m, n = 12, 9
    adapter = _adapter(m, n, path)
    g = torch.randn(5, m, generator=torch.Generator().manual_seed(2))
    x, _ = _run(adapter, (5,), lambda y: (y * g).sum())
    coef, rows, cols = adapter.loca_coef.detach(), *_rounded(adapter.loca_loc.detach(), m, n)

    def loss(r, c):
        return (x.detach().double() @ _reference_delta(coef, r, c, m, n, 1.5).T * g.double()).sum()

    expected = torch.zeros(2, 40, dtype=torch.float64)
    for i in range(40):
        for axis, size in ((0, m), (1, n)):
            hi_r, hi_c, hi = _moved(rows, cols, i, axis, 1, m, n)
            lo_r, lo_c, lo = _moved(rows, cols, i, axis, -1, m, n)
            expected[axis, i] = (size - 1) * (loss(hi_r, hi_c) - loss(lo_r, lo_c)) / max(hi - lo, 1)
    assert (rows == 0).any() and (rows == m - 1).any() and (cols == 0).any() and (cols == n - 1).any()
    assert expected.abs().max() > 1
    torch.testing.assert_close(adapter.loca_loc.grad.double(), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("path", PATHS)
def test_location_gradient_is_eq5_for_a_nonlinear_loss(path):
    """For any loss, ∂L/∂l = (dim-1) · <G, ΔW(l̂+e) - ΔW(l̂-e)> / distance with G = ∂L/∂ΔW from autograd
    (Eq. 5: the central difference of the loss linearised at ΔW)."""
    m, n = 10, 14
    adapter = _adapter(m, n, path)
    x, _ = _run(adapter, (6,), lambda y: torch.tanh(y).pow(2).sum())
    coef, rows, cols = adapter.loca_coef.detach(), *_rounded(adapter.loca_loc.detach(), m, n)
    delta = _reference_delta(coef, rows, cols, m, n, 1.5).requires_grad_(True)
    torch.tanh(x.detach().double() @ delta.T).pow(2).sum().backward()
    expected = torch.zeros(2, 40, dtype=torch.float64)
    for i in range(40):
        for axis, size in ((0, m), (1, n)):
            hi_r, hi_c, hi = _moved(rows, cols, i, axis, 1, m, n)
            lo_r, lo_c, lo = _moved(rows, cols, i, axis, -1, m, n)
            diff = _reference_delta(coef, hi_r, hi_c, m, n, 1.5) - _reference_delta(coef, lo_r, lo_c, m, n, 1.5)
            expected[axis, i] = (size - 1) * (delta.grad * diff).sum() / max(hi - lo, 1)
    torch.testing.assert_close(adapter.loca_loc.grad.double(), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kind", ["column", "row"])
@pytest.mark.parametrize("size", [2, 4])
def test_virtual_shards_reassemble_to_unsplit(path, kind, size):
    """Column and row shards (2 and 4) give the unsplit outputs and input gradients; the partial coefficient
    and location gradients sum to the unsplit ones."""
    gen = torch.Generator().manual_seed(3)
    W = torch.randn(24, 16, generator=gen)
    full = {"loca_coef": torch.randn(40, generator=gen), "loca_loc": torch.rand(2, 40, generator=gen)}
    full["loca_loc"][:, :2] = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    compare_with_unsplit(LocaAdapter, LocaConfig(n_frequency=40, scale=1.5, path=path), W, full, kind, size)


def test_shards_draw_the_unsplit_initialisation():
    """With one seed every column and row shard holds the unsplit a = 0 and the same locations in [0, 1]."""
    torch.manual_seed(7)
    whole = LocaAdapter(Site("s", "q_proj", 0, 24, 16, torch.zeros(24, 16)), ShardSpec(), LocaConfig(n_frequency=40))
    assert 0 <= whole.loca_loc.min() and whole.loca_loc.max() <= 1 and whole.loca_loc.std() > 0.2
    for kind, dim in (("column", 0), ("row", 1)):
        spec = ShardSpec(kind, 1, 4)
        torch.manual_seed(7)
        shard = LocaAdapter(Site("s", "q_proj", 0, 24, 16, spec.shard(torch.zeros(24, 16), dim)), spec,
                            LocaConfig(n_frequency=40))
        assert torch.equal(shard.loca_loc, whole.loca_loc) and not shard.loca_coef.any()


def test_paths_agree_on_a_model_with_shared_input_spectra():
    """On a tiny Llama with all seven projections (q/k/v and gate/up share one input spectrum node), the
    spectral path gives the logits and every adapter gradient of the dense path; at init ΔW = 0."""
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    base_logits = build_tiny_llama(TinyModelConfig())(ids).logits
    results = []
    for path in ("spectral", "dense"):
        model = build_tiny_llama(TinyModelConfig())
        torch.manual_seed(0)
        sites = inject_adapters(model, "loca", LocaConfig(n_frequency=64, path=path), TARGETS)
        assert torch.equal(model(ids).logits, base_logits)
        with torch.no_grad():
            for site in sites.values():
                site.adapter.loca_coef.normal_(0, 0.5, generator=torch.Generator().manual_seed(5))
        logits = model(ids).logits
        logits.pow(2).mean().backward()
        results.append((logits, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    assert not torch.allclose(results[0][0], base_logits, atol=1e-3)
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-4, atol=1e-4)
    for name, grad in results[1][1].items():
        torch.testing.assert_close(results[0][1][name], grad, rtol=1e-3, atol=1e-5, msg=name)


def test_auto_path_picks_the_cheapest_modelled_path():
    """``path: auto`` picks the cheapest modelled path for the tokens of the forward: gathered for a tiny
    budget, spectral for B = 1000 on a 576-wide layer, dense for a budget near the matrix size."""
    def chosen(m, n, budget, tokens):
        torch.manual_seed(0)
        site = Site("s", "q_proj", 0, m, n, torch.zeros(m, n))
        return LocaAdapter(site, ShardSpec(), LocaConfig(n_frequency=budget, alternate_until=0))._plan(tokens).path

    assert chosen(576, 576, 4, 1024) == "gathered"
    assert chosen(576, 576, 1000, 1024) == "spectral"
    assert chosen(576, 576, 100_000, 1024) == "dense"
    costs = path_costs(1024, 576, 576, 576, 576, 1000, 470, 470, False)
    assert min(costs, key=costs.get) == "spectral" and costs["dense"] > costs["spectral"]


def test_schedule_matches_algorithm_1():
    """B_a = 10, B_l = 20, B_s = 90: location steps are 10..29, 40..59, 70..89; all others are coefficient
    steps (specs/loca.md §9.4, 0-based optimizer steps)."""
    cfg = LocaConfig(coef_steps=10, loc_steps=20, alternate_until=90)
    location = [t for t in range(200) if is_location_step(t, cfg)]
    assert location == [*range(10, 30), *range(40, 60), *range(70, 90)]
    assert not any(is_location_step(t, LocaConfig(alternate_until=0)) for t in range(50))


LOCA = LocaConfig(n_frequency=64, coef_steps=2, loc_steps=3, alternate_until=10, loc_lr=0.01)


def _loca_config(run_dir, **train):
    """tests/conftest.tiny_config with method "loca" (B = 64 on q, v and down; B_a = 2, B_l = 3, B_s = 10).
    One thread: tiny GEMMs on two threads spend their time in thread hand-offs on a busy machine."""
    cfg = tiny_config(run_dir, train={"threads": 1, **train})
    return dataclasses.replace(cfg, method=dataclasses.replace(cfg.method, name="loca", options=LOCA))


def _changes(trainer, steps):
    """Per optimizer step: (did any coefficient change, did any location change)."""
    out = []
    for _ in range(steps):
        before = {n: p.detach().clone() for n, p in trainer.params.items()}
        trainer.train_step()
        moved = {n for n, p in trainer.params.items() if not torch.equal(p, before[n])}
        out.append((any(n.endswith("loca_coef") for n in moved), any(n.endswith("loca_loc") for n in moved)))
    return out


def test_trainer_alternates_by_optimizer_step_under_accumulation(tmp_path):
    """Through the real Trainer: locations move only in location steps, coefficients only in coefficient
    steps, locations freeze after B_s; 2 or 4 micro-batches per step give the phase sequence and (to float
    rounding) the parameters of one micro-batch of 4."""
    runs = {}
    for micro_batch_size, grad_accum in [(4, 1), (2, 2), (1, 4)]:
        cfg = _loca_config(tmp_path / str(grad_accum), steps=13, micro_batch_size=micro_batch_size,
                           grad_accum=grad_accum)
        trainer = Trainer(cfg, echo=lambda m: None)
        runs[grad_accum] = (_changes(trainer, 13), {n: p.detach().clone() for n, p in trainer.params.items()})
    assert runs[1][0] == [(not is_location_step(t, LOCA), is_location_step(t, LOCA)) for t in range(13)]
    assert runs[1][0][2] == (False, True) and runs[1][0][10:] == [(True, False)] * 3
    for k in (2, 4):
        assert runs[k][0] == runs[1][0]
        for name, value in runs[1][1].items():
            torch.testing.assert_close(runs[k][1][name], value, rtol=1e-4, atol=1e-5, msg=name)


def test_location_group_has_its_own_lr_and_no_weight_decay(tmp_path):
    """optimizer_overrides give every location tensor one AdamW group with lr = loc_lr, weight decay 0."""
    trainer = Trainer(_loca_config(tmp_path, steps=1, weight_decay=0.1), echo=lambda m: None)
    locs = {id(p) for n, p in trainer.params.items() if n.endswith("loca_loc")}
    (group,) = [g for g in trainer.optimizer.param_groups if {id(p) for p in g["params"]} & locs]
    assert {id(p) for p in group["params"]} == locs and group["initial_lr"] == 0.01 and group["weight_decay"] == 0


def test_resume_inside_a_location_block_is_bitwise_identical(tmp_path):
    """6 steps straight vs 3 steps, checkpoint, resume, 3 steps, stopping inside the location block 2..4 (the
    learning rates of steps 0-2 do not depend on the run length, as in test_train)."""
    straight = Trainer(_loca_config(tmp_path / "a", steps=6), echo=lambda m: None)
    straight.run()
    Trainer(_loca_config(tmp_path / "b", steps=3), echo=lambda m: None).run()
    resumed = Trainer(_loca_config(tmp_path / "b", steps=6), echo=lambda m: None,
                      resume=ckpt.latest_checkpoint(tmp_path / "b"))
    assert resumed.controller.next_step == 3 and resumed.controller.adapters
    assert all(a.train_loc and not a.train_coef for a in resumed.controller.adapters.values())
    resumed.run()
    for name, value in straight.params.items():
        assert torch.equal(value, resumed.params[name]), name


def test_controller_clamps_location_gradients_after_reduction_and_refuses_a_step_mismatch():
    """In a location step the reduced location gradient is clamped to ±loc_grad_clip index units; a step
    other than the one the gradients were computed for is an error."""
    adapter = _adapter(12, 9, "spectral", coef_steps=1, loc_steps=1, loc_grad_clip=0.5)
    controller = adapter.controller_cls({"a": adapter})
    opt = torch.optim.SGD(adapter.parameters(), lr=0.1)
    adapter.loca_coef.grad = torch.ones(40)
    adapter.loca_loc.grad = torch.full((2, 40), 100.0)
    with pytest.raises(RuntimeError, match="step 1"):
        controller.before_optimizer_step(StepContext(1, 0.1, opt))
    controller.after_optimizer_step(StepContext(0, 0.1, opt))
    controller.before_optimizer_step(StepContext(1, 0.1, opt))
    assert adapter.loca_coef.grad is None
    torch.testing.assert_close(adapter.loca_loc.grad, torch.tensor([[0.5 * 11], [0.5 * 8]]).expand(2, 40))


def _tiny_with_loca(cfg=LocaConfig(n_frequency=64)):
    model = build_tiny_llama(TinyModelConfig())
    torch.manual_seed(0)
    sites = inject_adapters(model, "loca", cfg, TARGETS)
    with torch.no_grad():
        for site in sites.values():
            site.adapter.loca_coef.normal_(0, 0.5)
    return model


@pytest.mark.parametrize("path", ["auto", "gathered", "spectral"])
def test_steps_sync_the_host_at_most_once_whatever_the_depth_and_accumulation(path):
    """Alternating coefficient / location steps: the host syncs once, in the controller's hook after each location
    step (all sites re-indexed together), and never otherwise (the initial indexing is the controller's
    construction); 2 or 4 layers, 1 or 3 micro-batches alike."""
    cfg = LocaConfig(n_frequency=20, coef_steps=1, loc_steps=1, alternate_until=4, path=path)
    counts = {(layers, micro): syncs_per_step("loca", cfg, layers, micro, steps=5)
              for layers, micro in [(2, 1), (4, 1), (2, 3)]}
    expected = [0] * 5 if path == "spectral" else [0, 1, 0, 1, 0]  # steps 1 and 3 change l
    assert all(c == expected for c in counts.values()), counts


def test_sorted_scatter_equals_index_add_and_is_reproducible():
    """The spectral path's scatter off the CPU (``index_put_`` with accumulate, sorted) sums repeated columns like
    ``index_add_``, the same way twice."""
    gen = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 7, (200,), generator=gen)  # every column hit ~30 times
    src = torch.randn(5, 200, generator=gen)
    ref = torch.zeros(5, 7).index_add_(1, idx, src)
    got = loca._add_columns_sorted(torch.zeros(5, 7), idx, src)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    assert torch.equal(got, loca._add_columns_sorted(torch.zeros(5, 7), idx, src))


def test_spectral_path_with_the_sorted_scatter_matches_dense_autograd(monkeypatch):
    """The spectral path with the GPU's scatter (forward and input gradient) still equals the dense Eq. 1."""
    monkeypatch.setattr(loca, "_add_columns", loca._add_columns_sorted)
    test_every_path_matches_dense_autograd_eq1("spectral", 15, 8)


@pytest.mark.cuda
@pytest.mark.parametrize("path", PATHS)
def test_cuda_outputs_and_gradients_are_bitwise_reproducible_and_match_cpu(path):
    """GPU leg: two identical forward/backward passes on CUDA give bitwise-equal outputs and gradients (many
    colliding locations; with deterministic algorithms off too), and they equal the CPU run to fp32 tolerance."""
    torch.use_deterministic_algorithms(False)  # the paths must not rely on it (conftest turns it back)
    results = []
    for device in ("cuda", "cuda", "cpu"):
        adapter = _adapter(64, 48, path, budget=2000).to(device)
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(512, 48, generator=gen).to(device).requires_grad_(True)
        y = adapter(x, torch.zeros(512, 64, device=device))
        (y.square().sum() + y.sum()).backward()
        results.append([t.detach().cpu() for t in (y, x.grad, adapter.loca_coef.grad)])
    for a, b in zip(results[0], results[1]):
        assert torch.equal(a, b)
    for a, c in zip(results[0], results[2]):
        torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-4)


def test_merged_forward_equals_unmerged_forward():
    """merge adds delta_weight (= the dense Eq. 1) to W: same logits; unmerge restores W."""
    model = _tiny_with_loca()
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    site = adapted_sites(model)["model.layers.0.self_attn.q_proj"].adapter
    reference = _reference_delta(site.loca_coef.detach(), *_rounded(site.loca_loc.detach(), 64, 64), 64, 64, 1.0)
    torch.testing.assert_close(site.delta_weight().double(), reference, rtol=1e-5, atol=1e-6)
    check_merge_round_trip(model, ids, merged_tol=1e-4, restore_tol=1e-6)


def test_save_load_round_trip(tmp_path):
    """save_adapter / load_adapter into a fresh model give the same logits; LoCA writes no HF PEFT config."""
    model = _tiny_with_loca()
    save_adapter(model, tmp_path / "a", base_model="tiny-llama")
    assert not (tmp_path / "a" / "adapter_config.json").exists()
    fresh = build_tiny_llama(TinyModelConfig())
    load_adapter(fresh, tmp_path / "a")
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(fresh(ids).logits, model(ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("value, message", [(1.5, r"in \[0, 1\]"), (-0.1, r"in \[0, 1\]"),
                                            (float("nan"), "non-finite")])
def test_bad_locations_in_a_file_are_refused(tmp_path, value, message):
    """A location outside [0, 1] or non-finite in an adapter file is a clear error, not a load."""
    save_adapter(_tiny_with_loca(), tmp_path / "a")
    f = tmp_path / "a" / "adapter_model.safetensors"
    tensors = load_file(f)
    key = next(k for k in sorted(tensors) if k.endswith("loca_loc"))
    tensors[key][1, 3] = value
    save_file(tensors, f)
    (tmp_path / "a" / "manifest.json").unlink()  # so that the edit reaches the value checks
    with pytest.raises(BadFileError, match=message):
        load_adapter(build_tiny_llama(TinyModelConfig()), tmp_path / "a")


def test_budget_larger_than_a_matrix_is_an_error():
    """B above the m x n entries of a targeted matrix names the site; k_proj of the tiny model is 32 x 64."""
    with pytest.raises(ValueError, match=r"n_frequency: 2049 .* 32 x 64 .*k_proj"):
        inject_adapters(build_tiny_llama(TinyModelConfig()), "loca", LocaConfig(n_frequency=2049), ["k_proj"])


@pytest.mark.parametrize("option, message", [({"n_frequency": 0}, "method.n_frequency"),
                                             ({"scale": float("inf")}, "method.scale"),
                                             ({"path": "fft"}, "method.path"),
                                             ({"coef_steps": 0}, "method.coef_steps"),
                                             ({"loc_grad_clip": -1.0}, "method.loc_grad_clip")])
def test_bad_config_is_a_clear_error(tmp_path, option, message):
    """Each invalid LoCA option is one ConfigError naming the key."""
    raw = {"model": {"source": "tiny-llama"}, "method": {"name": "loca", **option}, "data": {"source": "synthetic"},
           "train": {"steps": 2}, "output": {"dir": str(tmp_path)}}
    with pytest.raises(ConfigError, match=message):
        from_dict(raw)
