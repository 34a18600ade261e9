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


class _LatentMatrix(torch.autograd.Function):
    @staticmethod
    def forward(ctx, first: Tensor, first_inv: Tensor, values: Tensor, pattern: CsrPattern) -> Tensor:
        d = first.shape[0]
        with torch.autocast(first.device.type, enabled=False):
            n_t = _csr(pattern.t_crow, pattern.t_cols, values[pattern.t_perm], d)  # Nᵀ in CSR
            k = first @ (n_t @ first_inv)
        ctx.save_for_backward(first, first_inv)
        ctx.pattern = pattern
        return k

    @staticmethod
    def backward(ctx, g: Tensor):
        first, first_inv = ctx.saved_tensors
        p, d = ctx.pattern, first.shape[0]
        with torch.autocast(g.device.type, enabled=False):
            left = first_inv @ g.to(first.dtype).T  # F⁻¹ ∂Kᵀ
            template = _csr(p.crow, p.cols, first.new_zeros(p.cols.numel()), d)
            d_values = torch.sparse.sampled_addmm(template, left, first, beta=0.0).values()
        return None, None, d_values, None


def latent_matrix(first: Tensor, first_inv: Tensor, values: Tensor, pattern: CsrPattern) -> Tensor:
    """K = F Nᵀ F⁻¹ (d × d, in F's dtype), the matrix of the latent update (a ↦ a K), differentiable in values:
    ∂v_k = (F⁻¹ ∂Kᵀ F) sampled at (p_k, q_k). Cost: 2d³ + 2|P|d forward, 2d³ + 2|P|d backward."""
    return _LatentMatrix.apply(first, first_inv, values.to(first.dtype), pattern)


def _merged(weight: Tensor, k: Tensor, side: str) -> Tensor:
    w = weight.to(k.dtype)
    return torch.addmm(w, w, k.T) if side == "input" else torch.addmm(w, k.T, w)


class _MergedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, k: Tensor, weight: Tensor, bias: Tensor | None, side: str) -> Tensor:
        with torch.autocast(x.device.type, enabled=False):
            merged = _merged(weight, k, side).to(x.dtype)
            y = torch.nn.functional.linear(x, merged, None if bias is None else bias.to(x.dtype))
        ctx.save_for_backward(x, k, weight)  # not W′: it is rebuilt (module docstring)
        ctx.side = side
        return y

    @staticmethod
    def backward(ctx, g: Tensor):
        x, k, weight = ctx.saved_tensors
        with torch.autocast(g.device.type, enabled=False):
            merged = _merged(weight, k, ctx.side)
            g2, x2 = g.reshape(-1, g.shape[-1]), x.reshape(-1, x.shape[-1])
            d_x = (g @ merged.to(g.dtype)) if ctx.needs_input_grad[0] else None
            d_merged = g2.T.to(k.dtype) @ x2.to(k.dtype)  # ∂W′ = Gᵀ X, the one weight-gradient GEMM
            w = weight.to(k.dtype)
            d_k = d_merged.T @ w if ctx.side == "input" else w @ d_merged.T
        return d_x, d_k, None, None, None


def merged_linear(x: Tensor, k: Tensor, weight: Tensor, bias: Tensor | None, side: str) -> Tensor:
    """y = x W′ᵀ + b with W′ = W (I + Kᵀ) (side "input": the transform a ↦ a K acts on x) or W′ = (I + Kᵀ) W
    ("output": it acts on the bias-free output), differentiable in x and K (W and b are frozen).

    W′ is built in K's dtype (fp32, or fp64 for fp64 K) and used in x's dtype; it is not saved for backward (an
    m × n tensor per site alive through the forward would hold a second copy of every adapted weight) but rebuilt
    there. Backward: ∂x = G W′, ∂W′ = Gᵀ X (fp32), ∂K = ∂W′ᵀ W (input) or W ∂W′ᵀ (output). Cost beyond the base
    linear: 2mnT (∂W′) + 2mnd per build (two) + 2mnd (∂K), d the latent dimension."""
    return _MergedLinear.apply(x, k, weight, bias, side)
