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
"""

from __future__ import annotations

import torch
from torch import Tensor

COLUMN, SCALAR, SKIP = 0, 1, 2
"""How each layer was scaled: column-wise (Theorem 5), scalar fallback (Theorem 3), or skipped."""


def scaling_system(ata: Tensor, btb: Tensor, ptp: Tensor, qtq: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
    """(M, λ) of Eq. 11 from batched r x r Grams (N, r, r): M (N, 2r, 2r), λ (N, 2r), in the Grams' dtype."""
    kk = k * k
    top = torch.cat([ata * qtq, kk], -1)
    bottom = torch.cat([kk.mT, ptp * btb], -1)
    lam = torch.cat([torch.diagonal(qtq, dim1=-2, dim2=-1), torch.diagonal(ptp, dim1=-2, dim2=-1)], -1)
    return torch.cat([top, bottom], -2), lam


def column_solution(m: Tensor, lam: Tensor, rtol: float = 1e-12) -> Tensor:
    """v = M⁺ λ (N, 2r) with Jacobi scaling, fp64 (singular values below rtol · σ_max count as zero). Rows of M
    must be finite. Decision: the minimum-norm solution comes from LAPACK's rank-revealing gelsd on CPU (one
    call for the batch; far cheaper there than a batched pinv) and from the pseudo-inverse on GPU, where
    ``lstsq`` has no rank-revealing driver."""
    m, lam = m.double(), lam.double()
    d = torch.diagonal(m, dim1=-2, dim2=-1).clamp_min(0).sqrt()
    d = torch.where(d > 0, d, torch.ones_like(d))
    scaled, rhs = m / (d[..., :, None] * d[..., None, :]), (lam / d)[..., None]
    if scaled.device.type == "cpu":
        sol = torch.linalg.lstsq(scaled, rhs, rcond=rtol, driver="gelsd").solution
    else:
        sol = torch.linalg.pinv(scaled, rtol=rtol, hermitian=True) @ rhs
    return sol[..., 0] / d


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


def optimal_scaling(m: Tensor, lam: Tensor, c: float, tol: float = 1e-6,
                    column: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """(α, β, kind) for N layers: α, β (N, r) fp64 and kind (N,) in {COLUMN, SCALAR, SKIP}.

    SKIP (α = β = 1) where M or λ is not finite, where λ = 0 (a zero gradient: Assumption 2 fails), or where the
    result is not finite. COLUMN where v = M⁺λ >= -tol · max|v| (and ``column``), else SCALAR. Decision
    (specs/scalora.md G9): a column with α_j = β_j = 0 would be dead for good, so it keeps α_j = β_j = 1."""
    m, lam = m.double(), lam.double()
    r = lam.shape[-1] // 2
    ok = torch.isfinite(m).flatten(1).all(1) & torch.isfinite(lam).all(1) & (lam.sum(1) > 0)
    m = torch.where(ok[:, None, None], m, torch.eye(2 * r, dtype=m.dtype, device=m.device))
    lam = torch.where(ok[:, None], lam, torch.ones_like(lam))
    v = column_solution(m, lam)
    nonneg = (v >= -tol * v.abs().amax(1, keepdim=True)).all(1) & torch.isfinite(v).all(1) & column
    al2, be2 = scalar_solution(m, lam)
    phi = torch.where(nonneg[:, None], v[:, :r].clamp_min(0), al2[:, None].expand(-1, r)) / c
    psi = torch.where(nonneg[:, None], v[:, r:].clamp_min(0), be2[:, None].expand(-1, r)) / c
    alpha, beta = phi.sqrt(), psi.sqrt()
    dead = (alpha == 0) & (beta == 0)
    alpha, beta = torch.where(dead, 1.0, alpha), torch.where(dead, 1.0, beta)
    ok &= torch.isfinite(alpha).all(1) & torch.isfinite(beta).all(1)
    kind = torch.where(ok, torch.where(nonneg, COLUMN, SCALAR), SKIP)
    one = torch.ones_like(alpha)
    return torch.where(ok[:, None], alpha, one), torch.where(ok[:, None], beta, one), kind
