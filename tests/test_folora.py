"""FO-LoRA: the update against numpy's FFT, the LoRA reduction (T = 1), disjoint masks and Frobenius
orthogonality, ranks, App. E's gradients, virtual shards, the greedy allocation against brute force and the
gradient spectrum, least-squares optimality of the refit (and under virtual shards), and the multitask
pipeline (config, mixture order, per-task eval, masks in adapter files and checkpoints, exact resume)."""

import dataclasses
import itertools

import numpy as np
import pytest
import torch

from conftest import tiny_config
from dist_peft.integrations.transformers import adapted_sites, inject_adapters, load_adapter
from dist_peft.methods.base import Site, StepContext
from dist_peft.methods.folora import (FoloraAdapter, FoloraConfig, FoloraController, default_allocation,
                                      greedy_allocation, refit_delta, task_masks)
from dist_peft.methods.lora import LoraAdapter, LoraConfig
from dist_peft.parallel import collectives
from dist_peft.parallel.shard import ShardSpec
from dist_peft.train import checkpoint as ckpt
from dist_peft.train.config import ConfigError, from_dict
from dist_peft.train.data import MixedOrder
from dist_peft.train.export import export
from dist_peft.train.loop import Trainer
from dist_peft.train.models import build_tiny_llama
from host_syncs import ToyStack, syncs_per_step
from virtual_shards import compare_with_unsplit

M, N, R = 12, 16, 3


def _adapter(cfg: FoloraConfig, spec: ShardSpec = ShardSpec(), W: torch.Tensor | None = None, seed: int = 0):
    """An adapter with non-zero U and non-trivial G (so every update and gradient is non-zero)."""
    W = torch.randn(M, N, generator=torch.Generator().manual_seed(9)) if W is None else W
    weight = spec.shard(W, spec.weight_dim) if spec.weight_dim is not None else W
    a = FoloraAdapter(Site("layers.0.q_proj", "q_proj", 0, W.shape[0], W.shape[1], weight), spec, cfg)
    gen = torch.Generator().manual_seed(seed)
    full = {"folora_U": torch.randn(W.shape[0], cfg.r, generator=gen),
            "folora_V": torch.randn(cfg.r, W.shape[1], generator=gen),
            "folora_G": 1 + 0.5 * torch.randn(cfg.num_tasks, W.shape[1] // 2 + 1, generator=gen)}
    a.load_full(full)
    return a, full


def _delta_with(a: FoloraAdapter, t: int, g_row) -> np.ndarray:
    """ΔW_t = s U irfft(M_t ⊙ rfft(V) ⊙ g_row) with numpy's FFT in float64 (the independent reference)."""
    U, V = a.folora_U.detach().double().numpy(), a.folora_V.detach().double().numpy()
    mask = (a.folora_bins.numpy() == t).astype(float)
    return a.scale * U @ np.fft.irfft(np.fft.rfft(V, axis=1) * mask * g_row, n=V.shape[1], axis=1)


def _numpy_delta(a: FoloraAdapter, t: int) -> np.ndarray:
    return _delta_with(a, t, a.folora_G[t].detach().double().numpy())


def test_mixed_task_forward_and_delta_weight_match_numpy_fft_reference():
    """Per-sample task ids: y = W x + ΔW_{t(sample)} x with ΔW_t from numpy's rfft/irfft; delta_weight(t) = ΔW_t."""
    a, _ = _adapter(FoloraConfig(r=R, num_tasks=3))
    x = torch.randn(4, 5, N)
    ids = torch.tensor([2, 0, 1, 2])
    a.task_ids = ids
    y = a(x, torch.zeros(4, 5, M))
    ref = np.stack([x[b].double().numpy() @ _numpy_delta(a, int(ids[b])).T for b in range(4)])
    np.testing.assert_allclose(y.detach().numpy(), ref, rtol=1e-4, atol=1e-5)
    assert np.abs(ref).max() > 0.1
    for t in range(3):
        np.testing.assert_allclose(a.delta_weight(t).detach().numpy(), _numpy_delta(a, t), rtol=1e-4, atol=1e-5)


def test_masks_are_built_once_per_change_of_the_bins(monkeypatch):
    """A steady-state forward builds no mask; an in-place write of the bins (calibration, a load) and a replaced
    buffer (a move) rebuild them, and the output follows the new bins (numpy reference)."""
    import dist_peft.methods.folora as folora

    a, _ = _adapter(FoloraConfig(r=R, num_tasks=3))
    built = []
    monkeypatch.setattr(folora, "task_masks", lambda *args: built.append(1) or task_masks(*args))
    x = torch.randn(2, 5, N)
    a.task_ids = 1
    for _ in range(2):
        a(x, torch.zeros(2, 5, M))
    assert len(built) == 1
    for change in (lambda: a.folora_bins.copy_(a.folora_bins.roll(1)),
                   lambda: setattr(a, "folora_bins", a.folora_bins.roll(2))):
        with torch.no_grad():
            change()
        y = a(x, torch.zeros(2, 5, M))
        np.testing.assert_allclose(y.detach().numpy(), x.double().numpy() @ _numpy_delta(a, 1).T, rtol=1e-4,
                                   atol=1e-5)
    assert len(built) == 3


def test_one_task_with_full_mask_and_unit_scale_is_lora():
    """T = 1: the mask is all K bins and G = 1 at init, V is drawn like LoRA's A; with U = B the outputs and the
    U/B, V/A gradients equal LoRA's."""
    W = torch.randn(M, N)
    site = Site("layers.0.q_proj", "q_proj", 0, M, N, W)
    torch.manual_seed(0)
    fo = FoloraAdapter(site, ShardSpec(), FoloraConfig(r=R, lora_alpha=6, num_tasks=1))
    torch.manual_seed(0)
    lora = LoraAdapter(site, ShardSpec(), LoraConfig(r=R, lora_alpha=6))
    assert bool((fo.folora_bins == 0).all()) and bool((fo.folora_G == 1).all())
    assert torch.equal(fo.folora_V, lora.lora_A)
    with torch.no_grad():
        u = torch.randn(M, R)
        fo.folora_U.copy_(u), lora.lora_B.copy_(u)
    x, h = torch.randn(7, N), torch.randn(7, M)
    y_fo, y_lora = fo(x, x @ W.T), lora(x, x @ W.T)
    torch.testing.assert_close(y_fo, y_lora, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(y_lora, x @ W.T, atol=1e-3)
    (y_fo * h).sum().backward(), (y_lora * h).sum().backward()
    torch.testing.assert_close(fo.folora_U.grad, lora.lora_B.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fo.folora_V.grad, lora.lora_A.grad, rtol=1e-5, atol=1e-5)


def _brute_force_allocation(scores: torch.Tensor, k: int) -> list[set[int]]:
    """Eqs. 1–2 literally: each task in turn takes the size-k subset of the free bins with the largest Φ."""
    free, out = set(range(scores.shape[1])), []
    for t in range(scores.shape[0]):
        best = max(itertools.combinations(sorted(free), k), key=lambda s: float(scores[t, list(s)].sum()))
        out.append(set(best))
        free -= set(best)
    return out


def test_greedy_allocation_equals_brute_force_and_masks_are_disjoint():
    """The top-k greedy equals Eq. 1's argmax over all subsets; masks are disjoint, of size k, inside Ω."""
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):
        scores = torch.rand(3, 9, generator=gen)
        bins = greedy_allocation(scores, 2)
        got = [set((bins == t).nonzero().squeeze(1).tolist()) for t in range(3)]
        assert got == _brute_force_allocation(scores, 2)
    for bins in (greedy_allocation(torch.rand(4, 33, generator=gen), 8), default_allocation(33, 4, 8)):
        masks = task_masks(bins, 4)
        assert masks.shape == (4, 33) and masks.sum(1).tolist() == [8] * 4
        assert (masks.sum(0) <= 1).all()  # M_s ⊙ M_t = 0 for s ≠ t
    with pytest.raises(ValueError, match="frequencies_per_task"):
        greedy_allocation(torch.rand(3, 9), 4)


def test_task_updates_are_frobenius_orthogonal_and_rank_bounded():
    """⟨ΔW_s, ΔW_t⟩_F = 0 for s ≠ t (Parseval); rank ΔW_t = r, rank Σ_t ΔW_t = r (shared U), and the rows of
    V_1 … V_T span r·T dimensions."""
    a, _ = _adapter(FoloraConfig(r=R, num_tasks=3, frequencies_per_task=3), W=torch.randn(20, 32))
    with torch.no_grad():
        a.folora_bins.copy_(greedy_allocation(torch.rand(3, 17, generator=torch.Generator().manual_seed(2)), 3))
    deltas = [a.delta_weight(t).detach().double() for t in range(3)]
    for s, t in itertools.permutations(range(3), 2):
        inner = (deltas[s] * deltas[t]).sum()
        assert abs(inner) < 1e-5 * deltas[s].norm() * deltas[t].norm(), (s, t, inner)
    rank = lambda t: int(torch.linalg.matrix_rank(t, rtol=1e-5))  # float32 arithmetic: tolerance above its noise
    assert [rank(d) for d in deltas] == [R] * 3
    assert rank(sum(deltas)) == R
    assert rank(a.filters().detach().reshape(-1, 32)) == 3 * R


def test_gradients_match_appendix_e_closed_forms():
    """∂L/∂U = s Gr V_tᵀ, ∂L/∂V = s 𝒜_t(Uᵀ Gr) (𝒜_t self-adjoint),
    ∂L/∂G_t[j] = s (c_j/n) M_t[j] Σ_rows Re(V̂ conj(rfft(UᵀGr)))[:, j]."""
    a, _ = _adapter(FoloraConfig(r=R, num_tasks=2, default_task=1))
    x, h = torch.randn(9, N), torch.randn(9, M)
    (a(x, torch.zeros(9, M)) * h).sum().backward()
    s, t, U, V = a.scale, 1, a.folora_U.detach(), a.folora_V.detach()
    gr = h.T @ x  # ∂L/∂ΔW
    vt = a.filters()[t].detach()
    response = task_masks(a.folora_bins, 2)[t] * a.folora_G[t].detach()
    torch.testing.assert_close(a.folora_U.grad, s * gr @ vt.T, rtol=1e-4, atol=1e-5)
    adjoint = torch.fft.irfft(torch.fft.rfft(U.T @ gr) * response, n=N)
    torch.testing.assert_close(a.folora_V.grad, s * adjoint, rtol=1e-4, atol=1e-5)
    c = torch.full((N // 2 + 1,), 2.0)
    c[0] = c[-1] = 1.0
    spectral = (torch.fft.rfft(V) * torch.fft.rfft(U.T @ gr).conj()).real.sum(0)
    g_ref = s * c / N * task_masks(a.folora_bins, 2)[t] * spectral
    torch.testing.assert_close(a.folora_G.grad[t], g_ref, rtol=1e-4, atol=1e-5)
    assert not a.folora_G.grad[0].any()  # task 0's scaling sees no task-1 token


@pytest.mark.parametrize("kind", ["column", "row"])
@pytest.mark.parametrize("size", [2, 4])
def test_virtual_shards_reassemble_to_unsplit(kind, size):
    """Column and row shards (2 and 4) give the unsplit outputs, input gradients and U/V/G gradients (task 1)."""
    cfg = FoloraConfig(r=R, num_tasks=2, default_task=1)
    gen = torch.Generator().manual_seed(3)
    W = torch.randn(24, N, generator=gen)
    full = {"folora_U": torch.randn(24, R, generator=gen), "folora_V": torch.randn(R, N, generator=gen),
            "folora_G": 1 + torch.rand(2, N // 2 + 1, generator=gen)}
    compare_with_unsplit(FoloraAdapter, cfg, W, full, kind, size)


class _MixedTasks(FoloraAdapter):
    """Fixes per-token task ids (the 5 tokens compare_with_unsplit feeds) at construction."""

    def __init__(self, site, spec, cfg):
        super().__init__(site, spec, cfg)
        self.task_ids = torch.tensor([0, 1, 1, 0, 1])


@pytest.mark.parametrize("kind", ["column", "row"])
def test_virtual_shards_with_mixed_task_ids_reassemble_to_unsplit(kind):
    """The per-sample gather path under column and row shards equals the unsplit one."""
    gen = torch.Generator().manual_seed(4)
    W = torch.randn(24, N, generator=gen)
    full = {"folora_U": torch.randn(24, R, generator=gen), "folora_V": torch.randn(R, N, generator=gen),
            "folora_G": 1 + torch.rand(2, N // 2 + 1, generator=gen)}
    compare_with_unsplit(_MixedTasks, FoloraConfig(r=R, num_tasks=2), W, full, kind, 2)


def _toy_batches(task: int, i: int):
    gen = torch.Generator().manual_seed(100 * task + i)
    return {"x": torch.randn(2, 3, N, generator=gen) + task * torch.linspace(-1, 1, N),
            "h": torch.randn(2, 3, M, generator=gen)}


def test_calibration_allocates_by_gradient_spectrum_energy():
    """Stage 1: the bins equal the greedy allocation of φ_t(i) = Σ_rows |rfft(Σ_batches g xᵀ)[row, i]|² computed
    densely with numpy (gradients of the toy loss Σ y·h are h)."""
    cfg = FoloraConfig(r=R, num_tasks=2, frequencies_per_task=3, calibration_batches=3)
    a, _ = _adapter(cfg)
    ctrl = FoloraController({"s": a})
    ctrl.calibrate(_toy_batches, lambda b: (a(b["x"], torch.zeros(2, 3, M)) * b["h"]).sum().backward())
    scores = []
    for t in range(2):
        gr = sum(_toy_batches(t, i)["h"].reshape(-1, M).double().numpy().T
                 @ _toy_batches(t, i)["x"].reshape(-1, N).double().numpy() for i in range(3))
        scores.append((np.abs(np.fft.rfft(gr, axis=1)) ** 2).sum(0))
    expected = greedy_allocation(torch.tensor(np.stack(scores)), 3)
    assert torch.equal(a.folora_bins, expected)
    assert not torch.equal(expected, default_allocation(N // 2 + 1, 2, 3))
    assert a.recorder is None and a.task_ids is None


@pytest.mark.parametrize("kind", ["column", "row"])
def test_calibration_spectra_of_virtual_shards_sum_to_the_unsplit_energy(kind):
    """Row shards' spectra (zero-padded inputs) sum to the full spectrum; column shards' energies sum to the
    full energy — the reductions FoloraController makes."""
    W = torch.randn(M, N)
    x, g = torch.randn(10, N), torch.randn(10, M)
    full, _ = _adapter(FoloraConfig(r=R), W=W)
    full.accumulate_spectrum(x, g)
    energy = full.calib_spectrum.abs().square().sum(0)
    parts = []
    for k in range(2):
        spec = ShardSpec(kind, k, 2)
        a, _ = _adapter(FoloraConfig(r=R), spec, W)
        a.accumulate_spectrum(spec.shard(x, 1) if kind == "row" else x, spec.shard(g, 1) if kind == "column" else g)
        parts.append(a.calib_spectrum)
    got = sum(parts).abs().square().sum(0) if kind == "row" else sum(p.abs().square().sum(0) for p in parts)
    torch.testing.assert_close(got, energy, rtol=1e-4, atol=1e-4)


def _calibrate_counting(model, adapters, budget, monkeypatch):
    """Stage 1 on ``model`` with ``calibration_bytes = budget``, recording the peak bytes of the tensors it holds
    for the method — the distinct storages of all sites' spectra plus whatever a reduction is handed — at every
    micro-batch's accumulation and every reduction, and the reduction calls. Returns (peak, calls, bins)."""
    cfg = dataclasses.replace(next(iter(adapters.values())).cfg, calibration_bytes=budget)
    for a in adapters.values():
        a.cfg = cfg
    record = {"peak": 0, "calls": 0}

    def held(extra=()):
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                    for t in [a.calib_spectrum for a in adapters.values() if a.calib_spectrum is not None] + list(extra)}
        record["peak"] = max(record["peak"], sum(storages.values()))

    accumulate, all_reduce, coalesced = FoloraAdapter.accumulate_spectrum, collectives.all_reduce, \
        collectives.all_reduce_coalesced

    def counting_accumulate(self, x, g):
        accumulate(self, x, g)
        held()

    def counting_all_reduce(t, group=None, op="sum"):
        record["calls"] += 1
        held([t])
        return all_reduce(t, group, op)

    def counting_coalesced(tensors, group=None, op="sum"):
        record["calls"] += 1
        held(tensors)
        return coalesced(tensors, group, op)

    monkeypatch.setattr(FoloraAdapter, "accumulate_spectrum", counting_accumulate)
    monkeypatch.setattr(collectives, "all_reduce", counting_all_reduce)
    monkeypatch.setattr(collectives, "all_reduce_coalesced", counting_coalesced)

    def draw(task, i):
        gen = torch.Generator().manual_seed(10 * task + i)
        return {"x": torch.randn(4, 5, 16, generator=gen) + task * torch.linspace(-2, 2, 16),
                "h": torch.randn(4, 5, 16, generator=gen)}

    FoloraController(adapters).calibrate(draw, lambda b: (model(b["x"]) * b["h"]).sum().backward())
    monkeypatch.undo()
    return record["peak"], record["calls"], {n: a.folora_bins.clone() for n, a in adapters.items()}


def test_calibration_holds_one_budget_of_spectra_and_reduces_once_per_group_and_task(monkeypatch):
    """Stage 1 on 8 layers with a budget of one layer's spectra: the bytes held for the method never exceed the
    budget (the whole model's spectra are 8 times more), each group of sites costs one all-reduce per task, not
    one per site (plus one for the number of passes), and the masks equal those of one whole-model group."""
    torch.manual_seed(0)
    model = ToyStack(8, width=16)
    adapters = {n: s.adapter for n, s in inject_adapters(
        model, "folora", FoloraConfig(r=2, num_tasks=2, calibration_batches=2), ["q_proj", "down_proj"]).items()}
    layer = sum(a.spectrum_bytes() for n, a in adapters.items() if ".0." in n)  # 32 x 9 + 16 x 17 complex64
    whole = sum(a.spectrum_bytes() for a in adapters.values())
    assert whole == 8 * layer
    peak, calls, bins = _calibrate_counting(model, adapters, layer, monkeypatch)
    assert peak <= layer < whole, (peak, layer)
    assert calls == 1 + 8 * 2  # the pass count; one per layer group and task (16 sites, 2 tasks)
    peak_one, calls_one, bins_one = _calibrate_counting(model, adapters, whole, monkeypatch)
    assert peak_one == whole and calls_one == 1 + 2
    for name, b in bins.items():
        assert torch.equal(b, bins_one[name]), name
    assert any(not torch.equal(b, default_allocation(b.numel(), 2, adapters[n].k)) for n, b in bins.items())


def test_steps_sync_the_host_a_constant_number_of_times():
    """Mixed-task micro-batches and a refit every step: one sync per step for the task-id check, two for the refit
    (token counts, predicted loss changes) and one pseudo-inverse per task and distinct k (two here), whatever
    the number of layers (2 or 4) and micro-batches (1 or 3); a step without a refit syncs once."""
    for refit_every, expected in [(1, [1 + 2 + 2 * 2] * 3), (2, [1, 1 + 2 + 2 * 2, 1])]:
        cfg = FoloraConfig(r=2, num_tasks=2, calibration_batches=0, refit_every=refit_every)
        counts = {(layers, micro): syncs_per_step("folora", cfg, layers, micro, steps=3, tasks=2)
                  for layers, micro in [(2, 1), (4, 1), (2, 3)]}
        assert all(c == expected for c in counts.values()), (refit_every, counts)


def _objective(a, t, G, X, Y):
    """‖Y − ΔW_t(G) X‖² in float64 with numpy's FFT (Eq. 3, Stage 2)."""
    return float(((Y - X @ _delta_with(a, t, G).T) ** 2).sum())


def test_least_squares_refit_is_optimal_for_the_one_step_target():
    """After a refit step, G_t minimises ‖(ΔW_t(G_old) − η Gr_t) X_t − ΔW_t(G) X_t‖² (random perturbations of the
    active bins never lower it) and equals the dense lstsq solution; tokens of other tasks are left out."""
    cfg = FoloraConfig(r=R, num_tasks=2, frequencies_per_task=4, refit_every=1, refit_ridge=0.0, refit_lr=0.5)
    a, _ = _adapter(cfg)
    ctrl = FoloraController({"s": a})
    x, h, ids = torch.randn(6, 8, N), torch.randn(6, 8, M), torch.tensor([0, 1, 1, 0, 1, 1])
    ctrl.on_batch({"task_ids": ids})
    (a(x, torch.zeros(6, 8, M)) * h).sum().backward()
    G_old = a.folora_G.detach().double().numpy().copy()
    ctrl.before_optimizer_step(StepContext(0, 1e-3, torch.optim.SGD([a.folora_G], lr=0.1)))
    G_new = a.folora_G.detach().double().numpy()
    gen = np.random.default_rng(0)
    for t in range(2):
        X, H = x[ids == t].reshape(-1, N).double().numpy(), h[ids == t].reshape(-1, M).double().numpy()
        Y = X @ _delta_with(a, t, G_old[t]).T - 0.5 * X @ (H.T @ X).T  # η = refit_lr, Gr_t = Hᵀ X
        best = _objective(a, t, G_new[t], X, Y)
        active = a.folora_bins.numpy() == t
        assert best < _objective(a, t, G_old[t], X, Y)
        for _ in range(20):
            eps = np.where(active, gen.normal(0, 1e-2, G_new.shape[1]), 0.0)
            assert _objective(a, t, G_new[t] + eps, X, Y) >= best * (1 - 1e-9)
        cols = [_delta_with(a, t, np.eye(G_new.shape[1])[j]) for j in np.flatnonzero(active)]
        design = np.stack([(X @ c.T).ravel() for c in cols], 1)
        np.testing.assert_allclose(G_new[t][active], np.linalg.lstsq(design, Y.ravel(), rcond=None)[0], rtol=1e-3,
                                   atol=1e-4)
    assert set(ctrl.step_metrics) == {"refit_0_predicted_dloss", "refit_1_predicted_dloss"}
    assert a.recorder is None


@pytest.mark.parametrize("kind", ["column", "row"])
def test_refit_under_virtual_shards_equals_unsplit(kind):
    """TP = 2: each shard's partial terms, summed as the controller's reductions do (row: Z and Q; column: A and
    c), give every shard the unsplit G_t."""
    cfg = FoloraConfig(r=R, num_tasks=2, frequencies_per_task=4, refit_ridge=0.0)
    W = torch.randn(M, N)
    x, g = torch.randn(30, N), torch.randn(30, M)
    full, state = _adapter(cfg, W=W)
    z, q = full.refit_features(x, full.refit_gradient_product(x, g), 1)
    full.apply_refit(1, refit_delta(*full.refit_normal_equations(z, q), 0.3, 0.0))
    shards = []
    for k in range(2):
        spec = ShardSpec(kind, k, 2)
        a = FoloraAdapter(Site("layers.0.q_proj", "q_proj", 0, M, N, spec.shard(W, spec.weight_dim)), spec, cfg)
        a.load_full(state)
        shards.append((a, spec.shard(x, 1) if kind == "row" else x, spec.shard(g, 1) if kind == "column" else g))
    zq = [a.refit_features(xs, a.refit_gradient_product(xs, gs), 1) for a, xs, gs in shards]
    if kind == "row":
        zq = [(sum(p[0] for p in zq), sum(p[1] for p in zq))] * 2
    ac = [a.refit_normal_equations(*zq[i]) for i, (a, _, _) in enumerate(shards)]
    if kind == "column":
        ac = [(sum(p[0] for p in ac), sum(p[1] for p in ac))] * 2
    for (a, _, _), (amat, c) in zip(shards, ac):
        a.apply_refit(1, refit_delta(amat, c, 0.3, 0.0))
        torch.testing.assert_close(a.folora_G, full.folora_G, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(full.folora_G, state["folora_G"])


def test_unknown_or_misshaped_task_ids_are_clear_errors():
    """A task id outside [0, T) in a batch (at the step's check while training, at once without gradients), ids
    that do not match the input's samples, or a bad default_task."""
    a, _ = _adapter(FoloraConfig(r=R, num_tasks=2))
    ctrl = FoloraController({"s": a})
    with torch.no_grad(), pytest.raises(ValueError, match=r"task_ids: ids in \[0, 5\] are not all task ids in "
                                                          r"\[0, 2\)"):
        ctrl.on_batch({"task_ids": torch.tensor([0, 5, 1])})
    ctrl.on_batch({"task_ids": torch.tensor([-1, 0])})  # training: clamped on the device, raised at the step
    ctrl.on_batch({"task_ids": torch.tensor([1, 1])})
    assert a.task_ids.tolist() == [1, 1]
    with pytest.raises(ValueError, match=r"task_ids: ids in \[-1, 1\]"):
        ctrl.before_optimizer_step(StepContext(0, 1e-3, None))
    ctrl.before_optimizer_step(StepContext(0, 1e-3, None))  # checked and cleared
    with pytest.raises(ValueError, match="not a vector of task ids"):
        ctrl.on_batch({"task_ids": torch.tensor([[0, 1]])})
    ctrl.on_batch({"task_ids": torch.tensor([0, 1, 1])})
    with pytest.raises(ValueError, match="one id per sample"):
        a(torch.randn(2, 4, N), torch.zeros(2, 4, M))
    with pytest.raises(ValueError, match="default_task: must be in"):
        FoloraConfig(num_tasks=2, default_task=2)
    with pytest.raises(ValueError, match="do not fit"):
        _adapter(FoloraConfig(r=R, num_tasks=2, frequencies_per_task=5))


TASKS = [{"name": "even", "source": "synthetic", "seed": 1},
         {"name": "odd", "source": "synthetic", "seed": 2, "weight": 3}]
FOLORA = {"name": "folora", "target_modules": ["q_proj", "v_proj", "down_proj"], "r": 4, "lora_alpha": 8,
          "num_tasks": 2, "calibration_batches": 2, "refit_every": 2}


def _multitask(run_dir, **train):
    return tiny_config(run_dir, method=FOLORA, data={"source": None, "tasks": TASKS},
                       train={"steps": 4, "micro_batch_size": 4, **train})


def test_task_config_inherits_data_keys_and_rejects_bad_task_lists(tmp_path):
    """Tasks take data.seq_len etc. unless they set them; num_tasks must match; names unique; source xor tasks."""
    cfg = _multitask(tmp_path)
    assert [t.seq_len for t in cfg.data.tasks] == [16, 16] and cfg.data.tasks[1].weight == 3
    assert from_dict(cfg.to_dict()) == cfg
    assert "tasks" not in tiny_config(tmp_path).to_dict()["data"]
    base = cfg.to_dict()
    for change, message in [({"method": {**FOLORA, "num_tasks": 3}}, "method.num_tasks: must equal"),
                            ({"data": {"source": "synthetic", "tasks": TASKS}}, "data.source: give either"),
                            ({"data": {"tasks": [TASKS[0], TASKS[0]]}}, "data.tasks: task names must be unique"),
                            ({"data": {"tasks": [TASKS[0], {"name": "x"}]}}, r"data.tasks\[1\].source: required"),
                            ({"data": {"tasks": [TASKS[0], {**TASKS[1], "weight": 0}]}}, r"data.tasks\[1\].weight")]:
        with pytest.raises(ConfigError, match=message):
            from_dict({**base, **change})


def test_mixed_order_is_proportional_deterministic_and_walks_each_task_stream():
    """Every cycle of Σw examples holds exactly w_t of task t; task t's examples follow its own epochs (a
    permutation per epoch); two instances agree; world-2 slices concatenate to the world-1 micro-batch."""
    order = MixedOrder([5, 7], [1, 2], [1, 2], seed=3)
    slots = [order.slot(k) for k in range(30)]
    for c in range(10):
        assert sorted(t for t, _ in slots[3 * c: 3 * c + 3]) == [0, 1, 1]
    rows0 = [order.index(k) for k in range(30) if slots[k][0] == 0]
    assert sorted(rows0[:5]) == list(range(5)) and sorted(rows0[5:10]) == list(range(5))
    rows1 = [order.index(k) for k in range(30) if slots[k][0] == 1]
    assert sorted(rows1[:7]) == list(range(5, 12))
    again = MixedOrder([5, 7], [1, 2], [1, 2], seed=3)
    assert [again.index(k) for k in range(30)] == [order.index(k) for k in range(30)]
    ds = list(range(12))
    assert order.micro_batch(ds, 2, 4) == order.micro_batch(ds, 2, 2, 0, 2) + order.micro_batch(ds, 2, 2, 1, 2)


def test_multitask_run_evaluates_per_task_and_resumes_bitwise(tmp_path):
    """Mixed batches carry task ids; eval reports each task; calibration changes the masks; 4 steps straight
    equal 2 + resume + 2 (refits at steps 2 and 4, masks and refit schedule from the checkpoint)."""
    straight = Trainer(_multitask(tmp_path / "a"), echo=lambda m: None)
    batch = straight._batch(straight.order.micro_batch(straight.train_ds, 0, 8))
    assert sorted(batch["task_ids"].tolist()) == [0, 0, 1, 1, 1, 1, 1, 1]
    sites = adapted_sites(straight.model)
    assert any(not torch.equal(s.adapter.folora_bins, default_allocation(s.adapter.folora_bins.numel(), 2, s.adapter.k))
               for s in sites.values())
    summary = straight.run()
    assert {"eval_even_loss", "eval_odd_loss", "eval_even_ppl", "eval_loss"} <= set(summary["eval_after"])
    assert [r["step"] for r in straight.history if "refit_0_predicted_dloss" in r] == [2, 4]
    Trainer(_multitask(tmp_path / "b", steps=2), echo=lambda m: None).run()
    resumed = Trainer(_multitask(tmp_path / "b"), echo=lambda m: None, resume=ckpt.latest_checkpoint(tmp_path / "b"))
    resumed.run()
    losses = [r["loss"] for r in straight.history if "loss" in r]
    assert losses[2:] == [r["loss"] for r in resumed.history if "loss" in r]
    for name, p in straight.params.items():
        assert torch.equal(p, resumed.params[name]), name
    for name, s in adapted_sites(resumed.model).items():
        assert torch.equal(s.adapter.folora_bins, sites[name].adapter.folora_bins)


def test_masks_travel_with_adapter_files_and_exports(tmp_path):
    """load_adapter and export-from-checkpoint restore the calibrated masks: same bins, same mixed-batch logits."""
    trainer = Trainer(_multitask(tmp_path, steps=2), echo=lambda m: None)
    trainer.run()
    export(ckpt.latest_checkpoint(tmp_path), tmp_path / "exported")
    ids = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(0))
    tasks = {"task_ids": torch.tensor([0, 1])}
    logits = {}
    for name, folder in [("trained", None), ("saved", tmp_path / "adapter"), ("exported", tmp_path / "exported")]:
        model = trainer.model
        if folder is not None:
            model = build_tiny_llama(trainer.cfg.model.tiny)
            load_adapter(model, folder)
            for path, s in adapted_sites(model).items():
                assert torch.equal(s.adapter.folora_bins, adapted_sites(trainer.model)[path].adapter.folora_bins)
        adapters = {n: s.adapter for n, s in adapted_sites(model).items()}
        FoloraController(adapters).on_batch(tasks)
        logits[name] = model.eval()(ids).logits
    torch.testing.assert_close(logits["saved"], logits["trained"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits["exported"], logits["trained"], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits["trained"][0], logits["trained"][1])
