"""LoCA, Location-aware Cosine Adaptation: Du, Min, Li, Lu, Zou, Peng, Chu, Gong, ICLR 2025, arXiv:2502.06820
(spec: specs/loca.md). One frozen linear W (m x n), y = W x.

    W' = W + ΔW,   ΔW = α · Cᵀ S(a, l) D                                                            (Eq. 1)
    C[k, j] = √(2/m) κ_k cos(π (2j+1) k / (2m))  (m x m),  D the same with n (n x n)                (Eq. 2)
    S(a, l)[r, c] = Σ_{i : (l̂¹_i, l̂²_i) = (r, c)} a_i,   l̂¹_i = round(l¹_i (m-1)),  l̂²_i = round(l²_i (n-1))

Symbols (paper → code):
    m, n           site.out_features, site.in_features (global sizes; the ShardSpec picks the local block)
    B              LocaConfig.n_frequency: coefficients per adapted matrix
    a              loca_coef, shape (B,), zero at init (ΔW = 0 at step 0)
    l = (l¹, l²)   loca_loc, shape (2, B), in [0, 1]; row 0 picks frequencies along m (output), row 1 along n
    α              LocaConfig.scale
    B_a, B_l, B_s  LocaConfig.coef_steps, loc_steps, alternate_until (in optimizer steps)
    G, K           G = ∂L/∂ΔW (m x n);  K = ∂L/∂S = α C G Dᵀ                                       (Eqs. 16-18)

Computed form (no m x n matrix). For one token x with spectrum X̂ = D x (``ops.dct``):
    ΔW x = α Cᵀ (S X̂) = α · idct_m(Z),   Z[l̂¹_i] += a_i X̂[l̂²_i]   (gather at l̂², scale by a, scatter at l̂¹)
which is Eq. 1 applied to x. Backward: let g_t be the output gradient of token t, Ĝ_t = α C g_t its scaled
spectrum, so that G = Σ_t g_t x_tᵀ and
    K = α C (Σ_t g_t x_tᵀ) Dᵀ = Σ_t Ĝ_t X̂_tᵀ,   i.e.  K[r, c] = Σ_t Ĝ_t[r] X̂_t[c]     (B sampled products)
    ∂L/∂a_i  = K[l̂¹_i, l̂²_i]                                                                      (Eq. 18)
    ∂L/∂x_t  = Dᵀ Sᵀ Ĝ_t = idct_n(Sᵀ Ĝ_t)           (gather at l̂¹, scale by a, scatter at l̂²)
    ∂L/∂l¹_i ≈ (m-1) · a_i (K[l̂¹_i+1, l̂²_i] - K[l̂¹_i-1, l̂²_i]) / 2                                 (Eq. 5)
    ∂L/∂l²_i ≈ (n-1) · a_i (K[l̂¹_i, l̂²_i+1] - K[l̂¹_i, l̂²_i-1]) / 2
Eq. 5 equals <G, ΔW(l̂ + e_i) - ΔW(l̂ - e_i)> / 2: the central difference, over the integer grid, of the loss
linearised at ΔW; the factor (dim - 1) is the chain rule from index units to the stored [0, 1] parameter.
One set of sampled products of K serves both gradients.

Three paths compute the same outputs and gradients (each is tested against a dense autograd Eq. 1):
  spectral  the form above, DCTs by real FFT: O(T (m log m + n log n) + T B) per micro-batch of T tokens. The
            input spectrum is one autograd node shared by the sites that read the same tensor (q/k/v,
            gate/up), so its DCT and the inverse DCT of its summed gradient run once per input.
  gathered  the same products with the rows of C and D at the distinct frequencies, built analytically as
            small dense matrices: ΔW x = α C_Rᵀ S_RC (D_C x); costs about a LoRA whose rank is the number of
            distinct rows / columns, so it wins for small B.
  dense     ΔW built once per step (scatter + two 1-D inverse DCTs; cached until a or l change), y = x ΔWᵀ
            and K = α · dct2(Σ_t g_t x_tᵀ): three GEMMs of the base layer's size per micro-batch plus
            transforms of m x n, whatever B; wins when B nears m·n (the spectral path's tokens x B gathers
            then cost more than the GEMMs).
``path: auto`` picks per layer and per forward, from (T, m, n, B, distinct rows / columns, phase), the path of
least modelled cost (``path_costs``); any path can be forced.

Sharding (ShardSpec; column: W's rows / y's features split, row: W's columns / x's features split). a and l
are replicated (every component has global support, so every shard needs all of them):
  column  y_k = (ΔW x)[R_k], the slice of a full-length inverse transform; x is whole, so nothing is sent.
          Ĝ from the zero-padded local output gradient is a partial sum of the full Ĝ.
  row     X̂ = D x from the zero-padded local input is a partial sum of the full X̂, so y_k is a partial
          output that the base layer's all-reduce completes; ∂L/∂x_k is the slice of a full-length inverse.
  K, hence ∂L/∂a and ∂L/∂l, is then a partial sum over the group: ``param_layouts`` declares both
  ``partial_grad`` and the engine sums them once per step (O(B) values). No per-token collective is added.
  The gathered path uses the basis entries at the shard's global positions; the dense path builds the
  shard of ΔW.

Schedule (Algorithm 1), driven by the optimizer step t (``StepContext.step``, 0-based):
    location step  iff  t < B_s and t mod (B_a + B_l) >= B_a;   every other step is a coefficient step.
``LocaController`` sets, between optimizer steps, which gradients the adapters compute (so every micro-batch
of a step has the same phase, whatever the accumulation), and before ``optimizer.step`` drops the inactive
group's gradients. Its only state beyond ``ctx.step`` is the step the next backward belongs to (checkpointed).

Decisions (specs/loca.md §8):
- Decision (specs/loca.md §8.1): l̂ = round(clamp(l, 0, 1) · (dim-1)), so every index is reachable (the
  ref-code's clamp to 0.999 makes the top index unreachable for dim >= 502), and the controller clamps l back
  into [0, 1] after each location step, so a location never sits where its gradient is zero.
- Decision (specs/loca.md §8.2, edges): the neighbour index is clamped into [0, dim-1] and the difference is
  divided by the actual distance, 2 inside and 1 at an edge: a true one-sided difference there (the ref-code
  divides by 2 everywhere, halving the edge gradient).
- Decision (specs/loca.md §8.2, clamp): the location gradient is clamped to ±loc_grad_clip in index units (the
  ref-code's ±1) once per step, after accumulation and every reduction (§7.4: clamping partial sums would make
  the result depend on the micro-batch and tensor-parallel split). None disables it.
- Decision (specs/loca.md §8.3): colliding components are summed (as the ref-code's sparse to_dense).
- Decision (specs/loca.md §8.4): B_s, B_a, B_l count optimizer steps, never forward calls.
- Decision (specs/loca.md §8.5): the locations get their own optimizer group (``optimizer_overrides``: lr =
  loc_lr, no weight decay, following the run's warmup/decay in proportion). The inactive group's gradient is
  set to None, not zero: AdamW then skips the tensor (no momentum drift, no decay) and its moments carry over
  between blocks, as in the ref-code. Other trainable modules (a head) train every step.
- Decision (specs/loca.md §8.8): m = out_features (rows of nn.Linear.weight), as the ref-code.
- Decision (specs/loca.md §7.4): the initial locations are drawn whole from the torch RNG on every shard, so
  all ranks of a split hold the same (a, l); adapter math runs in fp32 whatever the activation dtype (§7.5).
- Decision (host syncs): the host reads only the numbers of distinct frequencies (cost model, gathered-path
  sizes), for all sites at once when the locations change (``refresh_locations``): once when the controller is
  built and once after each location step (in ``after_optimizer_step``), none in coefficient steps, none per
  layer or micro-batch.
- Decision (ZeRO-3, what marks a change): the rounded locations are keyed by ``loca_loc``'s version counter and
  device, never its ``data_ptr``, and the controller re-indexes every site where it changes them, while the
  engines hold them whole (its hook). ZeRO-3 re-gathers a parameter into a new buffer at every use: a pointer key
  changed on some ranks and not on others (allocator reuse), so one rank alone re-indexed its peers inside a
  forward, and reading a peer's partitioned parameter there is DeepSpeed's implicit all-gather (which also
  registers it as an external parameter of the module in forward, gathered at each of its later forwards):
  collectives on one rank only (the gloo size mismatch of issue 17's ZeRO-3 launch). A forward re-indexes only
  its own site (after a load that wrote the locations); the controller re-indexes all sites together. The dense path's cached ΔW is keyed by the
  optimizer step as well: the ZeRO engines write updated values into storage the parameter's version counter
  does not see.
- Decision (determinism): every scatter with repeated indices is reproducible on CUDA: the spectral path's
  column scatter uses the sort-based ``index_put_(accumulate=True)`` there (``_add_columns``; CUDA's
  ``index_add_`` uses atomics), the gathered and dense paths' ``index_put_`` already does, the sampled products
  are gathers and fixed-order sums. Two runs on one GPU give bitwise-equal LoCA outputs and gradients.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Callable, Mapping

import torch
from torch import Tensor, nn

from dist_peft.methods.base import Adapter, Controller, ParamLayout, Site, SiteShape, StepContext, register_method
from dist_peft.ops.dct import dct, dct_basis, dct_packed, idct, idct_packed, packed_index, packed_size
from dist_peft.parallel.shard import ShardKind, ShardSpec

PATHS = ("auto", "spectral", "gathered", "dense")


@dataclass(frozen=True, kw_only=True)
class LocaConfig:
    n_frequency: int = 1000
    """B: learnable spectral coefficients per adapted matrix (paper: 1000 on RoBERTa / GPT-2, up to 150,000
    on LLaMA-7B). Named as HF PEFT's FourierFT budget, so budget-matched comparisons read alike."""
    scale: float = 1.0
    """α of Eq. 1. The DCT is orthonormal, so a unit coefficient is a rank-1 update of Frobenius norm α
    (paper: 1; FourierFT needs 64-300 with its unnormalised iFFT)."""
    loc_lr: float = 1e-4
    """η_l: learning rate of the locations, in [0, 1] units (paper: 1e-4); follows the run's warmup/decay."""
    coef_steps: int = 10
    """B_a: coefficient steps per alternation cycle (paper: 10)."""
    loc_steps: int = 20
    """B_l: location steps per cycle (paper: 20)."""
    alternate_until: int = 100
    """B_s: optimizer steps of the alternating phase; the locations are frozen from then on (paper: ~10% of
    the run). 0 keeps the random initial locations for the whole run (the FourierFT-style baseline)."""
    loc_grad_clip: float | None = 1.0
    """Clamp of the location gradient in index units, applied once per step (ref-code: 1); None: no clamp."""
    path: str = "auto"
    """How the update is computed: auto (cost model per layer and forward), spectral, gathered or dense."""

    def __post_init__(self) -> None:
        if self.n_frequency < 1:
            raise ValueError(f"n_frequency: must be a positive integer, got {self.n_frequency}")
        if not math.isfinite(self.scale) or self.scale == 0:
            raise ValueError(f"scale: must be finite and non-zero, got {self.scale}")
        if not self.loc_lr > 0:
            raise ValueError(f"loc_lr: must be > 0, got {self.loc_lr}")
        if self.coef_steps < 1:
            raise ValueError(f"coef_steps: must be >= 1, got {self.coef_steps}")
        if self.loc_steps < 0 or self.alternate_until < 0:
            raise ValueError(f"loc_steps, alternate_until: must be >= 0, got {self.loc_steps}, "
                             f"{self.alternate_until}")
        if self.loc_grad_clip is not None and not self.loc_grad_clip > 0:
            raise ValueError(f"loc_grad_clip: must be > 0 or None, got {self.loc_grad_clip}")
        if self.path not in PATHS:
            raise ValueError(f"path: must be one of {', '.join(PATHS)}, got {self.path!r}")

    @property
    def learns_locations(self) -> bool:
        return self.alternate_until > 0 and self.loc_steps > 0


def is_location_step(step: int, cfg: LocaConfig) -> bool:
    """Algorithm 1 with a 0-based optimizer step: a location step iff t < B_s and t mod (B_a+B_l) >= B_a."""
    return step < cfg.alternate_until and step % (cfg.coef_steps + cfg.loc_steps) >= cfg.coef_steps


# Cost model of ``path: auto``, in multiply-adds of a large fp32 GEMM (the unit the base layer runs at).
# Fitted to single-thread timings of each path on a 2-core AVX-512 CPU, torch 2.13 (1024 tokens, B = 1000,
# shapes 576x576, 192x576, 1536x576, 576x1536): one packed DCT or inverse costs ~18 such units per element per
# log2(N) (reorder, real FFT and twiddle are memory-bound), one pass of a tokens x B gather / scale / scatter
# ~10 units per element. Other hardware shifts the crossovers, not the results: every path is exact.
FFT_COST = 18.0
GATHER_COST = 10.0


def path_costs(tokens: int, m: int, n: int, m_local: int, n_local: int, budget: int, rows: int, cols: int,
               locations: bool) -> dict[str, float]:
    """Modelled cost of one forward + backward of each path (see FFT_COST): ``rows`` / ``cols`` are the
    numbers of distinct frequencies along m / n; ``locations`` adds the neighbour products of Eq. 5."""
    fft_m, fft_n = FFT_COST * m * math.log2(max(m, 2)), FFT_COST * n * math.log2(max(n, 2))
    samples = GATHER_COST * budget * (4 if locations else 0)
    spectral = tokens * (2 * (fft_m + fft_n) + GATHER_COST * budget * 8 + samples)
    if locations:
        rows, cols = min(3 * rows, m), min(3 * cols, n)
    gathered = tokens * (2 * (n_local * cols + m_local * rows + rows * cols) + GATHER_COST * budget * 2 + samples)
    dense = 3 * tokens * m_local * n_local + 2 * (fft_m * n + fft_n * m)
    return {"spectral": spectral, "gathered": gathered, "dense": dense}


class _Locations:
    """Rounded locations (global frequency indices) and what is derived from them; rebuilt only when
    ``loca_loc`` changes, i.e. in location steps.

    The numbers of distinct frequencies (``counts``) are the only values the host reads (the cost model and the
    gathered path's matrix sizes depend on them): ``refresh_locations`` reads them for all sites at once."""

    def __init__(self, loc: Tensor, m: int, n: int):
        unit = loc.detach().clamp(0, 1)
        self.rows = torch.round(unit[0] * (m - 1)).long()
        self.cols = torch.round(unit[1] * (n - 1)).long()
        self.m, self.n = m, n
        self._derived: dict = {}
        self.counts: tuple[int, ...] | None = None
        """Distinct rows, columns, rows with their ±1 neighbours, columns with theirs."""

    def present(self, axis: int, neighbours: bool) -> Tensor:
        """(size,) bool: the frequencies along ``axis`` (0: m, 1: n) that a location (or its neighbour) takes."""
        return self.derived(("present", axis, neighbours), lambda: _presence(
            self.rows if axis == 0 else self.cols, self.m if axis == 0 else self.n, neighbours))

    def count_tensor(self) -> Tensor:
        """The four ``counts`` as a (4,) device tensor (no host sync)."""
        return torch.stack([self.present(axis, nb).sum() for nb in (False, True) for axis in (0, 1)])

    def derived(self, key, build: Callable):
        if key not in self._derived:
            self._derived[key] = build()
        return self._derived[key]

    def distinct(self, neighbours: bool = False) -> tuple[int, int]:
        """Distinct (rows, columns), with their ±1 neighbours if ``neighbours``."""
        if self.counts is None:
            self.counts = tuple(self.count_tensor().tolist())
        return self.counts[2:] if neighbours else self.counts[:2]

    def spectral_index(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(slot_m, sign_m, slot_n, sign_n): packed-layout positions and signs of every frequency (ops.dct)."""
        return self.derived("spectral", lambda: (*packed_index(self.m, self.rows.device),
                                                 *packed_index(self.n, self.rows.device)))


@dataclass(frozen=True)
class _Plan:
    """What one forward needs: geometry, rounded locations, path and which gradients to compute."""

    locs: _Locations
    m: int
    n: int
    out_slice: slice
    in_slice: slice
    scale: float
    path: str
    need_coef: bool
    need_loc: bool


@dataclass(frozen=True)
class _Gathered:
    """Distinct frequencies of the gathered path and the basis rows at the shard's positions."""

    lookup_r: Tensor
    """(m,) position of each row frequency in the row set (-1: absent)."""
    lookup_c: Tensor
    basis_out: Tensor
    """C[row set, local output positions], (rows x m_local)."""
    basis_in: Tensor
    """D[column set, local input positions], (cols x n_local)."""


def _presence(idx: Tensor, size: int, neighbours: bool) -> Tensor:
    """(size,) bool marking the entries of ``idx`` (and their ±1 neighbours, clamped, for Eq. 5)."""
    if neighbours:
        idx = torch.cat([idx, (idx - 1).clamp(min=0), (idx + 1).clamp(max=size - 1)])
    return torch.zeros(size, dtype=torch.bool, device=idx.device).index_fill_(0, idx, True)


def _frequency_set(present: Tensor, count: int) -> tuple[Tensor, Tensor]:
    """(the ``count`` marked frequencies, ascending; lookup from frequency to position, -1 where unmarked), without
    a host sync: ``count`` is known, so a stable sort of the marks replaces ``unique``."""
    freqs = torch.sort((~present).to(torch.uint8), stable=True).indices[:count]
    return freqs, torch.where(present, present.cumsum(0) - 1, -1)


def _gathered(plan: _Plan) -> _Gathered:
    def build() -> _Gathered:
        locs = plan.locs
        rows, cols = locs.distinct(plan.need_loc)
        set_r, lookup_r = _frequency_set(locs.present(0, plan.need_loc), rows)
        set_c, lookup_c = _frequency_set(locs.present(1, plan.need_loc), cols)
        out_pos = torch.arange(plan.out_slice.start, plan.out_slice.stop, device=set_r.device)
        in_pos = torch.arange(plan.in_slice.start, plan.in_slice.stop, device=set_r.device)
        return _Gathered(lookup_r, lookup_c, dct_basis(plan.m, set_r, out_pos), dct_basis(plan.n, set_c, in_pos))

    shard = (plan.out_slice.start, plan.out_slice.stop, plan.in_slice.start, plan.in_slice.stop)
    return plan.locs.derived(("gathered", plan.need_loc, *shard), build)


def _pad(t: Tensor, size: int, sl: slice) -> Tensor:
    """``t`` (tokens x local) placed at ``sl`` in a zero (tokens x size) fp32 tensor (itself when whole)."""
    t = t.float()
    if t.shape[-1] == size:
        return t
    out = t.new_zeros(t.shape[0], size)
    out[:, sl] = t
    return out


def _take(t: Tensor, sl: slice) -> Tensor:
    """Columns ``sl`` of ``t`` (contiguous; ``t`` itself when the slice is whole)."""
    return t if sl.stop - sl.start == t.shape[-1] else t[:, sl].contiguous()


def _columns(t: Tensor, idx: Tensor) -> Tensor:
    """t[:, idx] for a (tokens x N) tensor. Decision: ``gather`` walks the output row by row, reading inside one
    cache-resident row of ``t``; ``index_select`` along dim 1 copies column by column and is ~4x slower on CPU
    for unsorted indices."""
    return torch.gather(t, 1, idx.expand(t.shape[0], -1))


def _add_columns(z: Tensor, idx: Tensor, src: Tensor) -> Tensor:
    """z[:, idx[j]] += src[:, j] for every j, repeated indices summed (the spectral path's scatter), in place.
    Decision (determinism): on CPU ``index_add_`` (a serial loop: deterministic, and the tests' reference); on
    other devices ``_add_columns_sorted``, because CUDA's ``index_add_`` adds with atomics, in an order that
    changes from run to run."""
    if z.device.type == "cpu":
        return z.index_add_(1, idx, src)
    return _add_columns_sorted(z, idx, src)


def _add_columns_sorted(z: Tensor, idx: Tensor, src: Tensor) -> Tensor:
    """``_add_columns`` by ``index_put_(accumulate=True)``, which CUDA always computes by sorting the B indices
    and summing each run of equal ones in that order: bitwise reproducible whatever
    ``torch.use_deterministic_algorithms`` says, at the cost of a sort of B indices per call (the gather and
    scale already read T x B values)."""
    z.T.index_put_((idx,), src.T, accumulate=True)
    return z


def _central_difference(k_at: Callable, rows: Tensor, cols: Tensor, size: int, axis: int) -> Tensor:
    """(size-1) · (K[idx+1] - K[idx-1]) / distance along ``axis``; one-sided (distance 1) at an edge."""
    idx = rows if axis == 0 else cols
    hi, lo = (idx + 1).clamp(max=size - 1), (idx - 1).clamp(min=0)
    k_hi, k_lo = (k_at(hi, cols), k_at(lo, cols)) if axis == 0 else (k_at(rows, hi), k_at(rows, lo))
    return (k_hi - k_lo) / (hi - lo).clamp(min=1) * (size - 1)


def _sampled_grads(k_at: Callable, coef: Tensor, plan: _Plan, need: tuple[bool, ...]):
    """(∂L/∂a, ∂L/∂l) from sampled entries of K (Eqs. 18, 5); ``k_at(rows, cols)`` returns K[rows, cols]."""
    rows, cols = plan.locs.rows, plan.locs.cols
    g_coef = k_at(rows, cols) if need[1] and plan.need_coef else None
    if not (need[2] and plan.need_loc):
        return g_coef, None
    fd = torch.stack([_central_difference(k_at, rows, cols, plan.m, 0),
                      _central_difference(k_at, rows, cols, plan.n, 1)])
    return g_coef, fd * coef


class _SpectralInput(torch.autograd.Function):
    """X̂ = D x of the (zero-padded) local input in the packed layout; backward: the local slice of idct_n."""

    @staticmethod
    def forward(ctx, x: Tensor, n: int, sl: slice) -> Tensor:
        ctx.n, ctx.sl, ctx.dtype = n, sl, x.dtype
        return dct_packed(_pad(x, n, sl))

    @staticmethod
    def backward(ctx, grad: Tensor):
        # Only packed slots that a frequency maps to receive gradient (the spectral path writes nowhere else),
        # so the adjoint of the packed DCT is the packed inverse (ops.dct).
        return _take(idct_packed(grad, ctx.n), ctx.sl).to(ctx.dtype), None, None


class _InputSpectra:
    """The packed spectrum of the last input tensor, shared by the sites that read that same tensor.

    Weak references only: an entry lives while the autograd graph (which saves the spectrum) or a caller holds
    it, so nothing is kept alive by the cache; the key includes the tensor's version counter."""

    _x: weakref.ref | None = None
    _out: weakref.ref | None = None
    _key: tuple = ()

    @classmethod
    def get(cls, x: Tensor, flat: Tensor, n: int, sl: slice) -> Tensor:
        if x.is_inference():
            return _SpectralInput.apply(flat, n, sl)
        key = (x._version, n, sl.start, sl.stop, torch.is_grad_enabled(), flat.shape)
        out = cls._out() if cls._x is not None and cls._x() is x and cls._key == key else None
        if out is None:
            out = _SpectralInput.apply(flat, n, sl)
            cls._x, cls._out, cls._key = weakref.ref(x), weakref.ref(out), key
        return out


class _SpectralFn(torch.autograd.Function):
    """ΔW x = α idct_m(S X̂) in the packed layout; backward by sampled products of Ĝ and X̂. α and the packed
    layout's signs are folded into the B coefficients (no pass over the tokens for them)."""

    @staticmethod
    def forward(ctx, xhat: Tensor, coef: Tensor, loc: Tensor, plan: _Plan) -> Tensor:
        slot_m, sign_m, slot_n, sign_n = plan.locs.spectral_index()
        rows, cols = plan.locs.rows, plan.locs.cols
        z = xhat.new_zeros(xhat.shape[0], packed_size(plan.m))
        scaled = coef * (sign_m[rows] * sign_n[cols] * plan.scale)
        _add_columns(z, slot_m[rows], _columns(xhat, slot_n[cols]).mul_(scaled))  # gather, scale, scatter
        ctx.save_for_backward(xhat, coef)
        ctx.plan = plan
        return _take(idct_packed(z, plan.m, overwrite=True), plan.out_slice)

    @staticmethod
    def backward(ctx, grad: Tensor):
        xhat, coef = ctx.saved_tensors
        plan = ctx.plan
        slot_m, sign_m, slot_n, sign_n = plan.locs.spectral_index()
        rows, cols = plan.locs.rows, plan.locs.cols
        gz = dct_packed(_pad(grad, plan.m, plan.out_slice))  # Ĝ / α, packed
        gz_rows = _columns(gz, slot_m[rows])

        def k_at(r: Tensor, c: Tensor) -> Tensor:
            left = gz_rows if r is rows else _columns(gz, slot_m[r])
            return (left * _columns(xhat, slot_n[c])).sum(0).mul_(sign_m[r] * sign_n[c] * plan.scale)

        grads = _sampled_grads(k_at, coef, plan, ctx.needs_input_grad)
        g_xhat = None
        if ctx.needs_input_grad[0]:  # Sᵀ Ĝ per token: gather at l̂¹, scale by a, scatter at l̂² (after k_at)
            scaled = coef * (sign_m[rows] * sign_n[cols] * plan.scale)
            g_xhat = _add_columns(torch.zeros_like(xhat), slot_n[cols], gz_rows.mul_(scaled))
        return g_xhat, *grads, None


class _GatheredFn(torch.autograd.Function):
    """ΔW x = α C_Rᵀ S_RC (D_C x) with the basis rows at the distinct frequencies (small dense matrices)."""

    @staticmethod
    def forward(ctx, x: Tensor, coef: Tensor, loc: Tensor, plan: _Plan) -> Tensor:
        g = _gathered(plan)
        s = coef.new_zeros(g.basis_out.shape[0], g.basis_in.shape[0])
        s.index_put_((g.lookup_r[plan.locs.rows], g.lookup_c[plan.locs.cols]), coef, accumulate=True)
        u = x @ g.basis_in.T  # X̂ at the column set (partial for a row shard)
        ctx.save_for_backward(u, coef, s)
        ctx.plan = plan
        return (u @ s.T) @ g.basis_out * plan.scale

    @staticmethod
    def backward(ctx, grad: Tensor):
        u, coef, s = ctx.saved_tensors
        plan = ctx.plan
        g = _gathered(plan)
        p = (grad.float() @ g.basis_out.T) * plan.scale  # Ĝ at the row set (partial for a column shard)
        gx = (p @ s) @ g.basis_in if ctx.needs_input_grad[0] else None

        def k_at(r: Tensor, c: Tensor) -> Tensor:
            return (_columns(p, g.lookup_r[r]) * _columns(u, g.lookup_c[c])).sum(0)

        return gx, *_sampled_grads(k_at, coef, plan, ctx.needs_input_grad), None


class _DenseFn(torch.autograd.Function):
    """y = x ΔWᵀ with ΔW built once per step; K = α · dct2(Σ_t g_t x_tᵀ), read at the sampled entries."""

    @staticmethod
    def forward(ctx, x: Tensor, coef: Tensor, loc: Tensor, plan: _Plan, delta: Tensor) -> Tensor:
        ctx.save_for_backward(x, coef)
        ctx.plan, ctx.delta = plan, delta
        return x @ delta.T

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, coef = ctx.saved_tensors
        plan = ctx.plan
        grad = grad.float()
        gx = grad @ ctx.delta if ctx.needs_input_grad[0] else None
        if not (plan.need_coef or plan.need_loc):
            return gx, None, None, None, None
        full = grad.new_zeros(plan.m, plan.n)
        full[plan.out_slice, plan.in_slice] = grad.T @ x  # this shard's block of G
        k = dct(dct(full, dim=0), dim=1).mul_(plan.scale)
        return gx, *_sampled_grads(lambda r, c: k[r, c], coef, plan, ctx.needs_input_grad), None, None


def dense_update(coef: Tensor, rows: Tensor, cols: Tensor, m: int, n: int, out_slice: slice, in_slice: slice,
                 scale: float) -> Tensor:
    """The local block ΔW[out_slice, in_slice] of α Cᵀ S D (Eq. 1): scatter S, then inverse DCTs along m and n
    (the full-length transform of each axis, sliced to the shard)."""
    s = coef.new_zeros(m, n).index_put_((rows, cols), coef, accumulate=True)
    w = idct(s, dim=0)[out_slice]
    return idct(w, dim=1)[:, in_slice].mul_(scale).contiguous()


def refresh_locations(adapters: tuple[LocaAdapter, ...]) -> None:
    """Re-index the rounded locations of every adapter in ``adapters`` whose ``loca_loc`` changed; the numbers of
    distinct frequencies that the cost model and the gathered path need are read in one host sync for all of
    them (so a step syncs once, after a location step, whatever the number of layers)."""
    stale = [a for a in adapters if a._locs is None or a._locs[0] != a._locations_key()]
    locs = [_Locations(a.loca_loc, a.site.out_features, a.site.in_features) for a in stale]
    counted = [loc for a, loc in zip(stale, locs) if a.cfg.path in ("auto", "gathered")]
    if counted:
        for loc, counts in zip(counted, torch.stack([loc.count_tensor() for loc in counted]).tolist()):
            loc.counts = tuple(counts)
    for a, loc in zip(stale, locs):
        a._locs = (a._locations_key(), loc)


class LocaController(Controller):
    """The alternating schedule of Algorithm 1 over all LoCA adapters, by optimizer step (module docstring).
    Host syncs: one after each location step (``refresh_locations``), none otherwise."""

    def __init__(self, adapters: Mapping[str, Adapter]):
        super().__init__(adapters)
        self.cfg: LocaConfig = next(iter(self.adapters.values())).cfg
        self.next_step = 0
        """The optimizer step the next forward/backward belongs to."""
        self._set_phase(0)
        refresh_locations(tuple(self.adapters.values()))  # before any engine partitions them: all whole

    def _set_phase(self, step: int) -> None:
        location = is_location_step(step, self.cfg)
        for adapter in self.adapters.values():
            adapter.train_coef, adapter.train_loc = not location, location
            adapter.step = step

    def gradient_access(self, step: int) -> str:
        """``local``: the hook drops one tensor's gradient by the phase and clamps ``loca_loc.grad`` elementwise."""
        return "local"

    def value_access(self, hook: str, ctx: StepContext) -> bool:
        """Only the location steps' after-step hook: it clamps ``loca_loc`` and re-indexes from it."""
        return hook == "after_optimizer_step" and is_location_step(ctx.step, self.cfg)

    def before_optimizer_step(self, ctx: StepContext) -> None:
        if ctx.step != self.next_step:
            raise RuntimeError(f"LocaController: optimizer step {ctx.step}, but the gradients were computed for "
                               f"step {self.next_step} (call after_optimizer_step after every step and restore "
                               f"the controller state on resume)")
        location = is_location_step(ctx.step, self.cfg)
        for adapter in self.adapters.values():
            (adapter.loca_coef if location else adapter.loca_loc).grad = None
            grad, clip = adapter.loca_loc.grad, self.cfg.loc_grad_clip
            if grad is not None and clip is not None:  # Python limits: no host-to-device copy per site
                for row, size in enumerate((adapter.site.out_features, adapter.site.in_features)):
                    grad[row].clamp_(-clip * (size - 1), clip * (size - 1))

    @torch.no_grad()
    def after_optimizer_step(self, ctx: StepContext) -> None:
        if is_location_step(ctx.step, self.cfg):
            for adapter in self.adapters.values():
                adapter.loca_loc.clamp_(0.0, 1.0)  # bumps every version: all re-indexed here, where each is whole
            refresh_locations(tuple(self.adapters.values()))
        self.next_step = ctx.step + 1
        self._set_phase(self.next_step)

    def state_dict(self) -> dict[str, Tensor]:
        return {"next_step": torch.tensor(self.next_step, dtype=torch.int64)}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        if set(state) != {"next_step"}:
            raise ValueError(f"LocaController: expected the state key next_step, got {sorted(state)}")
        self.next_step = int(state["next_step"])
        self._set_phase(self.next_step)


@register_method("loca", LocaConfig)
class LocaAdapter(Adapter):
    trainable_names = ("loca_coef", "loca_loc")
    size_knob = "n_frequency"
    controller_cls = LocaController

    def __init__(self, site: Site, spec: ShardSpec, cfg: LocaConfig):
        super().__init__(site, spec, cfg)
        m, n = site.out_features, site.in_features
        if cfg.n_frequency > m * n:
            raise ValueError(f"n_frequency: {cfg.n_frequency} coefficients exceed the {m} x {n} = {m * n} entries "
                             f"of {site.name}")
        kw = {"device": site.weight.device, "dtype": torch.float32}
        self.loca_coef = nn.Parameter(torch.zeros(cfg.n_frequency, **kw))
        self.loca_loc = nn.Parameter(torch.rand(2, cfg.n_frequency, **kw))  # whole on every shard (§7.4)
        self.out_slice = slice(*spec.local_range(m)) if spec.kind is ShardKind.COLUMN else slice(0, m)
        self.in_slice = slice(*spec.local_range(n)) if spec.kind is ShardKind.ROW else slice(0, n)
        # Which gradients the next backward computes; LocaController sets them per optimizer step.
        self.train_coef, self.train_loc = True, cfg.learns_locations
        self._locs: tuple[tuple, _Locations] | None = None
        self._delta: tuple[tuple, Tensor] | None = None
        self.step = 0
        """The optimizer step the next forward belongs to (``LocaController`` sets it): keys the cached ΔW."""

    def _locations_key(self) -> tuple:
        """Changes with every in-place write to ``loca_loc`` and with a device move; not with ZeRO-3's re-gathers
        (module docstring: why not ``data_ptr``)."""
        return self.loca_loc._version, self.loca_loc.device

    def _locations(self) -> _Locations:
        if self._locs is None or self._locs[0] != self._locations_key():
            refresh_locations((self,))  # a write outside the schedule (a load): this site only, never a peer
        return self._locs[1]

    def _plan(self, tokens: int) -> _Plan:
        locs, cfg = self._locations(), self.cfg
        m, n = self.site.out_features, self.site.in_features
        need_loc = self.train_loc and self.loca_loc.requires_grad
        path = cfg.path
        if path == "auto":
            costs = path_costs(tokens, m, n, self.out_slice.stop - self.out_slice.start,
                               self.in_slice.stop - self.in_slice.start, cfg.n_frequency, *locs.distinct(), need_loc)
            path = min(costs, key=costs.get)
        return _Plan(locs, m, n, self.out_slice, self.in_slice, cfg.scale, path,
                     self.train_coef and self.loca_coef.requires_grad, need_loc)

    @torch.no_grad()
    def _dense_delta(self, plan: _Plan) -> Tensor:
        key = (self.loca_coef._version, self.step, id(plan.locs))
        if self._delta is None or self._delta[0] != key:
            self._delta = (key, dense_update(self.loca_coef.detach(), plan.locs.rows, plan.locs.cols, plan.m,
                                             plan.n, plan.out_slice, plan.in_slice, plan.scale))
        return self._delta[1]

    def forward(self, x: Tensor, base_out: Tensor) -> Tensor:
        flat = x.reshape(-1, x.shape[-1])
        with torch.autocast(x.device.type, enabled=False):  # adapter math in fp32 (module docstring)
            plan = self._plan(flat.shape[0])
            if plan.path == "spectral":
                xhat = _InputSpectra.get(x, flat, plan.n, plan.in_slice)
                y = _SpectralFn.apply(xhat, self.loca_coef, self.loca_loc, plan)
            elif plan.path == "gathered":
                y = _GatheredFn.apply(flat.float(), self.loca_coef, self.loca_loc, plan)
            else:
                y = _DenseFn.apply(flat.float(), self.loca_coef, self.loca_loc, plan, self._dense_delta(plan))
        return base_out + y.reshape(*x.shape[:-1], -1).to(base_out.dtype)

    def delta_weight(self) -> Tensor:
        locs = self._locations()
        return dense_update(self.loca_coef.detach(), locs.rows, locs.cols, locs.m, locs.n, self.out_slice,
                            self.in_slice, self.cfg.scale)

    def param_layouts(self) -> dict[str, ParamLayout]:
        partial = self.spec.kind is not ShardKind.REPLICATED
        return {"loca_coef": ParamLayout(None, partial), "loca_loc": ParamLayout(None, partial)}

    @classmethod
    def trainable_numel(cls, shape: SiteShape, cfg: LocaConfig) -> int:
        """a (B) and l (2 x B), whole on every shard."""
        return 3 * cfg.n_frequency

    @classmethod
    def group_numels(cls, shape: SiteShape, cfg: LocaConfig) -> tuple[int, ...]:
        """a in the run's group, l in its own (``loc_lr``, no weight decay)."""
        return cfg.n_frequency, 2 * cfg.n_frequency

    @classmethod
    def extra_flops(cls, shape: SiteShape, tokens: int, cfg: LocaConfig) -> tuple[int, int]:
        """The spectral path in FLOPs (a real-FFT DCT of length N ≈ 2.5 N log₂ N): forward the DCT of x (n) and the
        inverse DCT of the scattered spectrum (m) plus 2B gathers; backward the same two transforms of the output
        gradient plus 4B sampled products (16B while locations learn). The other paths are chosen only when the
        cost model finds them cheaper (``path_costs``)."""
        m, n = shape.out_features, shape.in_features
        fft = int(2.5 * (m * math.log2(max(m, 2)) + n * math.log2(max(n, 2))))
        b = cfg.n_frequency
        return (fft + 2 * b) * tokens, (fft + (16 if cfg.learns_locations else 4) * b) * tokens

    @classmethod
    def forward_saved_bytes(cls, shape: SiteShape, cfg: LocaConfig, act_bytes: int, tokens: int,
                            samples: int) -> int:
        """By the path ``path_costs`` picks for ``tokens`` (distinct frequencies: their expectation for B uniform
        locations, m(1 − (1 − w/m)^B), w = 3 with Eq. 5's neighbours while locations learn: an upper bound over the
        phases): spectral keeps the input spectrum D x (n per token, the input's dtype; shared by the sites that
        read the same input, counted here per site: an upper bound); gathered the fp32 X̂ at the column set
        (cols per token) and the rows x cols coefficient matrix S of the forward; dense the fp32 input (a copy
        only when the input is not fp32). None of them saves the input itself."""
        m, n, b = shape.out_features, shape.in_features, cfg.n_frequency
        w = 3 if cfg.learns_locations else 1
        rows, cols = (round(size * (1 - (1 - min(w / size, 1)) ** b)) for size in (m, n))
        path = cfg.path
        if path == "auto":
            costs = path_costs(tokens, m, n, shape.m_local, shape.n_local, b, rows, cols, cfg.learns_locations)
            path = min(costs, key=costs.get)
        if path == "spectral":
            return act_bytes * n * tokens
        if path == "gathered":
            return 4 * cols * (tokens + rows)
        return 4 * shape.n_local * tokens * (act_bytes != 4)

    @classmethod
    def saves_input(cls, shape: SiteShape, cfg: LocaConfig, tokens: int) -> bool:
        """No path saves x (``forward_saved_bytes``); the frozen base saves no input."""
        return False

    @classmethod
    def width_costs(cls, shape: SiteShape, cfg: LocaConfig) -> tuple[str, ...]:
        m, n = shape.out_features, shape.in_features
        return (f"{shape.module_type}: LoCA runs full-length DCTs of n = {n} and m = {m} per token on every rank "
                f"(memory-bound FFTs, not GEMMs); the dense path would cache an m_local x n_local fp32 ΔW",)

    def optimizer_overrides(self) -> dict[str, dict[str, float]]:
        return {"loca_loc": {"lr": self.cfg.loc_lr, "weight_decay": 0.0}}

    def validate_loaded(self, tensors: Mapping[str, Tensor]) -> None:
        """Locations read from a file must be finite and inside [0, 1]."""
        loc = tensors["loca_loc"]
        if not torch.isfinite(loc).all() or loc.min() < 0 or loc.max() > 1:
            raise ValueError(f"{self.site.name}.loca_loc: locations must be finite and in [0, 1], got values in "
                             f"[{loc.min().item():g}, {loc.max().item():g}]")
