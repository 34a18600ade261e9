"""A latent similarity transform by a fixed-pattern sparse matrix with trainable values, and its gradient by
sampled products — the per-token kernel of FRoD (methods/frod.py).

Row-major activations a (T × d), frozen F and F⁻¹ (d × d), a fixed pattern P = {(p_k, q_k)} of N (d × d; FRoD's
holds the diagonal and an off-diagonal sparse set, ``with_diagonal``) and its trainable values v:

    z = a F,   u = z Nᵀ  (u_p = Σ_{k: p_k = p} v_k z_{q_k}),   out = u F⁻¹

Backward, with g = ∂L/∂out:

    du = g F⁻ᵀ,   ∂v_k = Σ_t du_{t,p_k} z_{t,q_k}   (SDDMM: (duᵀ z) sampled on P),   dz = du N,   ∂a = dz Fᵀ

The SDDMM never forms the dense d × d product duᵀz (``torch.sparse.sampled_addmm`` on the CSR pattern).
Cost per token: 4d² + 2|P| flops forward, 4d² + 4|P| backward; z (T × d) is the only saved activation.
Layout: every T-long product runs on transposed, contiguous d × T operands (CSR × dense is far slower on a
strided operand on CPU). Precision: computed in fp32 (fp64 for fp64 input; the CSR kernels have no bf16 path on
CPU), returned in a's dtype; autocast is off inside the kernel so forward and backward agree.
Decision (saved activation): z is saved in a's dtype, so bf16 activations save T × d in bf16, half of an fp32
z (70B, 80 layers × 7 sites, d = 8192, 4096 tokens: 75 GB → 38 GB per micro-batch), and the Σ/S gradients see z
rounded as a bf16 LoRA's A gradient sees x; fp32 and fp64 inputs keep z bit for bit. Recomputing z from a
instead would add 2d² flops per token to the backward.
"""

from __future__ import annotations

import hashlib
import warnings
from typing import NamedTuple

import torch
from torch import Tensor


class CsrPattern(NamedTuple):
    """A fixed pattern of a d × d matrix in CSR order (rows ascending, then columns) and its transpose."""

    rows: Tensor
    cols: Tensor
    crow: Tensor
    """CSR row pointers of (rows, cols), d + 1."""
    t_crow: Tensor
    """CSR row pointers of the transpose."""
    t_cols: Tensor
    """Column indices of the transpose in its CSR order."""
    t_perm: Tensor
    """values[t_perm] are the transpose's values in its CSR order."""


def csr_pattern(rows: Tensor, cols: Tensor, d: int) -> CsrPattern:
    """The CSR structure of (rows, cols), which must already be sorted by (row, col) without repeats."""
    key = rows * d + cols
    if key.numel() and not bool((key[1:] > key[:-1]).all()):
        raise ValueError("pattern: (rows, cols) must be sorted by row, then column, without repeats")
    t_perm = torch.argsort(cols * d + rows)
    return CsrPattern(rows, cols, _pointers(rows, d), _pointers(cols, d), rows[t_perm], t_perm)


def _pointers(index: Tensor, d: int) -> Tensor:
    return torch.cat([index.new_zeros(1), torch.cumsum(torch.bincount(index, minlength=d), 0)])


def off_diagonal_pattern(d: int, density: float, seed: int, salt: str) -> tuple[Tensor, Tensor]:
    """⌊density · d²⌋ (at most d² − d) distinct off-diagonal positions of a d × d matrix, drawn uniformly without
    replacement by a generator seeded from (seed, salt) alone, returned sorted by (row, col)."""
    k = min(int(density * d * d), d * d - d)
    digest = hashlib.sha256(f"{seed}:{salt}".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    j = torch.randperm(d * d - d, generator=gen)[:k].sort().values
    rows, rest = j // (d - 1), j % (d - 1)
    return rows, rest + (rest >= rows).long()  # skip the diagonal: row-major order is kept


def with_diagonal(rows: Tensor, cols: Tensor, d: int) -> tuple[Tensor, Tensor, Tensor]:
    """(rows', cols', order): the pattern plus the d diagonal entries, sorted by (row, col), and the index with
    ``cat([diagonal values, pattern values])[order]`` = the values in that sorted order."""
    diag = torch.arange(d, dtype=rows.dtype, device=rows.device)
    all_rows, all_cols = torch.cat([diag, rows]), torch.cat([diag, cols])
    order = torch.argsort(all_rows * d + all_cols)
    return all_rows[order], all_cols[order], order


def _csr(crow: Tensor, cols: Tensor, values: Tensor, d: int) -> Tensor:
    with warnings.catch_warnings():  # "sparse CSR support is in beta": the calls used here are stable
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, cols, values, (d, d))


class _LatentUpdate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a: Tensor, first: Tensor, first_inv: Tensor, values: Tensor, pattern: CsrPattern) -> Tensor:
        dtype, d = (torch.float64 if a.dtype == torch.float64 else torch.float32), first.shape[0]
        with torch.autocast(a.device.type, enabled=False):
            first, first_inv, values = (t.to(dtype) for t in (first, first_inv, values))
            z_t = first.T @ a.to(dtype).T  # (d, T), contiguous
            u_t = _csr(pattern.crow, pattern.cols, values, d) @ z_t
            out = (u_t.T @ first_inv).to(a.dtype)
        ctx.save_for_backward(z_t.to(a.dtype), first, first_inv, values)  # a's dtype: module docstring
        ctx.pattern, ctx.values_dtype, ctx.a_dtype = pattern, values.dtype, a.dtype
        return out

    @staticmethod
    def backward(ctx, g: Tensor):
        z_t, first, first_inv, values = ctx.saved_tensors
        p, d, z_t = ctx.pattern, first.shape[0], z_t.to(first.dtype)
        with torch.autocast(g.device.type, enabled=False):
            du_t = first_inv @ g.to(first.dtype).T  # (d, T) = (g F⁻ᵀ)ᵀ
            template = _csr(p.crow, p.cols, torch.zeros_like(values), d)
            d_values = torch.sparse.sampled_addmm(template, du_t, z_t.T, beta=0.0).values()
            d_a = None
            if ctx.needs_input_grad[0]:
                dz_t = _csr(p.t_crow, p.t_cols, values[p.t_perm], d) @ du_t  # (du N)ᵀ = Nᵀ duᵀ
                d_a = (dz_t.T @ first.T).to(ctx.a_dtype)
        return d_a, None, None, d_values.to(ctx.values_dtype), None


def latent_update(a: Tensor, first: Tensor, first_inv: Tensor, values: Tensor, pattern: CsrPattern) -> Tensor:
    """((a F) Nᵀ) F⁻¹ for a (T × d), N the CSR matrix of ``values`` on ``pattern``; differentiable in a and
    values (F, F⁻¹ and the pattern are frozen)."""
    return _LatentUpdate.apply(a, first, first_inv, values, pattern)


def _factors(w: Tensor, first: Tensor, first_inv: Tensor, side: str) -> tuple[Tensor, Tensor]:
    """(Lᵀ, R) of ΔW = L N R (``merged_linear``): input side L = W F⁻ᵀ, R = Fᵀ; output side L = F⁻ᵀ, R = Fᵀ W
    (W already in F's dtype: the caller casts it once for both helpers)."""
    return (first_inv @ w.T, first.T) if side == "input" else (first_inv, first.T @ w)


def _merged_weight(w: Tensor, lt: Tensor, r: Tensor, values: Tensor, pattern: CsrPattern) -> Tensor:
    """W′ = W + (L N) R, with (L N)ᵀ = Nᵀ Lᵀ by the CSR of Nᵀ (d × m) and one dense product."""
    ln_t = _csr(pattern.t_crow, pattern.t_cols, values[pattern.t_perm], lt.shape[0]) @ lt
    return torch.addmm(w, ln_t.T, r)


def _gemm_dtype(x: Tensor) -> torch.dtype:
    """The dtype of the merged path's three token-count GEMMs: autocast's where it is on (a bf16-autocast step of an
    fp32 model multiplies in bf16, as the frozen layer beside it does), else x's."""
    on = torch.is_autocast_enabled(x.device.type) and x.dtype != torch.float64
    return torch.get_autocast_dtype(x.device.type) if on else x.dtype


class _MergedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, values: Tensor, weight: Tensor, bias: Tensor | None, first: Tensor,
                first_inv: Tensor, pattern: CsrPattern, side: str) -> Tensor:
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        gemm = _gemm_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            first, first_inv, vals = (t.to(dtype) for t in (first, first_inv, values))
            w = weight.to(dtype)
            merged = _merged_weight(w, *_factors(w, first, first_inv, side), vals, pattern)
            xg = x.to(gemm)  # saved as cast, as autocast's linear saves its input: one cast, the plan's act_bytes
            y = torch.nn.functional.linear(xg, merged.to(gemm), None if bias is None else bias.to(gemm))
        ctx.save_for_backward(xg, vals, weight, first, first_inv)  # not W′: it is rebuilt (module docstring)
        ctx.pattern, ctx.side, ctx.values_dtype, ctx.x_dtype = pattern, side, values.dtype, x.dtype
        return y

    @staticmethod
    def backward(ctx, g: Tensor):
        xg, vals, weight, first, first_inv = ctx.saved_tensors
        p = ctx.pattern
        with torch.autocast(g.device.type, enabled=False):
            w = weight.to(first.dtype)
            lt, r = _factors(w, first, first_inv, ctx.side)
            d_x, gemm = None, xg.dtype
            if ctx.needs_input_grad[0]:
                d_x = (g.to(gemm) @ _merged_weight(w, lt, r, vals, p).to(gemm)).to(ctx.x_dtype)
            g2, x2 = g.reshape(-1, g.shape[-1]).to(gemm), xg.reshape(-1, xg.shape[-1])
            right = (g2.T @ x2).to(lt.dtype) @ r.T  # ∂W′ Rᵀ, ∂W′ = Gᵀ X the one weight-gradient GEMM
            template = _csr(p.crow, p.cols, torch.zeros_like(vals), lt.shape[0])
            d_values = torch.sparse.sampled_addmm(template, lt, right, beta=0.0).values()
        return d_x, d_values.to(ctx.values_dtype), None, None, None, None, None, None


def merged_linear(x: Tensor, values: Tensor, weight: Tensor, bias: Tensor | None, first: Tensor, first_inv: Tensor,
                  pattern: CsrPattern, side: str) -> Tensor:
    """y = x W′ᵀ + b, the latent update merged into the (local) weight, differentiable in x and the values of N:

        side "input":  W′ = W (I + Kᵀ) = W + (W F⁻ᵀ) N Fᵀ     (K = F Nᵀ F⁻¹: the transform a ↦ a K acts on x)
        side "output": W′ = (I + Kᵀ) W = W + F⁻ᵀ N (Fᵀ W)     (it acts on the bias-free output)

    i.e. ΔW = L N R, built as (Nᵀ Lᵀ)ᵀ R with W's local block: 4mnd + 2m|P| FLOPs (m × n the local W, d the
    latent dimension), never the d × d matrix K (2d³, the same on every tensor-parallel rank, where ΔW = L N R
    splits with W). Backward: ∂x = G W′, ∂W′ = Gᵀ X, ∂N = Lᵀ ∂W′ Rᵀ sampled on the pattern (SDDMM):
    2mnT + 6mnd + 4m|P| with the rebuild. W′ is built in fp32 (fp64 for fp64 x); the forward's, ∂x's and ∂W′'s GEMMs
    run in autocast's dtype where it is on (output in it, as autocast's linear gives), else x's. W′ is not
    saved for backward (an m × n tensor per site alive through the forward would hold a second copy of every
    adapted weight) but rebuilt there."""
    return _MergedLinear.apply(x, values, weight, bias, first, first_inv, pattern, side)
