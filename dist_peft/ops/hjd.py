"""Hierarchical joint decomposition (HJD) of FRoD from Gram matrices — Wan et al., AAAI 2026 (FRoD), Eqs. 1–7.

The L layers of one module type hold W_1 … W_L (rows × d each, d the latent dimension). The paper stacks them,
A = [W_1; …; W_L], takes a thin QR A = Q R, and with Q_i the layer blocks of Q:

    T_π = (1/L) Σ_i (Q_iᵀ Q_i + π I)⁻¹ = Z Λ Zᵀ          (Eqs. 3–4; the average runs over the LAYERS of one
                                                           module type — spec erratum, Eq. 3 as printed is I/(1+π))
    V = Rᵀ Z,   B_i = Q_i Z = W_i V⁻ᵀ,   Σ_i = diag ‖B_i[:, k]‖₂,   U_i = B_i Σ_i⁻¹,   W_i = U_i Σ_i Vᵀ   (Eqs. 5–7)

Gram form (spec §2.3 item 5; every step below is d × d, so ranks exchange Grams, never weights):

    G_i = W_iᵀ W_i,   G = Σ_i G_i = Rᵀ R          (R: Cholesky factor of G, upper triangular)
    (Q_iᵀ Q_i + π I)⁻¹ = R (G_i + π G)⁻¹ Rᵀ,  so  T_π = R · [(1/L) Σ_i (G_i + π G)⁻¹] · Rᵀ
    σ_{i,k}² = (Bᵀ G_i B)_{kk} with B = R⁻¹ Z = V⁻ᵀ,   U_i = W_i B Σ_i⁻¹ (only where a form needs U)

G needs every G_i, (G_i + πG)⁻¹ needs G, and σ_i needs Z (all L inverses): three passes over the layers, each
recomputing G_i from W_i, hold one layer's Gram at a time instead of L (parallel/hjd_cache.py).

Symbols: d latent dimension, L layers, π ridge constant (``regularization_alpha`` in the reference code), R upper
triangular d × d, Z orthogonal d × d (eigenvectors of T_π, ascending eigenvalues λ), V = RᵀZ shared by the L
layers, σ_i the strengths of layer i (Σ_i σ_{i,k}² = 1 for every k, spec §2.3 item 2).

Decision (specs/frod.md §8.2): each column of Z is sign-fixed so that its entry of largest magnitude is
positive; eigh's sign is otherwise arbitrary and ranks must agree bit for bit.
Decision (specs/frod.md §8.3 numerics): R comes from the Cholesky factor of the fp64 Gram sum when the 1-norm
condition estimate of R is at most ``MAX_GRAM_COND`` (the Gram squares cond(W), so beyond 1e6 it would keep fewer
than 4 of fp64's 16 digits); otherwise from a TSQR of the weight blocks folded one block at a time
(R ← qr([R; block]).R), whose error grows with cond(W) only. A numerically singular stack (rank < d, e.g.
L·rows < d) has no invertible V: ``RankDeficientError``.
All kernels compute in fp64 and are pure (tensors in, tensors out).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

MAX_GRAM_COND = 1e6
"""Largest 1-norm condition number of R accepted from the Cholesky route before falling back to TSQR."""
RANK_TOL = 1e-13
"""|R_kk| below RANK_TOL · max |R_kk| after TSQR: the stacked weights are numerically rank-deficient."""


class RankDeficientError(ValueError):
    """The stacked weights of a module type do not have full column rank, so V = RᵀZ is not invertible."""


def latent_gram(w: Tensor, side: str) -> Tensor:
    """fp64 Gram of the latent side of W (rows_out × cols_in): WᵀW (``input``: d = in) or WWᵀ (``output``:
    d = out, the HJD of Wᵀ). Cost 2·m·d² flops; a column- (input) or row-split (output) shard gives a partial
    sum over the group."""
    w = w.detach().to(torch.float64)
    return w.T @ w if side == "input" else w @ w.T


def cholesky_r(g: Tensor) -> Tensor | None:
    """Upper-triangular R with RᵀR = G, or None when G is not numerically positive definite or cond₁(R) >
    MAX_GRAM_COND (then use ``tsqr_step``)."""
    lower, info = torch.linalg.cholesky_ex(g)
    if info.item() != 0:
        return None
    r = lower.T
    cond = condition_1(r)
    return r if math.isfinite(cond) and cond <= MAX_GRAM_COND else None


def condition_1(r: Tensor) -> float:
    """cond₁(R) = ‖R‖₁ ‖R⁻¹‖₁ of an upper-triangular R (one triangular solve, d³/3 flops)."""
    eye = torch.eye(r.shape[0], dtype=r.dtype, device=r.device)
    r_inv = torch.linalg.solve_triangular(r, eye, upper=True)
    return float(torch.linalg.matrix_norm(r, 1) * torch.linalg.matrix_norm(r_inv, 1))


def tsqr_step(r: Tensor | None, block: Tensor) -> Tensor:
    """R (d × d) of the stacked rows [R; block] (``r`` None: of ``block`` alone): one step of a streamed TSQR, so
    the R of L blocks (or of the R factors of several ranks) is folded in one block at a time and never needs
    them all at once. Cost 2·(d + rows)·d² flops. Fewer than d rows so far leave zero rows at the bottom
    (``check_full_rank`` refuses a final R with them). Row signs are free: ``positive_rows`` fixes them at the
    end."""
    block = block.to(torch.float64)
    r = torch.linalg.qr(block if r is None else torch.cat([r, block]), mode="r")[1]
    short = r.shape[1] - r.shape[0]
    return torch.cat([r, r.new_zeros(short, r.shape[1])]) if short > 0 else r


def positive_rows(r: Tensor) -> Tensor:
    """R with its rows' signs flipped so that diag(R) >= 0 (the R of ``cholesky_r``)."""
    signs = torch.where(torch.diagonal(r) < 0, -1.0, 1.0).to(r.dtype)
    return signs[:, None] * r


def check_full_rank(r: Tensor) -> Tensor:
    """``r`` itself when it is square with |R_kk| > RANK_TOL · max |R_kk|; else ``RankDeficientError``."""
    diag = torch.diagonal(r).abs()
    if r.shape[0] < r.shape[1] or diag.min() <= RANK_TOL * diag.max():
        raise RankDeficientError(f"the stacked weights have rank < {r.shape[1]} (R is {tuple(r.shape)}, smallest "
                                 f"|R_kk| {diag.min().item():.2e}); FRoD needs L·rows >= d and independent rows")
    return r


def inverse_ridge(g_i: Tensor, g: Tensor, pi: float) -> Tensor:
    """(G_i + π G)⁻¹ through its Cholesky factor (SPD for π > 0 and G positive definite); d³ flops."""
    return torch.cholesky_inverse(torch.linalg.cholesky(g_i + pi * g))


def joint_eigenbasis(r: Tensor, mean_inverse: Tensor) -> tuple[Tensor, Tensor]:
    """(λ ascending, Z sign-fixed) of T_π = R · mean_inverse · Rᵀ (Eq. 4 in Gram form); ~10 d³ flops."""
    t = r @ mean_inverse @ r.T
    lam, z = torch.linalg.eigh(0.5 * (t + t.T))
    peak = z.abs().argmax(0)
    signs = torch.sign(z[peak, torch.arange(z.shape[1])])
    return lam, z * torch.where(signs == 0, 1.0, signs).to(z.dtype)


def inverse_transpose_basis(r: Tensor, z: Tensor) -> Tensor:
    """B = R⁻¹ Z = V⁻ᵀ (triangular solve, d³ flops)."""
    return torch.linalg.solve_triangular(r, z, upper=True)


def strengths(g_i: Tensor, b: Tensor) -> Tensor:
    """σ_i = sqrt(diag(Bᵀ G_i B)) = column norms of B_i = W_i B (Eq. 6) without forming B_i; 2 d³ flops."""
    return torch.sqrt(torch.clamp((b * (g_i @ b)).sum(0), min=0.0))


def factor_u(w: Tensor, b: Tensor, sigma: Tensor, side: str) -> Tensor:
    """U_i = W_i B Σ_i⁻¹ (``input``) or Wᵢᵀ B Σ_i⁻¹ (``output``, the HJD of Wᵀ): rows × d, unit-norm columns.
    Only the reference checks and form P need it; FRoD's training form never stores U (spec §3.4 form M)."""
    w = w.to(torch.float64)
    return ((w if side == "input" else w.T) @ b) / sigma


def joint_basis(r: Tensor, z: Tensor) -> Tensor:
    """V = Rᵀ Z (Eq. 5)."""
    return r.T @ z
