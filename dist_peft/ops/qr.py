"""Sign-fixed thin QR and low-rank SVD of tall-skinny factors, whole or row-sharded (OD-LoRA's bases,
specs/odlora.md §1.4, §6.3, §6.4), with the reduction of partial Gram matrices over a split passed in.

    M = Q R,   M: d x k (k = r or 2r, d >> k),  Q: orthonormal columns,  R: k x k upper triangular, diag(R) > 0

Decision (specs/odlora.md G3, the erratum "the QR must be sign-fixed"): every Q here is the canonical one,
diag(R) > 0. Householder QR (LAPACK, ``torch.linalg.qr``) leaves the signs free, and OD-LoRA's ΔW = s(Q_B A + B Q_Aᵀ)
depends on the basis itself, so an unfixed sign would flip rank-1 pieces of ΔW at every refresh.

Cholesky-QR2 (§6.3a) of a row-sharded M = [M_1; …; M_P] (rank p holds M_p), for many matrices at once:
    pass 1:  S1 = Σ_p M_pᵀ M_p   (fp64; ONE reduction for every matrix of the call),  R1 = chol(S1)ᵀ,  Q1_p = M_p R1⁻¹
    pass 2:  S2 = Σ_p Q1_pᵀ Q1_p (ONE reduction),  R2 = chol(S2)ᵀ,  Q_p = Q1_p R2⁻¹,  R = R2 R1
A Cholesky factor has a positive diagonal, so this *is* the canonical QR; the second pass restores the
orthogonality the first loses to κ(M)²·u. Grams and solves run in fp64 (r x r: cheap), so κ up to ~1e7 is fine.

Low-rank SVD (§6.4) of ΔW = s L Rᵀ from its thin factors L (m x k), R (n x k), never forming the m x n matrix:
L = Q_L R_L, R = Q_R R_R (Cholesky-QR2), then the SVD of the k x k core C = s R_L R_Rᵀ = U_c Σ V_cᵀ, and
U = Q_L U_c[:, :r], V = Q_R V_c[:, :r]. Decision (specs/odlora.md G17): a rank-deficient factor (Cholesky fails;
e.g. [Q_B | B] right after a refresh, when B lies in span(Q_B)) takes the eigenbasis of its already-reduced Gram
instead, S = E Λ Eᵀ, Q = M E Λ^{-1/2} on the numerically nonzero eigenvalues (zero columns elsewhere),
R = Λ^{1/2} Eᵀ, so Q R = M still holds, the top singular triplets are exact, and no further communication is
needed. Only when ΔW itself has rank < r can U or V get zero columns (reported).

Reductions: a ``Reduce`` callable sums, in place, the partial Grams it is given over their shards. Controllers build
it from ``parallel.grams.sum_partial_grams``: one coalesced all-reduce per process group for every layer of the
call. These kernels issue no collective themselves.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

Reduce = Callable[[list[Tensor]], None]
"""Sums a list of partial fp64 Grams in place over their shards (the identity when nothing is sharded)."""


def no_reduce(grams: list[Tensor]) -> None:
    """The ``Reduce`` of unsplit matrices."""


def sign_fixed_qr(m: Tensor) -> tuple[Tensor, Tensor]:
    """Reduced Householder QR of ``m`` (..., d, k) with the signs fixed so that diag(R) > 0 (a zero diagonal
    entry keeps sign +1). Local (unsplit) reference; cost ≈ 4dk² FLOPs."""
    q, r = torch.linalg.qr(m)
    d = torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))
    d = torch.where(d == 0, torch.ones_like(d), d)
    return q * d.unsqueeze(-2), r * d.unsqueeze(-1)


def gram64(m: Tensor) -> Tensor:
    """mᵀm in fp64 (..., k, k), the local partial Gram of a row shard (batched over leading dimensions)."""
    m = m.double()
    return m.mT @ m


def _cholesky_upper(grams: Tensor, rank_tol: float) -> tuple[Tensor, Tensor]:
    """(R, ok) for a batch of Grams (b, k, k): R upper triangular with RᵀR = S and diag(R) > 0, and ok = False
    where S is not finite or not numerically positive definite (Cholesky fails, or min diag(R) <= rank_tol ·
    max diag(R)); R is the identity there."""
    finite = torch.isfinite(grams).flatten(1).all(1)
    eye = torch.eye(grams.shape[-1], dtype=grams.dtype, device=grams.device)
    low, info = torch.linalg.cholesky_ex(torch.where(finite[:, None, None], grams, eye))
    diag = torch.diagonal(low, dim1=-2, dim2=-1)
    ok = finite & (info == 0) & (diag.amin(-1) > rank_tol * diag.amax(-1))
    return torch.where(ok[:, None, None], low.mT, eye), ok


def _groups(mats: Sequence[Tensor]) -> dict[tuple, list[int]]:
    """Indices of the matrices of each (shape, device): the batches of one call."""
    groups: dict[tuple, list[int]] = {}
    for i, m in enumerate(mats):
        groups.setdefault((tuple(m.shape), m.device), []).append(i)
    return groups


def _cholesky_pass(stacks: dict[tuple, Tensor], groups: dict[tuple, list[int]], count: int, reduce: Reduce,
                   rank_tol: float) -> tuple[list[Tensor], dict[tuple, tuple[Tensor, Tensor, Tensor]]]:
    """One Cholesky-QR pass over the fp64 batches ``stacks`` (b, d, k): (each matrix's reduced Gram, in the
    order of the call, and per batch (M R⁻¹, R, ok)). ``reduce`` gets one Gram per matrix (views into the batched
    Grams, summed in place). No host sync."""
    batched = {key: gram64(stack) for key, stack in stacks.items()}
    grams: list[Tensor] = [torch.empty(0)] * count
    for key, idx in groups.items():
        for i, g in zip(idx, batched[key].unbind()):
            grams[i] = g
    reduce(grams)
    out = {}
    for key, stack in stacks.items():
        r, ok = _cholesky_upper(batched[key], rank_tol)
        out[key] = torch.linalg.solve_triangular(r, stack, upper=True, left=False), r, ok
    return grams, out


def _cholesky_qr2(mats: Sequence[Tensor], reduce: Reduce, rank_tol: float):
    """Both passes, batched per shape; a matrix that failed pass 1 enters pass 2 as zeros (it fails again), so
    every rank hands the reductions the same list. One host sync in all (which matrices failed)."""
    groups = _groups(mats)
    stacks = {key: torch.stack([mats[i] for i in idx]).double() for key, idx in groups.items()}
    grams1, first = _cholesky_pass(stacks, groups, len(mats), reduce, rank_tol)
    zeroed = {key: torch.where(ok1[:, None, None], q1, 0.0) for key, (q1, _, ok1) in first.items()}
    _, second = _cholesky_pass(zeroed, groups, len(mats), reduce, rank_tol)
    keys = list(groups)
    oks = torch.cat([first[key][2] & second[key][2] for key in keys]).tolist()
    out: list[tuple[Tensor, Tensor] | None] = [None] * len(mats)
    done = 0
    for key in keys:
        q, r = second[key][0], second[key][1] @ first[key][1]
        for i, qi, ri, good in zip(groups[key], q.unbind(), r.unbind(), oks[done:done + len(groups[key])]):
            out[i] = (qi, ri) if good else None
        done += len(groups[key])
    return out, grams1


def cholesky_qr2(mats: Sequence[Tensor], reduce: Reduce = no_reduce,
                 rank_tol: float = 1e-6) -> list[tuple[Tensor, Tensor] | None]:
    """Sign-fixed thin QR (Q, R) in fp64 of each row-sharded matrix (this rank's rows of Q, the replicated R),
    or None for a matrix that is rank-deficient or not finite. ``reduce`` is called twice in all (one call per
    pass, every matrix's Gram in one list). Cost per matrix: ≈ 4dk² FLOPs + two k x k Cholesky factorizations."""
    return _cholesky_qr2(mats, reduce, rank_tol)[0]


def eigen_basis(m: Tensor, gram: Tensor, rank_tol: float = 1e-6) -> tuple[Tensor, Tensor]:
    """(Q, R) with Q R = M for a possibly rank-deficient M, from its reduced Gram S = E Λ Eᵀ: Q = M E Λ^{-1/2} on
    eigenvalues above rank_tol² · λ_max (zero columns elsewhere), R = Λ^{1/2} Eᵀ. Not triangular; fp64."""
    lam, e = torch.linalg.eigh(gram)
    keep = lam > (rank_tol ** 2) * lam.amax().clamp_min(torch.finfo(lam.dtype).tiny)
    root = torch.where(keep, lam.clamp_min(0).sqrt(), torch.zeros_like(lam))
    inv = torch.where(keep, 1 / root.clamp_min(torch.finfo(lam.dtype).tiny), torch.zeros_like(lam))
    return m.double() @ (e * inv), root[:, None] * e.mT


def low_rank_svd(lefts: Sequence[Tensor], rights: Sequence[Tensor], scales: Sequence[float], rank: int,
                 reduce: Reduce = no_reduce, rank_tol: float = 1e-6):
    """Top-``rank`` SVD (U, σ, V) in fp64 of each ΔW_i = scale_i · L_i R_iᵀ (L_i: m x k, R_i: n x k, each possibly
    row-sharded; U and V come back in their factor's sharding), or None where a factor is not finite; and the
    indices where ΔW has rank < ``rank`` (σ_rank <= rank_tol · σ_1: U, V may have zero columns there). A
    rank-deficient factor takes ``eigen_basis``. ``reduce`` gets every L_i and R_i Gram at once, twice; all
    decisions read reduced Grams, so every rank of a split takes the same branch."""
    mats = [*lefts, *rights]
    qrs, grams = _cholesky_qr2(mats, reduce, rank_tol)
    finite = [bool(torch.isfinite(g).all()) for g in grams]
    qrs = [qr if qr is not None or not ok else eigen_basis(m, g, rank_tol)
           for m, g, qr, ok in zip(mats, grams, qrs, finite)]
    n, cores = len(lefts), {}
    for i, scale in enumerate(scales):
        if qrs[i] is not None and qrs[n + i] is not None:
            cores.setdefault(qrs[i][1].shape[-1], []).append((i, scale * qrs[i][1] @ qrs[n + i][1].mT))
    out: list[tuple[Tensor, Tensor, Tensor] | None] = [None] * n
    deficient = []
    for group in cores.values():  # one batched SVD of the k x k cores per core size
        uc, sigma, vch = torch.linalg.svd(torch.stack([core for _, core in group]))
        for j, (i, _) in enumerate(group):
            out[i] = (qrs[i][0] @ uc[j, :, :rank], sigma[j, :rank], qrs[n + i][0] @ vch[j, :rank].mT)
            if not sigma[j, rank - 1] > rank_tol * sigma[j, 0]:
                deficient.append(i)
    return out, sorted(deficient)
