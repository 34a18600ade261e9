"""FRoD — Full-Rank Efficient Fine-Tuning with Rotational Degrees (Wan, Chen, Feng, Zhou, Xu; AAAI 2026,
DOI 10.1609/aaai.v40i31.39813). Spec: specs/frod.md. One frozen linear W_i (m × n, y = W_i x + b).

    W_i = U_i Σ_i Vᵀ                 (Eq. 7; HJD of the L layers of one module type, parallel/hjd_cache.py)
    W'_i = U_i (Σ_i + S_i) Vᵀ        (Eq. 8; Σ_i diagonal, init σ_i⁰; S_i strictly off-diagonal, sparse, init 0)

Symbols: d the latent dimension (n on the input side, m on the output side), σ⁰ the HJD strengths (frozen copy of
the initial Σ_i), M_i = Σ_i − Σ⁰ + S_i, N̂_i = Σ⁰⁻¹ M_i (N̂_pq = M_pq / σ⁰_p), s the density of S_i.

Computed form (spec §3.4 form M — keeps W_i, stores no U_i): U_i = W_i V⁻ᵀ Σ⁰⁻¹ (Eq. 6 with B_i = W_i V⁻ᵀ), so

    W'_i = U_i(Σ_i + S_i)Vᵀ = U_i Σ⁰ Vᵀ + U_i M_i Vᵀ = W_i + W_i V⁻ᵀ N̂_i Vᵀ = W_i (I + V⁻ᵀ N̂_i Vᵀ)
    y' = W_i x̃ + b,   x̃ᵀ = xᵀ + ((xᵀ V) N̂_iᵀ) V⁻¹                      (input side, the paper's orientation)

and the latent transform a ↦ a + ((a F) Nᵀ) F⁻¹ (ops/sparse_latent.py, F = V, N = N̂_i) runs on the input before
the base layer: one base matmul, 8d² + O(nnz) extra flops per token, Σ/S gradients by sampled products.
Output side (the HJD of Wᵢᵀ: Wᵢᵀ = U'_i Σ⁰ V'ᵀ, Wᵢ'ᵀ = U'_i(Σ_i + S_i)V'ᵀ): W'_i = (I + V' N̂_iᵀ V'⁻¹) W_i, i.e.
ỹᵀ = yᵀ + ((yᵀ V'⁻ᵀ) N̂_i) V'ᵀ on the bias-free base output (F = V'⁻ᵀ, N = N̂_iᵀ).
At initialisation M_i = 0 exactly, so x̃ = x (ỹ = y) bit for bit: the model's output equals the base model's.

Decision (specs/frod.md §3.4 and §9 bug 1): form M instead of the reference code's "W0 x + UΣVᵀx" (≈ 2·W0·x at
init) and instead of form P (replace W0 by a stored U_i, a second m × n copy).
Decision (issue 16, ``path``): two exact computations of form M, chosen per site and per forward from its token
count T (``path: auto``, by the FLOP count the accounting reads too: ``path_flops``); either can be forced:
  transform  the latent transform per token (above): 8d²T + O(|S|T) extra FLOPs, nothing per step;
  merged     W′ = W(I + Kᵀ) = W + (W F⁻ᵀ) N̂ Fᵀ (input side) or (I + Kᵀ)W = W + F⁻ᵀ N̂ᵀ (Fᵀ W) (output side),
             K = F N̂ᵀ F⁻¹, built once per forward from the site's local W block, y = W′x + b in place of the base
             matmul; backward ∂x = G W′, one weight-gradient GEMM ∂W′ = GᵀX, projected to Σ/S by a sampled
             product (ops/sparse_latent.py): 2mnT + 10mnd extra (m × n local), so it wins once T is a few d
             (m = n = d: T > 5d/3), and at once where the local block is small: k/v (m < d), any TP split.
  Decision (merged, issue 16): ΔW = (W F⁻ᵀ) N̂ Fᵀ, not W Kᵀ through the d × d K (2d³ per build and per
             projection): the factored form costs 4mnd per build, the same as through K when m = n = d, less
             for k/v (SmolLM2: m = 192 against d = 576) and under TP (m or n split, d whole: K's 2d³ would be
             repeated on every rank, ΔW = L N̂ R is split with W); it gives up only wide local blocks
             (mn > d², gate/up on one rank), where the transform is chosen anyway.
  W′ is rebuilt in backward, not saved: no second m × n copy of a weight lives through the forward.
  The merged path runs the site's linear itself (F.linear of the site's weight and bias, the base's own math), so
  it needs the whole local weight: under ZeRO-3, whose partitioned weight only the base layer's own forward
  gathers, ``auto`` takes the transform path and a forced ``merged`` is refused. With gradient accumulation the
  merged path builds W′ and projects ∂W′ per micro-batch (the projection must end inside backward, where the
  engines' gradient reductions see it); ``auto`` decides on the micro-batch's tokens.
Decision (spec §10 item 4): the forward, delta_weight and files use one convention, u = N̂ z (S_pq couples latent
input q into output p), the paper's Eq. 8 and HF PEFT's forward.
Decision (spec §10 item 5, §8.5): one pattern per module type, shared by its layers (the code's choice), drawn from
a generator seeded by (projection_prng_key, module type, side) alone, never the global RNG: every rank and stage
draws the same pattern. s counts against d² (the code's convention); k = min(⌊s d²⌋, d² − d).
Decision (spec §10 item 6): Σ_i itself is the trainable tensor (as in the reference code), so AdamW's decoupled
weight decay, when the run sets one, pulls Σ_i towards 0 (shrinking W'); train.weight_decay defaults to 0.
Decision (spec §4.2): lr(Σ) = 10·lr(S) in every main run of the paper: ``s_lr`` sets lr(S) against the run's lr.
Decision (spec §8.4): sharding follows the latent side. Input side + column-parallel: V, Σ, S replicated, W
sharded by rows, x whole — no extra per-token collective; Σ/S gradients are partial sums over the group (one
per-step reduction, ParamLayout.partial_grad). Row-parallel sites use the output side (option B, transposed HJD):
the transform is linear, so applying it to each rank's partial output and letting the base layer's all-reduce sum
them is exact — again no extra collective; Σ/S gradients partial. Input side on a row split (needs all of x) and
output side on a column split (needs all of y) are refused. ``output_side_modules`` defaults to Megatron's
row-parallel module types (o_proj, down_proj) so that one config gives the same model under any TP layout; it
also makes down_proj's latent dimension the hidden size (576) instead of the intermediate size (1536).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dist_peft.methods.base import Adapter, ParamLayout, Site, SiteShape, register_method
from dist_peft.ops.sparse_latent import (CsrPattern, csr_pattern, latent_update, merged_linear,
                                         off_diagonal_pattern, with_diagonal)
from dist_peft.parallel.hjd_cache import hjd_bases
from dist_peft.parallel.shard import ShardKind, ShardSpec


PATHS = ("auto", "transform", "merged")


def path_flops(m: int, n: int, d: int, k: int, tokens: int) -> dict[str, tuple[int, int]]:
    """(forward, backward) FLOPs beyond the base linear of each path for ``tokens`` tokens through a site whose
    local weight is m × n, latent dimension d, |S| = k (module docstring; ops/sparse_latent.py). transform: 4d² +
    2(d + k) per token forward, 4d² + 4(d + k) backward. merged: ΔW = L N R built (4mnd + 2m(d + k)) forward;
    rebuilt, ∂W′ = GᵀX (2mnT), ∂W′ Rᵀ (2mnd) and the sampled product (2m(d + k)) backward."""
    nnz = d + k
    build = 4 * m * n * d + 2 * m * nnz
    return {"transform": ((4 * d * d + 2 * nnz) * tokens, (4 * d * d + 4 * nnz) * tokens),
            "merged": (build, build + 2 * m * n * tokens + 2 * m * n * d + 2 * m * nnz)}


def choose_path(path: str, m: int, n: int, d: int, k: int, tokens: int) -> str:
    """``path`` itself, or for auto the path of fewer FLOPs (``path_flops``; transform on a tie)."""
    if path != "auto":
        return path
    costs = {name: sum(fb) for name, fb in path_flops(m, n, d, k, tokens).items()}
    return "merged" if costs["merged"] < costs["transform"] else "transform"


@dataclass(frozen=True, kw_only=True)
class FrodConfig:
    sparse_rate: float = 0.01
    """s: density of S_i over the d² entries (HF PEFT's default; the paper's main runs use 0.02)."""
    regularization_alpha: float = 1e-3
    """π of Eq. 3, the ridge of the HJD (the reference code's value)."""
    projection_prng_key: int = 0
    """Seed of the sparse patterns (with the module type and side)."""
    output_side_modules: tuple[str, ...] = ("o_proj", "down_proj")
    """Module types adapted on the output side (HJD of Wᵀ, spec §8.4 option B); the rest use the paper's side."""
    s_lr: float | None = None
    """lr(S); None: the run's lr. The paper's rule lr(Σ) = 10·lr(S): set train.lr to lr(Σ), s_lr to a tenth."""
    path: str = "auto"
    """How the update is computed: auto (per site and forward, the path of fewer FLOPs), transform or merged."""
    hjd_cache: str | None = None
    """Folder of the HJD bases (one entry per module type). None: entries under cache_root()/frod named by their
    key. A named folder is strict: an entry built for other settings or weights is refused."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "output_side_modules", tuple(self.output_side_modules))  # JSON gives a list
        if not 0.0 <= self.sparse_rate <= 1.0:
            raise ValueError(f"sparse_rate: must be in [0, 1], got {self.sparse_rate}")
        if not self.regularization_alpha > 0.0:
            raise ValueError(f"regularization_alpha: must be > 0 (π of the HJD ridge), got {self.regularization_alpha}")
        if self.path not in PATHS:
            raise ValueError(f"path: must be one of {', '.join(PATHS)}, got {self.path!r}")
        if self.s_lr is not None and not self.s_lr > 0.0:
            raise ValueError(f"s_lr: must be > 0 or null, got {self.s_lr}")


class FrodBasis(nn.Module):
    """Frozen state shared by every site of one module type: F, F⁻¹ (fp32), the off-diagonal pattern of S (in
    ``frod_s`` order) and the CSR pattern of N = diagonal + S. One object registered under each of its adapters
    (so ``.to()`` moves it once); non-persistent buffers."""

    def __init__(self, module_type: str, side: str, first: Tensor, first_inv: Tensor, rows: Tensor, cols: Tensor):
        super().__init__()
        self.module_type, self.side, self.d = module_type, side, first.shape[0]
        self.register_buffer("first", first.to(torch.float32), persistent=False)
        self.register_buffer("first_inv", first_inv.to(torch.float32), persistent=False)
        self.register_buffer("p_rows", rows, persistent=False)
        self.register_buffer("p_cols", cols, persistent=False)
        all_rows, all_cols, order = with_diagonal(rows, cols, self.d)
        self.register_buffer("order", order, persistent=False)
        for name, t in csr_pattern(all_rows, all_cols, self.d)._asdict().items():
            self.register_buffer(f"n_{name}", t, persistent=False)

    @property
    def pattern(self) -> CsrPattern:
        """The CSR pattern of N (diagonal and off-diagonal entries)."""
        return CsrPattern(*(getattr(self, f"n_{name}") for name in CsrPattern._fields))

    @property
    def scale_index(self) -> Tensor:
        """Index p of σ⁰_p that divides each S value: the kernel row (input side) or column (output side, N = N̂ᵀ)."""
        return self.p_rows if self.side == "input" else self.p_cols


def _check_layout(site: Site, spec: ShardSpec, basis: FrodBasis) -> None:
    if basis.side == "input" and spec.kind is ShardKind.ROW:
        raise ValueError(f"{site.name}: FRoD's input side needs the whole input x, which a row-parallel split does "
                         f"not give; list {site.module_type} in output_side_modules (specs/frod.md §8.4 option B)")
    if basis.side == "output" and spec.kind is ShardKind.COLUMN:
        raise ValueError(f"{site.name}: FRoD's output side needs the whole output y, which a column-parallel split "
                         f"does not give; remove {site.module_type} from output_side_modules")
    d = site.in_features if basis.side == "input" else site.out_features
    if basis.d != d:
        raise ValueError(f"{site.name}: the {basis.module_type} basis has d={basis.d}, the site needs {d}")


@register_method("frod", FrodConfig)
class FrodAdapter(Adapter):
    """Trainable: ``frod_sigma`` = Σ_i (d) and ``frod_s`` = the values of S_i in the basis' CSR order; entry k is
    S_{rows_k, cols_k} on the input side and S_{cols_k, rows_k} on the output side (the kernel applies N̂ᵀ there)."""

    trainable_names = ("frod_sigma", "frod_s")
    size_knob = "sparse_rate"

    def __init__(self, site: Site, spec: ShardSpec, cfg: FrodConfig, basis: FrodBasis | None = None,
                 sigma0: Tensor | None = None):
        super().__init__(site, spec, cfg)
        if basis is None or sigma0 is None:
            raise ValueError(f"{site.name}: FRoD needs its module type's HJD basis and this layer's strengths from "
                             "FrodAdapter.prepare (inject_adapters calls it before building adapters)")
        _check_layout(site, spec, basis)
        if sigma0.shape != (basis.d,) or not bool((sigma0 > 0).all()):
            raise ValueError(f"{site.name}: HJD strengths must be {basis.d} positive values (Σ⁻¹ of form M)")
        kw = {"device": site.weight.device, "dtype": torch.float32}
        self.basis = basis.to(site.weight.device)
        self.register_buffer("sigma0", sigma0.to(**kw), persistent=False)
        self.frod_sigma = nn.Parameter(self.sigma0.clone())
        self.frod_s = nn.Parameter(torch.zeros(basis.p_rows.numel(), **kw))

    def _values(self) -> Tensor:
        """The values of N̂ (input side) or N̂ᵀ (output side) in the CSR order of the basis' pattern."""
        b = self.basis
        diag = (self.frod_sigma - self.sigma0) / self.sigma0
        return torch.cat([diag, self.frod_s / self.sigma0[b.scale_index]])[b.order]

    def _update(self, a: Tensor) -> Tensor:
        """((a F) N̂ᵀ) F⁻¹ (input side) or ((a F) N̂) F⁻¹ (output side), over the last dimension of a."""
        b = self.basis
        flat = a.reshape(-1, a.shape[-1])
        return latent_update(flat, b.first, b.first_inv, self._values(), b.pattern).reshape(a.shape)

    def path(self, tokens: int) -> str:
        """The path of a forward over ``tokens`` tokens (module docstring; shapes only, no host sync)."""
        partitioned = hasattr(self.site.weight, "ds_id")  # ZeRO-3: the base layer gathers it, not this adapter
        if partitioned and self.cfg.path == "merged":
            raise ValueError(f"{self.site.name}: FRoD's merged path needs the whole local weight, which ZeRO-3 "
                             "partitions; use path: auto or transform")
        if partitioned:
            return "transform"
        m, n = self.site.weight.shape
        return choose_path(self.cfg.path, m, n, self.basis.d, self.frod_s.numel(), tokens)

    def _merged(self, x: Tensor) -> Tensor:
        """y = W′x + b, W′ = W(I + Kᵀ) (input side) or (I + Kᵀ)W (output side), K = F N̂ᵀ F⁻¹ (or F N̂ F⁻¹)."""
        b = self.basis
        return merged_linear(x, self._values(), self.site.weight, self.site.bias, b.first, b.first_inv, b.pattern,
                             b.side)

    def forward(self, x: Tensor, base_out: Tensor) -> Tensor:
        """The contract's additive form (the transform path): base_out + W(x̃ − x) (input side), or the output
        transform."""
        if self.basis.side == "input":
            return base_out + F.linear(self._update(x), self.site.weight.to(x.dtype))
        a = base_out if self.site.bias is None else base_out - self.site.bias
        return base_out + self._update(a)

    def forward_site(self, x: Tensor, base: Callable[[Tensor], Tensor]) -> Tensor:
        """Merged path: W′x + b in place of the base. Transform path, input side: base(x̃), the base layer run once
        on the transformed input (form M); output side: forward."""
        if self.path(x.numel() // x.shape[-1]) == "merged":
            return self._merged(x)
        if self.basis.side == "input":
            return base(x + self._update(x))
        return self(x, base(x))

    def _transform(self) -> Tensor:
        """K_row = F Nᵀ F⁻¹ (d × d, fp64): the latent update maps a row a to a K_row."""
        b = self.basis
        n = torch.diag((self.frod_sigma - self.sigma0) / self.sigma0).double()
        n[b.p_rows, b.p_cols] = (self.frod_s / self.sigma0[b.scale_index]).double()
        return b.first.double() @ n.T @ b.first_inv.double()

    @torch.no_grad()
    def delta_weight(self) -> Tensor:
        """ΔW = W K_rowᵀ (input side: W' = W(I + K_rowᵀ)) or K_rowᵀ W (output side: W' = (I + K_rowᵀ)W)."""
        k_row, w = self._transform(), self.site.weight.double()
        return (w @ k_row.T if self.basis.side == "input" else k_row.T @ w).to(self.site.weight.dtype)

    @torch.no_grad()
    def unmerge_delta(self, merged_weight: Tensor) -> Tensor:
        """W' − W with W recovered from W' = W(I + K_rowᵀ) (or (I + K_rowᵀ)W) by one d × d solve."""
        k_row, w = self._transform(), merged_weight.double()
        eye = torch.eye(k_row.shape[0], dtype=k_row.dtype, device=k_row.device)
        if self.basis.side == "input":
            base = torch.linalg.solve(eye + k_row, w.T).T
        else:
            base = torch.linalg.solve(eye + k_row.T, w)
        return (w - base).to(merged_weight.dtype)

    def param_layouts(self) -> dict[str, ParamLayout]:
        partial = self.spec.kind is not ShardKind.REPLICATED
        return {name: ParamLayout(None, partial) for name in self.trainable_names}

    def optimizer_overrides(self) -> dict[str, dict[str, float]]:
        return {"frod_s": {"lr": self.cfg.s_lr}} if self.cfg.s_lr is not None else {}

    @staticmethod
    def _latent(shape: SiteShape, cfg: FrodConfig) -> tuple[int, int]:
        """(d, k): the latent dimension (n input side, m output side; global, V is replicated) and |S|."""
        d = shape.out_features if shape.module_type in cfg.output_side_modules else shape.in_features
        return d, min(int(cfg.sparse_rate * d * d), d * d - d)

    @classmethod
    def trainable_numel(cls, shape: SiteShape, cfg: FrodConfig) -> int:
        """Σ_i (d) and the k values of S_i, replicated over a split."""
        d, k = cls._latent(shape, cfg)
        return d + k

    @classmethod
    def group_numels(cls, shape: SiteShape, cfg: FrodConfig) -> tuple[int, ...]:
        """Σ in the run's group, S in its own under ``s_lr``."""
        d, k = cls._latent(shape, cfg)
        return (d, k) if cfg.s_lr is not None else (d + k,)

    @classmethod
    def buffer_bytes(cls, shape: SiteShape, cfg: FrodConfig) -> tuple[int, int]:
        """Per site σ⁰ (d fp32); per module type the ``FrodBasis``: F and F⁻¹ (2 d² fp32) and its int64 index
        tensors (pattern 2k, order and the CSR pattern of N and its transpose 5(d + k) + 2(d + 1))."""
        d, k = cls._latent(shape, cfg)
        return 4 * d, 8 * d * d + 8 * (2 * k + 5 * (d + k) + 2 * (d + 1))

    @classmethod
    def extra_flops(cls, shape: SiteShape, tokens: int, cfg: FrodConfig) -> tuple[int, int]:
        """``path_flops`` of the path the adapter takes for ``tokens`` tokens (``choose_path``)."""
        d, k = cls._latent(shape, cfg)
        m, n = shape.m_local, shape.n_local
        return path_flops(m, n, d, k, tokens)[choose_path(cfg.path, m, n, d, k, tokens)]

    @classmethod
    def forward_saved_bytes(cls, shape: SiteShape, cfg: FrodConfig, act_bytes: int, tokens: int,
                            samples: int) -> int:
        """The values of N (d + k, fp32) on either path (``choose_path`` for ``tokens``); the transform path also
        z = a F (d per token, fp32: the latent kernel computes in fp32), the merged path nothing per token beyond the
        input. F and F⁻¹, which both kernels save, are the basis' buffers (``buffer_bytes``), not activations."""
        d, k = cls._latent(shape, cfg)
        merged = choose_path(cfg.path, shape.m_local, shape.n_local, d, k, tokens) == "merged"
        return 4 * (d + k + d * tokens * (not merged))

    @classmethod
    def saves_input(cls, shape: SiteShape, cfg: FrodConfig, tokens: int) -> bool:
        """Only the merged path (x W′ᵀ); the transform path saves z, and the frozen base saves no input."""
        d, k = cls._latent(shape, cfg)
        return choose_path(cfg.path, shape.m_local, shape.n_local, d, k, tokens) == "merged"

    @classmethod
    def width_costs(cls, shape: SiteShape, cfg: FrodConfig) -> tuple[str, ...]:
        d, _ = cls._latent(shape, cfg)
        return (f"{shape.module_type}: FRoD's basis F, F⁻¹ is {d}x{d} fp32 ({8 * d * d / 2**30:.2f} GiB per rank, "
                f"once per module type), 8·d² FLOPs per token (d = {d}) and an O(d³) joint decomposition "
                f"(`dist-peft precompute`)",)

    @classmethod
    def prepare(cls, sites: Sequence[Site], cfg: FrodConfig, specs: Mapping[str, ShardSpec | None] | None = None,
                layer_group: Any = None) -> dict[str, dict[str, Any]]:
        """Run or load the HJD of every module type (one cache entry each) and draw its pattern; returns
        ``{"basis": FrodBasis, "sigma0": σ⁰_i}`` per site name. Under TP/PP (``specs``, ``layer_group``: the
        contract's) the HJD is computed collectively from the local shards (parallel/hjd_cache.py): every rank gets
        the same bits of the basis (V, V⁻¹, pattern) and, for each layer it holds, the whole σ⁰_i (d values) —
        what the adapter of any shard takes, since V, Σ and S are replicated over the split (module docstring).
        All sites of one module type must have the same split."""
        by_type: dict[str, dict[str, Tensor]] = {}
        type_specs: dict[str, ShardSpec] = {}
        for site in sorted(sites, key=lambda s: (-1 if s.layer_index is None else s.layer_index, s.name)):
            spec = (specs or {}).get(site.name) or ShardSpec()
            shape = [site.out_features, site.in_features]
            if spec.weight_dim is not None:
                start, stop = spec.local_range(shape[spec.weight_dim])
                shape[spec.weight_dim] = stop - start
            local = getattr(site.weight, "ds_shape", site.weight.shape)  # ZeRO-3 partitions: their whole shape
            if list(local) != shape:
                raise ValueError(f"{site.name}: the local weight {tuple(local)} is not the "
                                 f"{spec.kind.value} shard {tuple(shape)} of the {site.out_features} x "
                                 f"{site.in_features} weight; pass its ShardSpec in specs")
            if type_specs.setdefault(site.module_type, spec) != spec:
                raise ValueError(f"{site.name}: the sites of {site.module_type} have different splits")
            by_type.setdefault(site.module_type, {})[site.name] = site.weight
        sides = {t: "output" if t in cfg.output_side_modules else "input" for t in by_type}
        out: dict[str, dict[str, Any]] = {}
        for module_type, bases in hjd_bases(by_type, sides, cfg.regularization_alpha, cfg.hjd_cache, type_specs,
                                            layer_group).items():
            first, first_inv = bases.latent_maps()
            rows, cols = off_diagonal_pattern(first.shape[0], cfg.sparse_rate, cfg.projection_prng_key,
                                              f"{module_type}:{bases.side}")
            basis = FrodBasis(module_type, bases.side, first, first_inv, rows, cols)
            out.update({name: {"basis": basis, "sigma0": sigma} for name, sigma in bases.sigma.items()})
        return out
