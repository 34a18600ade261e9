"""ScaLoRA's optimal scalings from r x r Grams: the 2r x 2r column-scaling system (Theorem 5, Eq. 11, with the
erratum S^B = [GᵀA, B]) and the scalar fallback (Theorem 3), batched over layers (specs/scalora.md §1.4, §1.5).

Paper notation (W = W^pt + A Bᵀ, A: m x r output side, B: n x r input side, G = ∂ℓ/∂W, P = G B, Q = Gᵀ A):

    M = [[ AᵀA ⊙ QᵀQ ,  K ⊙ K     ],          K = Aᵀ P = Qᵀ B   (r x r)
         [ Kᵀ ⊙ Kᵀ  ,   PᵀP ⊙ BᵀB ]]          λ = [diag(QᵀQ); diag(PᵀP)]          (2r)
    M v = λ,   [α²; β²] = v / c,   c = L η (the GD step on W; the caller folds the LoRA scale in)      (Eq. 11)

M is the Frobenius Gram of the 2r directions {a_j a_jᵀ G} ∪ {G b_j b_jᵀ} and λ their inner products with G, so
(φ, ψ) = (α², β²) ↦ Eq. 10 is a least-squares problem; Theorem 5: a non-negative solution is the optimum of Eq. 10.
v does not change when G is scaled, so gradients carrying the LoRA scale s (or clipping, or loss scaling) serve.

Decision (specs/scalora.md G6): Jacobi-scale M (D = diag(M)) and take the minimum-norm solution in fp64; M is
singular at t = 0 (one factor is zero) and for collinear columns, and the pseudo-inverse gives φ = 0 for a zero
factor. Decision (G7): v counts as non-negative when v >= -tol · max|v|; small negatives are clamped to 0.

Theorem 3 (scalar α, β) is the 2-variable non-negative least squares with Gram [[nA, kk], [kk, nB]] and right-hand
side [a, b] / c, whose entries are block sums of M and λ: nA = ΣM_AA, kk = ΣM_AB, nB = ΣM_BB, a = Σλ_A, b = Σλ_B;
C^A = a nB − b kk, C^B = b nA − a kk, C = nA nB − kk² (cases of Theorem 3 below).

Issue 18 (solver ``nnls``): where v has a negative entry the paper falls back to Theorem 3, whose optimum lies
1–9 % of the initial objective above the true constrained one. Eq. 10 in (φ, ψ) is the non-negative least squares
min_{u >= 0} uᵀ M u − 2 λᵀ u (= ‖S u − g‖² − ‖g‖², SᵀS = M, Sᵀg = λ; u = c·(φ, ψ)), so ``nnls_solution``
reaches it exactly: Lawson–Hanson's active set on the 2r x 2r normal equations. It contains both paper
answers (the feasible closed form is the unconstrained optimum; the scalar one is a feasible point), so it is
never worse than either.
"""

from __future__ import annotations

import torch
from torch import Tensor

COLUMN, SCALAR, SKIP, ACTIVE = 0, 1, 2, 3
"""How each layer was scaled: column-wise (Theorem 5: v >= 0), scalar fallback (Theorem 3; solver ``paper``),
skipped, or column-wise at the NNLS optimum with a binding bound (some φ_j or ψ_j held at 0; solver ``nnls``)."""


REVIVE = 1e-3
"""β_j of a pair that the NNLS optimum zeroes on both sides (``optimal_scaling``, G9)."""


def scaling_system(ata: Tensor, btb: Tensor, ptp: Tensor, qtq: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
    """(M, λ) of Eq. 11 from batched r x r Grams (N, r, r): M (N, 2r, 2r), λ (N, 2r), in the Grams' dtype."""
    kk = k * k
    top = torch.cat([ata * qtq, kk], -1)
    bottom = torch.cat([kk.mT, ptp * btb], -1)
    lam = torch.cat([torch.diagonal(qtq, dim1=-2, dim2=-1), torch.diagonal(ptp, dim1=-2, dim2=-1)], -1)
    return torch.cat([top, bottom], -2), lam


def _jacobi(m: Tensor, lam: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(D⁻½ M D⁻½, D⁻½ λ, d = √diag(M)) in fp64: unit diagonal; a zero direction keeps d = 1 (its row stays 0)."""
    m, lam = m.double(), lam.double()
    d = torch.diagonal(m, dim1=-2, dim2=-1).clamp_min(0).sqrt()
    d = torch.where(d > 0, d, torch.ones_like(d))
    return m / (d[..., :, None] * d[..., None, :]), lam / d, d


def column_solution(m: Tensor, lam: Tensor, rtol: float = 1e-12) -> Tensor:
    """v = M⁺ λ (N, 2r) with Jacobi scaling, fp64 (singular values below rtol · σ_max count as zero). Rows of M
    must be finite. Decision: the minimum-norm solution comes from LAPACK's rank-revealing gelsd on CPU (one
    call for the batch; far cheaper there than a batched pinv) and from the pseudo-inverse on GPU, where
    ``lstsq`` has no rank-revealing driver."""
    scaled, rhs, d = _jacobi(m, lam)
    if scaled.device.type == "cpu":
        sol = torch.linalg.lstsq(scaled, rhs[..., None], rcond=rtol, driver="gelsd").solution
    else:
        sol = torch.linalg.pinv(scaled, rtol=rtol, hermitian=True) @ rhs[..., None]
    return sol[..., 0] / d


def _passive_solve(m: Tensor, lam: Tensor, passive: Tensor, ridge: float = 1e-12) -> tuple[Tensor, Tensor]:
    """(s, factored): s = argmin of uᵀMu − 2λᵀu with u_j = 0 off the passive set (N, n), M unit-diagonal, by a
    Cholesky solve of M on the set (identity elsewhere); ``factored`` (N,): the factorisation succeeded (else s is
    not a solution: M is not positive definite on the set). The ridge (relative to the unit diagonal, far below fp64
    rounding of the objective's 1e-9 target) keeps collinear passive columns finite; no error check, so no host
    sync."""
    eye = torch.eye(m.shape[-1], dtype=m.dtype, device=m.device)
    a = torch.where(passive[..., :, None] & passive[..., None, :], m, eye) + ridge * eye
    chol, info = torch.linalg.cholesky_ex(a)
    return torch.cholesky_solve(torch.where(passive, lam, torch.zeros_like(lam))[..., None], chol)[..., 0], info == 0


def _lawson_hanson_step(m: Tensor, lam: Tensor, u: Tensor, passive: Tensor, inner: Tensor, done: Tensor,
                        tol: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One batched Lawson–Hanson iteration (u, passive, inner, done → the same). Outer (u optimal on the passive
    set): stop if w = λ − M u <= tol off the set, else free argmax w. Then s = the passive solution; if s > 0 on
    the set, u = s; else (inner) step u → s until the first passive entry reaches 0 and bind it."""
    n = lam.shape[-1]
    w = lam - (m @ u[..., None])[..., 0]
    best, j = torch.where(passive, -torch.inf, w).max(-1)
    outer = ~inner & ~done
    done = done | (outer & (best <= tol))
    new = torch.nn.functional.one_hot(j, n).bool() & (outer & ~done)[:, None]
    s, _ = _passive_solve(m, lam, passive | new)
    done = done | (new & (s <= 0)).any(-1)  # w_j > 0 gives s_j > 0 in exact arithmetic: w_j was rounding
    live = ~done
    passive = passive | (new & live[:, None])
    feasible = ((s > 0) | ~passive).all(-1)
    den = u - s
    ratio = torch.where(passive & (s <= 0), torch.where(den > 0, u / den.clamp_min(1e-300), 0.0), torch.inf)
    step, first = ratio.min(-1)
    t = torch.where(feasible, 1.0, step)[:, None]
    moved = u + t * (s - u)
    bind = (~feasible)[:, None] & passive & (torch.nn.functional.one_hot(first, n).bool() | (moved <= 0))
    keep = passive & ~bind
    u = torch.where(live[:, None], torch.where(keep, moved, 0.0), u)
    passive = torch.where(live[:, None], keep, passive)
    return u, passive, torch.where(live, ~feasible, inner), done


def _warm_start(m: Tensor, lam: Tensor) -> tuple[Tensor, Tensor]:
    """(u, passive): a start that meets Lawson–Hanson's outer-loop invariant (u optimal on the passive set, u > 0
    there, 0 elsewhere) from the unconstrained optimum: solve on every variable, drop the non-positive ones, solve
    again, until the solution is positive on the set. A row whose M does not factor on its set (not positive
    definite there: Grams accumulated in fp32 can make a near-collinear M slightly indefinite, where the problem has
    more than one KKT point) drops its whole set, which is the cold start u = 0, as an emptied set is. Decision: the
    cold start adds one variable per iteration, and ScaLoRA's optima have most of their 2r variables positive (about
    31 of 32 at r = 16 in the 30-layer benchmark: 33 iterations of every layer's batched Cholesky per step); from
    here the iterations only add or bind the few that differ. One host sync per round; a row that drops in a round
    dropped in every earlier one (a settled set gives the same s again), so at most n rounds."""
    passive = torch.ones_like(lam, dtype=torch.bool)
    for _ in range(lam.shape[-1]):
        s, factored = _passive_solve(m, lam, passive)
        drop = passive & (~(s > 0) | ~factored[:, None])
        if not bool(drop.any()):
            break
        passive &= ~drop
    return torch.where(passive, s, torch.zeros_like(s)), passive  # a row still dropping in the last round is empty


def nnls_solution(m: Tensor, lam: Tensor, max_iter: int = 0, rtol: float = 1e-12) -> tuple[Tensor, Tensor, Tensor]:
    """(u, active, converged) for N systems (N, n): u = argmin_{u >= 0} uᵀMu − 2λᵀu in fp64; ``active``: a bound
    binds (some u_j = 0 with w_j = (λ − M u)_j < 0: the unconstrained optimum is infeasible); ``converged``: the
    KKT conditions hold (w <= tol off the passive set, u > 0 on it). Rows of M must be finite.

    Lawson & Hanson (1974, ch. 23, NNLS) on the Jacobi-scaled normal equations, every layer in one batch, on the
    data's device, from ``_warm_start`` (up to n rounds of solves before the iterations, one host sync each).
    tol = rtol · max|D⁻½λ| per layer. Decision: no host sync per iteration: finished layers keep their state, and a
    sync after iterations 1, 2, 4, … up to n and then every n asks whether all finished (cap: ``max_iter``
    iterations after the start, default 6n)."""
    ms, ls, d = _jacobi(m, lam)
    n = ls.shape[-1]
    tol = rtol * ls.abs().amax(-1)
    u, passive = _warm_start(ms, ls)
    inner, done = torch.zeros_like(tol, dtype=torch.bool), torch.zeros_like(tol, dtype=torch.bool)
    for it in range(1, (max_iter or 6 * n) + 1):
        u, passive, inner, done = _lawson_hanson_step(ms, ls, u, passive, inner, done, tol)
        if ((it <= n and it & (it - 1) == 0) or it % n == 0) and bool(done.all()):
            break
    w = ls - (ms @ u[..., None])[..., 0]
    return u / d, (~passive & (w < -tol[:, None])).any(-1), done


def scalar_solution(m: Tensor, lam: Tensor) -> tuple[Tensor, Tensor]:
    """(c·α², c·β²) of Theorem 3 (N,), from the block sums of M and λ. Needs a + b > 0 (Assumption 2)."""
    r = lam.shape[-1] // 2
    na, kk, nb = m[:, :r, :r].sum((1, 2)), m[:, :r, r:].sum((1, 2)), m[:, r:, r:].sum((1, 2))
    a, b = lam[:, :r].sum(1), lam[:, r:].sum(1)
    ca, cb, c = a * nb - b * kk, b * na - a * kk, na * nb - kk * kk
    c = torch.where(c > 1e-12 * na * nb, c, torch.zeros_like(c))  # C >= 0 (Cauchy–Schwarz); rounding → 0
    safe = lambda x: torch.where(x > 0, x, torch.ones_like(x))  # noqa: E731  (denominators of unselected cases)
    only_a, only_b = a / safe(na), b / safe(nb)
    case3 = (c > 0) & (ca >= 0) & (cb >= 0)                    # α² = C^A / C, β² = C^B / C
    case1 = ~case3 & (((ca > 0) & (cb <= 0)) | ((c == 0) & (na > 0)))   # α² = a / nA, β = 0
    al2 = torch.where(case3, ca / safe(c), torch.where(case1, only_a, torch.zeros_like(a)))
    be2 = torch.where(case3, cb / safe(c), torch.where(case1, torch.zeros_like(b), only_b))  # case 2: α = 0
    return al2, be2


def _paper_scaling(m: Tensor, lam: Tensor, tol: float, column: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(c·α², c·β², kind) of the paper: Theorem 5 where v = M⁺λ >= -tol · max|v| (and ``column``; small negatives
    clamped to 0), else the scalar Theorem 3 (COLUMN / SCALAR)."""
    r = lam.shape[-1] // 2
    v = column_solution(m, lam)
    nonneg = (v >= -tol * v.abs().amax(1, keepdim=True)).all(1) & torch.isfinite(v).all(1) & column
    al2, be2 = scalar_solution(m, lam)
    phi = torch.where(nonneg[:, None], v[:, :r].clamp_min(0), al2[:, None].expand(-1, r))
    psi = torch.where(nonneg[:, None], v[:, r:].clamp_min(0), be2[:, None].expand(-1, r))
    return phi, psi, torch.where(nonneg, COLUMN, SCALAR)


def optimal_scaling(m: Tensor, lam: Tensor, c: float, tol: float = 1e-6, column: bool = True,
                    solver: str = "nnls") -> tuple[Tensor, Tensor, Tensor]:
    """(α, β, kind) for N layers: α, β (N, r) fp64 and kind (N,) in {COLUMN, ACTIVE, SCALAR, SKIP}.

    ``solver="nnls"``: the exact minimiser of Eq. 10 (``nnls_solution``; COLUMN where no bound binds, ACTIVE
    where one does); ``"paper"``: ``_paper_scaling``. ``column=False`` is the scalar Theorem 3 for either solver
    (already the exact 2-variable NNLS). SKIP (α = β = 1) where M or λ is not finite, where λ = 0 (a zero
    gradient: Assumption 2 fails), where the NNLS did not converge, or where the result is not finite. Decision
    (specs/scalora.md G9): a column with α_j = β_j = 0 would be dead for good (both gradients 0). ``paper`` keeps
    it (α_j = β_j = 1, G9's default). ``nnls`` meets such pairs often, and pinning them at 1 moves far from the
    optimum, so it restarts the pair as PEFT's init does: α_j = 0 (lora_B's column merged and zeroed), β_j =
    ``REVIVE`` (lora_A's row kept, scaled down). The optimum is the infimum over live pairs; this point is
    within c·REVIVE²·|∂f/∂ψ_j| of it, and Lemma 4 rescales the row's Adam moments with it (m/√v unchanged), so the
    row's next Adam steps keep their size."""
    m, lam = m.double(), lam.double()
    r = lam.shape[-1] // 2
    ok = torch.isfinite(m).flatten(1).all(1) & torch.isfinite(lam).all(1) & (lam.sum(1) > 0)
    m = torch.where(ok[:, None, None], m, torch.eye(2 * r, dtype=m.dtype, device=m.device))
    lam = torch.where(ok[:, None], lam, torch.ones_like(lam))
    nnls = column and solver == "nnls"
    if nnls:
        u, active, converged = nnls_solution(m, lam)
        ok &= converged
        phi, psi, kind = u[:, :r], u[:, r:], torch.where(active, ACTIVE, COLUMN)
    else:
        phi, psi, kind = _paper_scaling(m, lam, tol, column)
    alpha, beta = (phi / c).sqrt(), (psi / c).sqrt()
    dead = (alpha == 0) & (beta == 0)
    alpha, beta = torch.where(dead, 0.0 if nnls else 1.0, alpha), torch.where(dead, REVIVE if nnls else 1.0, beta)
    ok &= torch.isfinite(alpha).all(1) & torch.isfinite(beta).all(1)
    one = torch.ones_like(alpha)
    return torch.where(ok[:, None], alpha, one), torch.where(ok[:, None], beta, one), torch.where(ok, kind, SKIP)
