"""OD-LoRA and its QR kernels: sign-fixed (Cholesky-)QR against numpy, projected gradients against a dense
autograd reference, the Eq. 5 re-split and refreshes, the paper's schedule, virtual shards, resume, bad input."""

import math

import numpy as np
import pytest
import torch

from conftest import tiny_config
from dist_peft.compare.probes import GradientCosine
from dist_peft.integrations.transformers import adapted_sites, load_adapter, save_adapter
from dist_peft.methods.base import Site, StepContext
from dist_peft.methods.lora import LoraAdapter, LoraConfig
from dist_peft.methods.odlora import (OdLoraAdapter, OdLoraConfig, OdLoraController, equivalent_gradient_cosine,
                                      gradient_cosine, schedule_event)
from dist_peft.ops.qr import cholesky_qr2, gram64, low_rank_svd, sign_fixed_qr
from dist_peft.parallel import collectives
from dist_peft.parallel.shard import ShardSpec
from dist_peft.train import checkpoint as ckpt
from dist_peft.train.loop import Trainer
from virtual_shards import compare_with_unsplit

CFG = OdLoraConfig(r=4, lora_alpha=4.0)
METHOD = {"name": "odlora", "target_modules": ["q_proj", "v_proj", "down_proj"], "r": 4, "lora_alpha": 4,
          "init_rounds": 1, "init_steps": 2}


def virtual_partial_sum(items):
    """Sum each logical tensor (same key) over its virtual shards and give every shard the total: what the
    all-reduce over a real split does."""
    groups = {}
    for key, _, t in items:
        groups.setdefault(key, []).append(t)
    for tensors in groups.values():
        total = sum(tensors[1:], tensors[0].clone())
        for t in tensors:
            t.copy_(total)


def _adapter(m=24, n=16, spec=ShardSpec(), cfg=CFG, seed=0, full=None):
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(m, n, generator=gen)
    weight = W if spec.weight_dim is None else spec.shard(W, spec.weight_dim).clone()
    a = OdLoraAdapter(Site("layers.0.q_proj", "q_proj", 0, m, n, weight), spec, cfg)
    a.load_full(full if full is not None else od_state(m, n, cfg.r, seed))
    return a


def od_state(m, n, r, seed=0):
    """A full OD-form state with non-zero A, B and the sign-fixed bases of slightly older A, B."""
    gen = torch.Generator().manual_seed(seed + 1)
    A, B = torch.randn(r, n, generator=gen), torch.randn(m, r, generator=gen)
    q_a = sign_fixed_qr(A.mT + 0.1 * torch.randn(n, r, generator=gen))[0]
    q_b = sign_fixed_qr(B + 0.1 * torch.randn(m, r, generator=gen))[0]
    return {"lora_A": A, "lora_B": B, "Q_A": q_a, "Q_B": q_b, "od_form": torch.ones(1)}


def _ctx(adapters, step=0, lr=0.1):
    params = [p for a in adapters for p in (a.lora_A, a.lora_B)]
    return StepContext(step, lr, torch.optim.SGD(params, lr=lr))


def test_sign_fixed_qr_matches_numpy_with_positive_diagonal():
    """Q R = M, QᵀQ = I, diag(R) > 0, and Q, R equal numpy's QR after the same sign fix (unique for full rank)."""
    m = torch.randn(3, 20, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    q, r = sign_fixed_qr(m)
    assert (torch.diagonal(r, dim1=-2, dim2=-1) > 0).all()
    torch.testing.assert_close(q @ r, m)
    for k in range(3):
        nq, nr = np.linalg.qr(m[k].numpy())
        d = np.sign(np.diag(nr))
        torch.testing.assert_close(q[k], torch.from_numpy(nq * d))
        torch.testing.assert_close(r[k], torch.from_numpy(d[:, None] * nr))


def test_cholesky_qr2_equals_householder_qr_on_ill_conditioned_fp32_input():
    """fp64 Grams and a second pass: κ = 1e4 in fp32 still gives the canonical Q to ~1e-12 and QᵀQ = I to 1e-13."""
    gen = torch.Generator().manual_seed(1)
    m = (torch.randn(200, 8, generator=gen, dtype=torch.float64) @ torch.diag(torch.logspace(0, -4, 8,
                                                                                            dtype=torch.float64)))
    m = m.float()
    (q, r), = cholesky_qr2([m])
    q_ref, r_ref = sign_fixed_qr(m.double())
    torch.testing.assert_close(q, q_ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(r, r_ref, rtol=1e-10, atol=1e-14)
    assert (q.mT @ q - torch.eye(8, dtype=torch.float64)).abs().max() < 1e-13


@pytest.mark.parametrize("size", [2, 4])
def test_virtual_shard_grams_sum_to_unsplit_and_qr_svd_match(size):
    """Row shards of a factor: shard-local Grams summed = the unsplit Gram; Cholesky-QR2 over the shards gives the
    unsplit canonical Q (concatenated) and the same R on every shard; the low-rank SVD matches too."""
    gen = torch.Generator().manual_seed(2)
    full = torch.randn(32, 6, generator=gen)
    parts = list(full.chunk(size))
    torch.testing.assert_close(sum(gram64(p) for p in parts), gram64(full), rtol=1e-13, atol=1e-12)
    def reduce(grams):
        virtual_partial_sum([("f", None, g) for g in grams])
    shards = cholesky_qr2(parts, reduce)
    (q_ref, r_ref), = cholesky_qr2([full])
    torch.testing.assert_close(torch.cat([s[0] for s in shards]), q_ref, rtol=0, atol=1e-12)
    assert all(torch.equal(s[1], shards[0][1]) for s in shards)
    torch.testing.assert_close(shards[0][1], r_ref, rtol=1e-12, atol=1e-12)
    right = torch.randn(20, 6, generator=gen)
    owners = ["L"] * size + ["R"] * size
    def reduce_svd(grams):
        virtual_partial_sum([(o, None, g) for o, g in zip(owners, grams) if o == "L"])
    out, _ = low_rank_svd(parts, [right] * size, [1.3] * size, 3, reduce_svd)
    (u_ref, s_ref, v_ref), = low_rank_svd([full], [right], [1.3], 3)[0]
    torch.testing.assert_close(torch.cat([o[0] for o in out]), u_ref, rtol=0, atol=1e-10)
    for o in out:
        torch.testing.assert_close(o[1], s_ref, rtol=1e-12, atol=0)
        torch.testing.assert_close(o[2], v_ref, rtol=0, atol=1e-10)


def test_low_rank_svd_matches_dense_svd_and_survives_rank_deficiency():
    """Top-r singular triplets of ΔW = s L Rᵀ without forming it (vs torch.linalg.svd), also when a factor is
    rank-deficient (eigenbasis fallback); only a ΔW of rank < r is reported."""
    gen = torch.Generator().manual_seed(3)
    left, right = torch.randn(30, 8, generator=gen), torch.randn(20, 8, generator=gen)
    for case in ("full", "deficient factor", "rank below r"):
        if case == "deficient factor":
            left[:, 5] = left[:, 2]
        if case == "rank below r":
            left[:, 3:] = 0
        (u, s, v), = (res := low_rank_svd([left], [right], [1.5], 4))[0]
        assert res[1] == ([0] if case == "rank below r" else [])
        dense = 1.5 * left.double() @ right.double().mT
        u_ref, s_ref, vh_ref = torch.linalg.svd(dense)
        torch.testing.assert_close(s, s_ref[:4], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close((u * s) @ v.mT, (u_ref[:, :4] * s_ref[:4]) @ vh_ref[:4], rtol=0, atol=1e-9)


def test_rank_deficient_or_non_finite_factor_has_no_qr():
    """Cholesky-QR2 returns None (never NaN) for a rank-deficient or non-finite matrix, beside a good one."""
    good = torch.randn(10, 3)
    bad, nan = good.clone(), good.clone()
    bad[:, 2] = 2 * bad[:, 0]
    nan[0, 0] = math.nan
    out = cholesky_qr2([good, bad, nan])
    assert out[0] is not None and out[1] is None and out[2] is None


def test_od_gradients_are_the_projected_full_gradient():
    """With the bases fixed, autograd gives ∂L/∂A = s Q_Bᵀ G and ∂L/∂B = s G Q_A, where G = ∂L/∂W_eff comes
    from a dense reference whose W_eff = W + s(Q_B A + B Q_Aᵀ) is a leaf."""
    a = _adapter()
    gen = torch.Generator().manual_seed(4)
    x, gy = torch.randn(2, 7, 16, generator=gen, requires_grad=True), torch.randn(2, 7, 24, generator=gen)
    y = a(x, x @ a.site.weight.T)
    (y * gy).sum().backward()
    w_eff = (a.site.weight + a.scale * (a.Q_B @ a.lora_A + a.lora_B @ a.Q_A.mT)).detach().requires_grad_(True)
    torch.testing.assert_close(y, x @ w_eff.T, rtol=1e-5, atol=1e-5)
    ((x.detach() @ w_eff.T) * gy).sum().backward()
    g = w_eff.grad
    torch.testing.assert_close(x.grad, gy @ w_eff.detach(), rtol=1e-5, atol=1e-5)  # ∂x through both paths
    torch.testing.assert_close(a.lora_A.grad, a.scale * a.Q_B.mT @ g, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.lora_B.grad, a.scale * g @ a.Q_A, rtol=1e-5, atol=1e-5)
    assert a.Q_A.grad is None and a.Q_B.grad is None


def test_one_sgd_step_moves_dw_by_exactly_minus_eta_gtilde():
    """ΔW is linear in (A, B) for fixed bases: one SGD step changes it by exactly −η s²(G Q_A Q_Aᵀ + Q_B Q_Bᵀ G)."""
    a = _adapter(cfg=OdLoraConfig(r=4, lora_alpha=4.0, init_rounds=1))
    x, gy = torch.randn(9, 16, dtype=torch.float32), torch.randn(9, 24)
    (a(x, x @ a.site.weight.T) * gy).sum().backward()
    before, g, eta = a.delta_weight().detach().double(), (gy.T @ x).double(), 0.05
    torch.optim.SGD([a.lora_A, a.lora_B], lr=eta).step()
    qa, qb = a.Q_A.double(), a.Q_B.double()
    g_tilde = a.scale ** 2 * (g @ qa @ qa.mT + qb @ qb.mT @ g)
    torch.testing.assert_close(a.delta_weight().double() - before, -eta * g_tilde, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ["column", "row"])
@pytest.mark.parametrize("size", [2, 4])
def test_od_lora_virtual_shards_reassemble_to_unsplit(kind, size):
    """Column and row shards (2 and 4) of the OD form (bases sharded with their factor) give the unsplit
    outputs, input gradients and A/B gradients."""
    W = torch.randn(24, 16, generator=torch.Generator().manual_seed(5))
    compare_with_unsplit(OdLoraAdapter, CFG, W, od_state(24, 16, 4), kind, size)


def test_lora_form_of_round_one_is_lora():
    """Before the first reset (od_form = 0) the adapter is LoRA: same output as LoraAdapter with the same A, B."""
    gen = torch.Generator().manual_seed(6)
    state = {"lora_A": torch.randn(4, 16, generator=gen), "lora_B": torch.randn(24, 4, generator=gen)}
    site = Site("s", "q_proj", 0, 24, 16, torch.randn(24, 16, generator=gen))
    od, lora = OdLoraAdapter(site, ShardSpec(), CFG), LoraAdapter(site, ShardSpec(), LoraConfig(r=4, lora_alpha=4,
                                                                                                use_rslora=True))
    od.load_full(state), lora.load_full(state)
    x = torch.randn(5, 16, generator=gen)
    assert not od.od_active
    torch.testing.assert_close(od(x, x @ site.weight.T), lora(x, x @ site.weight.T), rtol=0, atol=0)
    compare_with_unsplit(OdLoraAdapter, CFG, site.weight, state, "column", 2)


def test_eq5_resplit_is_the_truncated_svd_and_a_refresh_right_after_keeps_dw():
    """The Eq. 5 re-split sets ΔW to the rank-r truncated SVD of the rank-2r ΔW, makes the bases exact
    (QR(Aᵀ) = V_r, QR(B) = U_r with signs fixed), and clears the optimizer state; an immediate refresh is a no-op."""
    a = _adapter()
    ctx = _ctx([a])
    ctx.optimizer.state[a.lora_A]["momentum_buffer"] = torch.ones_like(a.lora_A)
    dense = a.delta_weight().detach().double()
    u, s, vh = torch.linalg.svd(dense)
    controller = OdLoraController({"q": a})
    controller.svd_event(ctx, resplit=True)
    torch.testing.assert_close(a.delta_weight().double(), (u[:, :4] * s[:4]) @ vh[:4], rtol=0, atol=1e-5)
    assert not ctx.optimizer.state[a.lora_A] and controller.counts["resplit"] == 1
    before = a.delta_weight().detach().clone()
    controller.refresh()
    assert (a.delta_weight() - before).norm() / before.norm() < 1e-6


def test_sign_fixed_refresh_barely_moves_dw_while_unsigned_qr_flips_it():
    """After the re-split and one small SGD step, a sign-fixed refresh changes ΔW by < 1e-5 (relative); the raw
    Householder Q (negative diagonal entries in R) changes it by order 1, the failure the erratum fixes."""
    a = _adapter()
    controller = OdLoraController({"q": a})
    controller.svd_event(_ctx([a]), resplit=True)
    x, gy = torch.randn(9, 16, generator=torch.Generator().manual_seed(7)), torch.randn(9, 24)
    (a(x, x @ a.site.weight.T) * gy).sum().backward()
    with torch.no_grad():
        for p in (a.lora_A, a.lora_B):
            p -= 1e-6 * p.grad / p.grad.norm() * p.norm()  # a step of 1e-6 relative, as a small Adam step
    before = a.delta_weight().detach().clone()
    raw_qa, raw_ra = torch.linalg.qr(a.lora_A.detach().mT)
    raw_qb, raw_rb = torch.linalg.qr(a.lora_B.detach())
    assert (torch.diagonal(raw_ra) < 0).any() or (torch.diagonal(raw_rb) < 0).any()
    controller.refresh()
    assert (a.delta_weight() - before).norm() / before.norm() < 1e-5
    unsigned = a.scale * (raw_qb @ a.lora_A + a.lora_B @ raw_qa.mT)
    assert (unsigned - before).norm() / before.norm() > 0.1


def test_schedule_has_the_papers_event_counts():
    """T_total = 3125, N = 5, T = 10: 1419 refreshes (45.4 % of main steps), 5 resets + 1 re-split = 6 SVD events
    (specs/odlora.md T7), and refresh intervals 1 … 5 over the five phases."""
    cfg = OdLoraConfig()
    total = 3125 + 50
    events = [schedule_event(t, cfg, total) for t in range(1, total + 1)]
    assert events.count("refresh") == 1419
    assert events.count("reset") == 5 and events.count("resplit") == 1
    assert [t for t, e in enumerate(events, 1) if e == "reset"] == [10, 20, 30, 40, 50]
    assert events[59] == "resplit" and events[60] == "refresh" and events[61] == "refresh"
    last = [t for t, e in enumerate(events, 1) if e == "refresh"][-3:]
    assert np.diff(last).tolist() == [5, 5]


def test_trainer_runs_every_event_and_clears_optimizer_state(tmp_path):
    """Through the Trainer (N = 2, T = 2): resets after steps 2 and 4 empty the optimizer state and switch on the
    OD form; the re-split and refreshes follow; the bases stay orthonormal and training lowers the loss."""
    method = {**METHOD, "init_rounds": 2}
    trainer = Trainer(tiny_config(tmp_path, method=method, train={"steps": 16}), echo=lambda m: None)
    adapters = list(trainer.controller.adapters.values())
    trainer.train_step()
    assert not adapters[0].od_active and trainer.optimizer.state[adapters[0].lora_A]
    trainer.train_step()
    assert adapters[0].od_active and not trainer.optimizer.state.get(adapters[0].lora_A)
    assert all(a.lora_A.abs().max() == 0 and a.lora_B.abs().max() == 0 for a in adapters)
    summary = trainer.run()
    assert dict(trainer.controller.counts) == {"reset": 2, "resplit": 1, "refresh": 4}
    for a in adapters:
        for q in (a.Q_A, a.Q_B):
            torch.testing.assert_close(q.mT @ q, torch.eye(4), rtol=0, atol=1e-5)
    assert summary["eval_after"]["eval_loss"] < summary["eval_before"]["eval_loss"]


def test_resume_is_bitwise_identical_to_a_straight_run(tmp_path):
    """12 steps straight (checkpoint at step 6) vs a new Trainer resumed from that checkpoint for steps 7 … 12
    (dropout and accumulation on; reset, re-split and refreshes on both sides of the stop): identical losses,
    adapter weights and bases. (The refresh schedule reads train.steps, so both use the same run length.)"""
    method = {**METHOD, "lora_dropout": 0.1}
    train = {"steps": 12, "micro_batch_size": 2, "grad_accum": 2, "save_every": 6}
    straight = Trainer(tiny_config(tmp_path, method=method, train=train), echo=lambda m: None)
    straight.run()
    resumed = Trainer(tiny_config(tmp_path, method=method, train=train), echo=lambda m: None,
                      resume=ckpt.checkpoint_dir(tmp_path, 6))
    resumed.run()
    losses = [r["loss"] for r in straight.history if "loss" in r]
    assert losses[6:] == [r["loss"] for r in resumed.history if "loss" in r]
    assert resumed.controller.counts["refresh"] == 3 and straight.controller.counts["refresh"] == 4
    for name, value in straight.params.items():
        assert torch.equal(value, resumed.params[name]), name
    for key, value in straight.controller.state_dict().items():
        assert torch.equal(value, resumed.controller.state_dict()[key]), key


def test_adapter_files_restore_the_bases(tmp_path):
    """save_adapter writes Q_A, Q_B and the form flag; load_adapter into a fresh model gives the same logits."""
    trainer = Trainer(tiny_config(tmp_path, method=METHOD, train={"steps": 6}), echo=lambda m: None)
    trainer.run()
    ids = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(8))
    expected = trainer.model(ids).logits
    save_adapter(trainer.model, tmp_path / "files")
    fresh = Trainer(tiny_config(tmp_path / "fresh", method=METHOD, train={"steps": 6}), echo=lambda m: None).model
    assert not torch.allclose(fresh(ids).logits, expected, atol=1e-3)
    load_adapter(fresh, tmp_path / "files")
    assert all(s.adapter.od_active for s in adapted_sites(fresh).values())
    torch.testing.assert_close(fresh(ids).logits, expected, rtol=0, atol=0)


def test_orthonormal_bases_maximise_the_gradient_cosine():
    """Theorem 1 (cosine form, specs/odlora.md T6): for the same subspaces, the OD-LoRA equivalent gradient
    (bases) is at least as aligned with G as LoRA's (factors with spread singular values), for random G."""
    gen = torch.Generator().manual_seed(9)
    for _ in range(20):
        spread = torch.logspace(0, 1, 4, dtype=torch.float64)  # singular values over a decade
        g = torch.randn(24, 16, generator=gen, dtype=torch.float64)
        a = torch.randn(4, 16, generator=gen, dtype=torch.float64) * spread[:, None]
        b = torch.randn(24, 4, generator=gen, dtype=torch.float64) * spread.flip(0)
        lora = equivalent_gradient_cosine(g, b, a.mT)
        od = equivalent_gradient_cosine(g, sign_fixed_qr(b)[0], sign_fixed_qr(a.mT)[0])
        g_tilde = g @ a.mT @ a + b @ b.mT @ g
        assert math.isclose(lora, float((g * g_tilde).sum() / g.norm() / g_tilde.norm()), rel_tol=1e-9)
        assert od >= lora - 1e-12


def gradient_cosines(trainer, steps):
    """Train ``steps`` steps; per step, the unweighted mean over sites of cos(G, G̃) (specs/odlora.md §4.8), as
    ``dist-peft compare`` measures it (``compare/probes.py``)."""
    probe = GradientCosine(trainer)
    try:
        for _ in range(steps):
            trainer.train_step()
    finally:
        probe.close()
    return probe.values


def test_od_lora_gradient_cosine_exceeds_lora_on_the_tiny_model(tmp_path):
    """The paper's metric (Fig. 4) through the Trainer: after its bases exist, OD-LoRA's equivalent gradient is
    better aligned with the full gradient than LoRA's, step by step, on the same data."""
    od = Trainer(tiny_config(tmp_path / "od", method=METHOD, train={"steps": 10}), echo=lambda m: None)
    lora = Trainer(tiny_config(tmp_path / "lora", method={"name": "lora", "target_modules": METHOD["target_modules"],
                                                          "r": 4, "lora_alpha": 8}, train={"steps": 10}),
                   echo=lambda m: None)
    od_cos, lora_cos = gradient_cosines(od, 10), gradient_cosines(lora, 10)
    assert all(o > l for o, l in zip(od_cos[2:], lora_cos[2:])), (od_cos, lora_cos)


def test_bad_factors_skip_the_layer_with_a_counted_warning():
    """A NaN or rank-deficient factor: that layer keeps its bases (refresh) or is left alone (SVD event), the
    others are processed, a warning is counted, and no basis becomes non-finite."""
    good, nan, flat = _adapter(seed=0), _adapter(seed=1), _adapter(seed=2)
    with torch.no_grad():
        nan.lora_A[0, 0] = math.nan
        flat.lora_B.zero_()
    controller = OdLoraController({"good": good, "nan": nan, "flat": flat})
    old = {n: (a.Q_A.clone(), a.Q_B.clone()) for n, a in controller.adapters.items()}
    with pytest.warns(RuntimeWarning, match="refresh skipped .* for 2 layer"):
        controller.refresh()
    assert controller.counts["refresh_skipped"] == 2
    assert not torch.equal(good.Q_A, old["good"][0])
    for name in ("nan", "flat"):
        assert torch.equal(controller.adapters[name].Q_A, old[name][0])
    with pytest.warns(RuntimeWarning, match="SVD event skipped"):
        controller.svd_event(_ctx(controller.adapters.values()), resplit=True)
    assert controller.counts["svd_skipped"] == 1 and torch.equal(nan.Q_B, old["nan"][1])
    assert all(torch.isfinite(t).all() for a in (good, flat) for t in (a.Q_A, a.Q_B, a.lora_A, a.lora_B))


def test_one_coalesced_all_reduce_per_cholesky_pass_for_all_layers(monkeypatch):
    """Under a real split (a process group), a refresh of 3 column-split layers reduces their 3 partial Q_B Grams
    in exactly one all-reduce per Cholesky-QR pass; the replicated A side reduces nothing."""
    calls = []
    monkeypatch.setattr(collectives, "all_reduce_coalesced", lambda ts, group: calls.append(len(ts)))
    spec = ShardSpec("column", 0, 2, group=object())
    adapters = {f"l{i}": _adapter(spec=spec, seed=i, full=od_state(24, 16, 4, seed=i)) for i in range(3)}
    OdLoraController(adapters).refresh()
    assert calls == [3, 3]


def test_config_rejects_bad_values():
    """Each invalid OdLoraConfig field is one ValueError whose message starts with the field name."""
    for kwargs, field in [({"r": 0}, "r"), ({"init_rounds": 0}, "init_rounds"), ({"init_steps": 0}, "init_steps"),
                          ({"rank_tol": 0.0}, "rank_tol"), ({"lora_dropout": 1.0}, "lora_dropout")]:
        with pytest.raises(ValueError, match=f"^{field}:"):
            OdLoraConfig(**kwargs)


def cosine_report(config, steps, window=5):
    """Report helper (specs/odlora.md §4.8, Fig. 4): train OD-LoRA from ``config`` and a LoRA twin (same targets,
    rank, data, seed; lora_alpha = 2r, the paper's LoRA scale) for ``steps`` steps each and print the per-step mean
    cos(G, G̃) over sites and its rolling mean. ``python -c "import sys; sys.path.insert(0, 'tests');
    import test_odlora as t; t.cosine_report('configs/odlora-smollm2.yaml', 30)"``."""
    from dist_peft.train.config import load_config

    od_cfg = load_config(config, {"train.progress": False, "output.dir": "runs/cosine-odlora"})
    m = od_cfg.method
    lora_cfg = load_config(config, {"train.progress": False, "output.dir": "runs/cosine-lora", "method": {
        "name": "lora", "target_modules": list(m.target_modules), "r": m.options.r, "lora_alpha": 2 * m.options.r}})
    rows = {}
    for name, cfg in (("odlora", od_cfg), ("lora", lora_cfg)):
        trainer = Trainer(cfg, echo=lambda msg: None)
        rows[name] = gradient_cosines(trainer, steps)
    for name, cos in rows.items():
        rolling = [float(np.mean(cos[max(0, i - window + 1):i + 1])) for i in range(len(cos))]
        print(name, "cos per step:", " ".join(f"{c:.3f}" for c in cos))
        print(name, f"rolling mean (window {window}):", " ".join(f"{c:.3f}" for c in rolling))
    return rows
