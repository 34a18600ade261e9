"""FO-LoRA — Frequency-Orthogonal LoRA for multitask fine-tuning (seed 000, "Frequency-Orthogonal LoRA:
Improving Multitask Adaptation Efficiency", ICML-template draft, §1 and App. D–E; spec ``specs/folora.md``).
One frozen linear W (m x n, y = W x) adapted for T tasks at once with one shared pair of LoRA factors:

    ΔW_t = s · U · F⁻¹(M_t ⊙ F(V) ⊙ G_t) = s · U · V_t                                      (Eq. 3)
    y    = W x + s · U (V_t x)                     for a token x of task t
    M_t  = 1 on argmax_{S ⊆ Ω_t, |S| = k} Φ_t(S),   Ω_{t+1} = Ω_t \\ S,   Ω_1 = Ω              (Eqs. 1–2)
    G_t* = argmin_G ‖Y_t − s · U · F⁻¹(M_t ⊙ F(V) ⊙ G) X_t‖²                                 (Eq. 3, Stage 2)

Symbols
    m, n   out / in features of W (global);  r the rank;  s = lora_alpha / r (LoRA's scale: T = 1 is LoRA)
    U      m x r ``folora_U``, shared by the tasks, zero at init (LoRA's B)
    V      r x n ``folora_V``, shared, Kaiming-uniform at init (LoRA's A, drawn alike from the same RNG)
    F      the real FFT along n, row-wise over V's r rows;  Ω the K = n//2 + 1 rfft bins
    M_t    task t's 0/1 mask over Ω, stored as ``folora_bins`` (K,): the task that owns each bin, −1 for none
    G_t    task t's real scaling over Ω: row t of ``folora_G`` (T x K), ones at init; only bins of M_t matter
    k      bins per task, ``frequencies_per_task`` (default ⌊K / T⌋)
    Gr_t   ∂L_t/∂ΔW = Σ_tokens g xᵀ with g = ∂L/∂y: the full weight gradient of task t (App. E)
    c_j/n  Parseval weight of bin j: ⟨a, b⟩ = Σ_j (c_j/n) Re(â_j conj b̂_j), c_j = 1 at DC (and Nyquist for
           even n), 2 elsewhere

Forward: V_t = irfft(M_t ⊙ rfft(V) ⊙ G_t) for all T tasks once per forward (T·r·n log n), then LoRA's two
GEMMs; a batch that mixes tasks gathers V_t per sample (B x r x n) and runs one batched GEMM — LoRA's FLOPs.
No dense m x n ΔW is ever formed outside ``delta_weight`` (merging).

Properties (tested): disjoint masks make the rows of V_s and V_t orthogonal (Parseval), so
⟨ΔW_s, ΔW_t⟩_F = s² tr(V_sᵀ UᵀU V_t) = 0. App. E's closed forms, in 1-D: ∂L/∂U = s Gr V_tᵀ,
∂L/∂V = s 𝒜_t(Uᵀ Gr) with 𝒜_t = irfft(M_t G_t ⊙ rfft(·)) self-adjoint (a real, even frequency response), and
∂L/∂G_t[j] = s (c_j/n) M_t[j] Σ_rows Re(V̂ conj(rfft(Uᵀ Gr)))[:, j]. rank ΔW_t ≤ r.

Decision (specs/folora.md, F): the real FFT (rfft / irfft), so V_t is real without conjugate bookkeeping and
G_t is real; the frequency budget Ω is the K rfft bins.
Decision (specs/folora.md, rank): with Eq. 3 and a shared U, rank ΔW_t ≤ r and rank Σ_t ΔW_t = rank U Σ_t V_t
≤ r too; what grows with T is the input side: the row spaces of V_1 … V_T are mutually orthogonal and together
span up to min(r·T, n) dimensions. App. D's "rank increase" masks the 2-D spectrum of UV, which Eq. 3 does not.
Decision (specs/folora.md, Stage 1 utility): gradient alignment, additive over bins, so the argmax of Eq. 1 is
a top-k: φ_t(i) = Σ_rows |rfft(Gr_t)[row, i]|², with Gr_t summed over ``calibration_batches`` micro-batches of
task t (the loss is a token sum, not a mean, so data-parallel ranks add up to one process on all batches).
U = 0 at init makes ∂L/∂V zero, hence ∂L/∂ΔW. Tasks are allocated in their configured order; ties go to the
lower bin. The allocation is per site, a deterministic function of all-reduced scores (identical on every
rank), and saved in adapter files (``folora_bins``) and checkpoints (controller state).
Decision (calibration point): ``FoloraController.calibrate(draw, backward)``, which the Trainer calls once
before the first step for a method whose controller defines it (a resumed run restores the masks from the
checkpoint instead). Until then, and with ``calibration_batches: 0``, bins are interleaved: bin i → task i mod T
for i < k·T (every task gets low and high bins).
Decision (specs/folora.md, Stage 2 target): the one-step target Y_t = (ΔW_t − η Gr_t) X_t on the tokens of the
step being taken, every ``refit_every`` optimizer steps (in ``before_optimizer_step``, after the gradient
reductions; Adam then still applies its own update to G). The current G reproduces ΔW_t X_t exactly, so the
problem is min_δ ‖Φ δ + η Gr_t X_t‖² over the k active bins, with Φ's column j = s U V_(j) X_t and
V_(j) = irfft(e_j ⊙ rfft(V)); normal equations A δ = −η c with A = s² Σ_τ Z_τ UᵀU Z_τᵀ (k x k),
c_j = s Σ_τ z_j(x_τ)·(Uᵀ Gr_t x_τ), and z_j(x) = V_(j) x = (c_j/n) Re(V̂[:, j] conj x̂_j) (N x k x r features, no
k x r x n tensor). Solved by the pseudo-inverse in float64 plus ``refit_ridge``·mean(diag A) on the diagonal.
η = ``refit_lr`` or the step's learning rate. The step record gets ``refit_<t>_predicted_dloss`` = ⟨∂L/∂G_t, δ⟩,
the first-order change of the step's loss that the refit predicts (it is not re-measured).
Decision (interface): per-sample task ids reach the adapters through ``Controller.on_batch`` (the collated
batch's ``task_ids``, one per sample, indexing the first dimension of every adapter input — the transformers
[batch, seq, hidden] layout). The ids stay on the device: the adapters get them clamped into [0, T) and the
range is checked once per step (``before_optimizer_step``; at once when gradients are off), so an unknown id
is a ValueError without a host sync per micro-batch; tensor ids always take the per-sample gather. Inputs
without ids use ``default_task`` (single-task data, tools and tests that call an adapter directly). Merging
bakes in ``default_task``'s ΔW.
Decision: no dropout on the adapter input (the draft has none).

Sharding (the base layout is mirrored, never inferred):
  column: U holds the local rows of m; V and G are replicated and their gradients are partial sums.
  row:    V stays replicated (the FFT runs along the full n on every rank) and each rank slices its columns of
          V_t after the inverse transform; U and G are replicated; V, U, G gradients are partial sums, and the
          output is a partial sum that the base layer's all-reduce completes.
Calibration memory: the sites are scored in consecutive groups whose spectra fit ``calibration_bytes`` (one pass
of the calibration micro-batches per group), so a rank holds one group's spectra, never the whole model's
(≈ 44 GB per rank at 12B, 270 GB at 70B). The masks are the same for any grouping.
Calibration: the gradient spectrum is summed over the data-parallel group (``FoloraController.data_group``,
None = the world, right for the Trainer's pure data parallelism), then over the split for a row split
(zero-padded local inputs make partial spectra) before |·|²; a column split sums the energies of its rows.
Refit: Uᵀ Gr_t is summed over data ranks; a row split sums Z and X(UᵀGr)ᵀ over the split; a column split sums
A and c over the split; A and c are summed over data ranks; every rank solves the same k x k system.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dist_peft.methods.base import Adapter, Controller, ParamLayout, Site, SiteShape, StepContext, register_method
from dist_peft.methods.lora import add_product
from dist_peft.parallel import collectives
from dist_peft.parallel.shard import ShardKind, ShardSpec


@dataclass(frozen=True, kw_only=True)
class FoloraConfig:
    r: int = 8
    """Rank r of the shared factors U (m x r) and V (r x n)."""
    lora_alpha: float = 16.0
    """Numerator of the scale s = lora_alpha / r (LoRA's, so that T = 1 with a full mask is LoRA)."""
    num_tasks: int = 2
    """T, the number of tasks; a run's ``data.tasks`` must list exactly this many."""
    frequencies_per_task: int | None = None
    """k, the rfft bins of each task's mask (None: ⌊K / T⌋ with K = n//2 + 1 at each site)."""
    default_task: int = 0
    """Task of inputs that come without task ids, and the task that ``delta_weight`` (merging) bakes in."""
    calibration_batches: int = 4
    """Micro-batches per task whose gradient spectrum scores the bins (Stage 1); 0 keeps interleaved bins."""
    calibration_bytes: int = 4 << 30
    """Bytes of gradient spectra (m_local x (n//2 + 1) complex64 per site) one rank holds at once during Stage 1:
    the sites are scored in consecutive groups that fit (a larger site alone), one pass of the calibration
    micro-batches per group (default 4 GiB: 12B ≈ 11 passes on one GPU, 70B at TP8 ≈ 9)."""
    refit_every: int = 0
    """Refit G_t by least squares (Stage 2) after every refit_every-th optimizer step's backward (0: never)."""
    refit_lr: float | None = None
    """η of the one-step refit target (None: the step's learning rate)."""
    refit_ridge: float = 1e-4
    """Tikhonov term of the refit, relative to the mean diagonal of the normal matrix (0: plain least squares)."""

    def __post_init__(self) -> None:
        if self.r <= 0:
            raise ValueError(f"r: must be a positive integer, got {self.r}")
        if self.num_tasks < 1:
            raise ValueError(f"num_tasks: must be >= 1, got {self.num_tasks}")
        if self.frequencies_per_task is not None and self.frequencies_per_task < 1:
            raise ValueError(f"frequencies_per_task: must be >= 1 or null, got {self.frequencies_per_task}")
        if not 0 <= self.default_task < self.num_tasks:
            raise ValueError(f"default_task: must be in [0, {self.num_tasks}), got {self.default_task}")
        if self.calibration_bytes < 1:
            raise ValueError(f"calibration_bytes: must be >= 1, got {self.calibration_bytes}")
        for name in ("calibration_batches", "refit_every", "refit_ridge"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)}")
        if self.refit_lr is not None and self.refit_lr <= 0:
            raise ValueError(f"refit_lr: must be > 0 or null, got {self.refit_lr}")

    @property
    def scale(self) -> float:
        return self.lora_alpha / self.r


def bin_weights(n: int, device: Any = None) -> Tensor:
    """c_j / n for the K = n//2 + 1 rfft bins of a real length-n signal (Parseval's weights)."""
    c = torch.full((n // 2 + 1,), 2.0, device=device)
    c[0] = 1.0
    if n % 2 == 0:
        c[-1] = 1.0
    return c / n


def task_masks(bins: Tensor, num_tasks: int) -> Tensor:
    """The (T, K) 0/1 masks M_t of a per-bin task vector (−1: no task); disjoint by construction."""
    return (bins[None, :] == torch.arange(num_tasks, device=bins.device)[:, None]).float()


def task_filters(v: Tensor, masks: Tensor, g: Tensor) -> Tensor:
    """V_t = irfft(M_t ⊙ rfft(V) ⊙ G_t) for every task: (T, r, n) from V (r, n), the masks M (T, K) of
    ``task_masks`` and G (T, K); T·r·n log n."""
    return torch.fft.irfft(torch.fft.rfft(v)[None] * (masks * g)[:, None, :], n=v.shape[-1])


def default_allocation(num_bins: int, num_tasks: int, k: int) -> Tensor:
    """Interleaved bins before calibration: bin i → task i mod T for i < k·T, the rest unassigned (−1)."""
    bins = torch.full((num_bins,), -1, dtype=torch.long)
    bins[: k * num_tasks] = torch.arange(k * num_tasks) % num_tasks
    return bins


def greedy_allocation(scores: Tensor, k: int) -> Tensor:
    """Eqs. 1–2 with an additive utility: task t, in order, takes the k highest-scoring bins still free (ties
    to the lower bin: a stable sort). ``scores`` is (T, K); returns the per-bin task vector (−1: unassigned)."""
    num_tasks, num_bins = scores.shape
    if k * num_tasks > num_bins:
        raise ValueError(f"frequencies_per_task: {num_tasks} tasks x {k} bins exceed the {num_bins} rfft bins")
    bins = torch.full((num_bins,), -1, dtype=torch.long, device=scores.device)
    for t in range(num_tasks):
        free = (bins < 0).nonzero().squeeze(1)
        order = torch.sort(scores[t, free], descending=True, stable=True).indices
        bins[free[order[:k]]] = t
    return bins


def spectral_features(x: Tensor, vhat: Tensor, bins: Tensor, n: int, offset: int) -> Tensor:
    """z[τ, j] = V_(j) x_τ = (c/n)_{b_j} Re(V̂[:, b_j] · conj x̂_τ[b_j]) for the selected bins b (Parseval), with
    V_(j) = irfft(e_{b_j} ⊙ V̂). ``x`` (N, n_loc) holds columns [offset, offset + n_loc) of the tokens and is
    zero-padded to n, so a row shard's result is a partial sum. Returns (N, k, r); cost N·n log n + N·k·r."""
    xhat = torch.fft.rfft(F.pad(x, (offset, n - offset - x.shape[-1])))[:, bins]
    weights = bin_weights(n, x.device)[bins]
    return weights[None, :, None] * (vhat[:, bins].T[None] * xhat.conj()[:, :, None]).real


def token_tasks(ids: int | Tensor, x: Tensor, batch_dim: int = 0) -> Tensor:
    """The task of every token of ``x`` (…, n) as a flat (N,) vector, from one task or per-sample ids (along
    ``batch_dim``)."""
    lead = x.shape[:-1]
    if isinstance(ids, int):
        return torch.full((math.prod(lead),), ids, dtype=torch.long, device=x.device)
    shape = [1] * len(lead)
    shape[batch_dim] = -1
    return ids.reshape(shape).expand(lead).reshape(-1)


def _by_group(adapters: Mapping[str, FoloraAdapter], kind: ShardKind) -> dict[int, tuple[Any, list[str]]]:
    """Names of the adapters split as ``kind``, by process group of the split."""
    out: dict[int, tuple[Any, list[str]]] = {}
    for name, a in adapters.items():
        if a.spec.kind is kind:
            out.setdefault(id(a.spec.group), (a.spec.group, []))[1].append(name)
    return out


def calibration_groups(sizes: Sequence[int], budget: int) -> list[list[int]]:
    """Consecutive indices of ``sizes`` in groups whose sum fits ``budget`` (a larger item forms a group alone)."""
    groups: list[list[int]] = []
    used = budget
    for i, size in enumerate(sizes):
        if used + size > budget:
            groups.append([])
            used = 0
        groups[-1].append(i)
        used += size
    return groups


def refit_delta(a: Tensor, c: Tensor, lr: float, ridge: float) -> Tensor:
    """δ = −η (A + λI)⁺ c in float64 with λ = ridge · mean(diag A), for one k x k system or a batch (…, k, k)."""
    a64 = a.double()
    lam = ridge * a64.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(0)
    eye = torch.eye(a.shape[-1], dtype=a64.dtype, device=a64.device)
    pinv = torch.linalg.pinv(a64 + lam[..., None, None] * eye, hermitian=True)
    return (-lr * (pinv @ c.double()[..., None])[..., 0]).float()


class FoloraController(Controller):
    """Per-sample task ids to every adapter, the one-time frequency allocation (Stage 1) and the periodic
    least-squares refit of G (Stage 2).

    Host synchronisation: none per micro-batch or per site. Task ids stay on the device (their range is checked
    once per step, in ``before_optimizer_step``); a refit step adds two syncs (its per-task token counts and its
    predicted loss changes) and one pseudo-inverse per task and distinct k, all sites of that k batched."""

    def __init__(self, adapters: Mapping[str, FoloraAdapter]):
        super().__init__(adapters)
        self.cfg: FoloraConfig = next(iter(self.adapters.values())).cfg
        self.step = 0
        """Optimizer steps completed (checkpointed: it decides which steps capture tokens for a refit)."""
        self.step_metrics: dict[str, float] = {}
        """The last step's refit figures; the Trainer adds them to the step's log record."""
        self._captured: dict[str, list[tuple[Tensor, Tensor, Tensor]]] | None = None
        self._id_range: Tensor | None = None
        """(min, max) of the task ids handed out since the last check, on the device."""
        self._index_masks()

    def _index_masks(self) -> None:
        """Build every site's masks and per-task bin lists now (a host sync per site), when the masks are set, not
        in a step."""
        for a in self.adapters.values():
            a._index()

    def set_tasks(self, ids: int | Tensor | None) -> None:
        """Hand task ids (one task, per-sample ids, or None) to every adapter. Per-sample ids stay on the device:
        their range is checked by ``check_tasks`` (once per step; at once while gradients are off, as in
        evaluation) and the adapters get them clamped into [0, T), so a bad id never indexes out of bounds."""
        num_tasks = self.cfg.num_tasks
        if isinstance(ids, Tensor):
            if ids.dim() != 1:
                raise ValueError(f"task_ids: shape {tuple(ids.shape)} is not a vector of task ids (one per sample)")
            if ids.numel():
                seen = torch.stack([ids.min(), ids.max()])
                self._id_range = seen if self._id_range is None else \
                    torch.stack([self._id_range[0].minimum(seen[0]), self._id_range[1].maximum(seen[1])])
                if not torch.is_grad_enabled():
                    self.check_tasks()
            ids = ids.clamp(0, num_tasks - 1)
        elif isinstance(ids, int) and not 0 <= ids < num_tasks:
            raise ValueError(f"task_ids: task {ids} is not in [0, {num_tasks})")
        for a in self.adapters.values():
            a.task_ids = ids

    def check_tasks(self) -> None:
        """Raise if a task id handed out since the last check was outside [0, T): one host sync for them all."""
        if self._id_range is None:
            return
        (lo, hi), self._id_range = self._id_range.tolist(), None
        if lo < 0 or hi >= self.cfg.num_tasks:
            raise ValueError(f"task_ids: ids in [{lo}, {hi}] are not all task ids in [0, {self.cfg.num_tasks}) "
                             f"(FO-LoRA was built for {self.cfg.num_tasks} tasks)")

    def on_batch(self, batch: Mapping[str, Tensor]) -> None:
        self.set_tasks(batch.get("task_ids"))
        if self.cfg.refit_every and (self.step + 1) % self.cfg.refit_every == 0 and self._captured is None:
            self._captured = {name: [] for name in self.adapters}
            for name, a in self.adapters.items():
                a.recorder = functools.partial(self._capture, self._captured[name])

    @staticmethod
    def _capture(into: list, adapter: FoloraAdapter, x: Tensor, g: Tensor, ids: int | Tensor) -> None:
        """Refit steps: keep this micro-batch's inputs, output gradients and token tasks (N rows each)."""
        into.append((x.reshape(-1, x.shape[-1]).float(), g.detach().reshape(-1, g.shape[-1]).float(),
                     token_tasks(ids, x, adapter.site.batch_dim)))

    def _reduce(self, tensors: Mapping[str, list[Tensor]], kind: ShardKind | None) -> None:
        """Sum each adapter's tensors over its split's group (adapters split as ``kind``) or, for kind None,
        over the data-parallel group; one coalesced all-reduce per group."""
        if kind is None:
            collectives.all_reduce_coalesced([t for ts in tensors.values() for t in ts], self.data_group)
            return
        for group, names in _by_group({n: self.adapters[n] for n in tensors}, kind).values():
            collectives.all_reduce_coalesced([t for n in names for t in tensors[n]], group)

    def _calibrate_group(self, names: list[str], draw: Callable[[int, int], Mapping[str, Tensor]],
                         backward: Callable[[Mapping[str, Tensor]], None]) -> dict[str, list[Tensor]]:
        """One pass of Stage 1 for the sites ``names``: φ_t(i) = Σ_rows |rfft(Gr_t)[row, i]|² of every task.
        Their spectra are views of one flat buffer (row-split sites last, by group), so the data-parallel sum is
        one in-place all-reduce and each row split's sum one more, on its contiguous segment."""
        adapters = {n: self.adapters[n] for n in names}
        rows = _by_group(adapters, ShardKind.ROW)
        ordered = [n for n in names if adapters[n].spec.kind is not ShardKind.ROW] + \
            [n for _, group_names in rows.values() for n in group_names]
        shapes = [(adapters[n].folora_U.shape[0], adapters[n].folora_G.shape[1]) for n in ordered]
        sizes = [m * k for m, k in shapes]
        offsets = [0, *itertools.accumulate(sizes)]
        position = {n: i for i, n in enumerate(ordered)}
        segments = [(group, slice(offsets[position[ns[0]]], offsets[position[ns[-1]] + 1]))
                    for group, ns in rows.values()]
        device = next(iter(self.adapters.values())).folora_U.device
        flat = torch.empty(offsets[-1], dtype=torch.complex64, device=device)
        views = {n: v.view(shape) for n, v, shape in zip(ordered, flat.split(sizes), shapes)}
        for n, a in adapters.items():
            a.recorder = lambda adapter, x, g, ids: adapter.accumulate_spectrum(x, g)
            a.calib_spectrum = views[n]
        scores: dict[str, list[Tensor]] = {n: [] for n in names}
        for task in range(self.cfg.num_tasks):
            flat.zero_()
            self.set_tasks(task)
            for i in range(self.cfg.calibration_batches):
                backward(draw(task, i))
            if not names:
                continue
            with torch.no_grad():
                collectives.all_reduce(torch.view_as_real(flat), self.data_group)
                for group, segment in segments:
                    collectives.all_reduce(torch.view_as_real(flat[segment]), group)
                energies = {n: views[n].abs().square().sum(0) for n in names}
                self._reduce({n: [e] for n, e in energies.items()}, ShardKind.COLUMN)
            for n, e in energies.items():
                scores[n].append(e)
        for a in adapters.values():  # the buffer goes with the group
            a.recorder, a.calib_spectrum = None, None
        return scores

    def calibrate(self, draw: Callable[[int, int], Mapping[str, Tensor]],
                  backward: Callable[[Mapping[str, Tensor]], None]) -> None:
        """Stage 1 (Eqs. 1–2): for each task in order, ``backward(draw(task, i))`` on ``calibration_batches``
        micro-batches of that task while the adapters accumulate rfft(Gr); then each site's bins go to the tasks
        greedily by gradient energy. The caller zeroes the parameter gradients afterwards.

        Memory: the spectra of one group of sites within ``calibration_bytes`` (plus one site's micro-batch
        spectrum and its input's rfft while it is added), and the (T, K) energies of every site; each group costs
        one pass over the calibration micro-batches and, per task, one in-place all-reduce over the data group,
        one per row split's group and one coalesced call per column split's group. Every rank runs as many passes
        (the most any rank needs: pipeline stages run each backward together); the masks do not depend on the
        grouping."""
        if not self.cfg.calibration_batches:
            return
        names = list(self.adapters)
        groups = [[names[i] for i in g] for g in calibration_groups(
            [self.adapters[n].spectrum_bytes() for n in names], self.cfg.calibration_bytes)]
        passes = int(collectives.all_reduce(torch.tensor([len(groups)]), None, "max")[0])
        scores: dict[str, list[Tensor]] = {}
        try:
            for group in groups + [[]] * (passes - len(groups)):
                scores.update(self._calibrate_group(group, draw, backward))
        finally:
            for a in self.adapters.values():
                a.recorder, a.calib_spectrum = None, None
            self.set_tasks(None)
        with torch.no_grad():
            for name, a in self.adapters.items():
                a.folora_bins.copy_(greedy_allocation(torch.stack(scores[name]), a.k))
        self._index_masks()

    def _refit(self, lr: float) -> dict[str, float]:
        """Stage 2 on the captured tokens of this step, task by task (see the module docstring). Each site's tokens
        are ordered by task once (a stable sort, so each task keeps its token order) and split by the per-task
        counts, which one host sync reads for all sites; the predicted loss changes (Σ over every site of the model:
        summed over ``layer_group``, the stages holding the other layers) are read in one more."""
        eta = self.cfg.refit_lr or lr
        num_tasks = self.cfg.num_tasks
        tokens = {n: [torch.cat(parts) for parts in zip(*self._captured[n])] for n in self.adapters
                  if self._captured[n]}
        tasks = torch.arange(num_tasks, device=next(iter(self.adapters.values())).folora_U.device)
        if not tokens:
            return self._predicted([torch.zeros((), device=tasks.device)] * num_tasks)
        counts = torch.stack([(ids[None, :] == tasks[:, None]).sum(1) for _, _, ids in tokens.values()]).tolist()
        split = {}
        for (n, (x, g, ids)), count in zip(tokens.items(), counts):
            order = torch.argsort(ids, stable=True)
            split[n] = (x[order].split(count), g[order].split(count))
        predicted = []
        for task in range(num_tasks):
            sel = {n: (xs[task], gs[task]) for n, (xs, gs) in split.items()}
            ut_gr = {n: [self.adapters[n].refit_gradient_product(x, g)] for n, (x, g) in sel.items()}
            self._reduce(ut_gr, None)
            zq = {n: list(self.adapters[n].refit_features(sel[n][0], ut_gr[n][0], task)) for n in sel}
            self._reduce(zq, ShardKind.ROW)
            ac = {n: list(self.adapters[n].refit_normal_equations(*zq[n])) for n in sel}
            self._reduce(ac, ShardKind.COLUMN)
            self._reduce(ac, None)
            by_k: dict[int, list[str]] = {}
            for n in ac:
                by_k.setdefault(self.adapters[n].k, []).append(n)
            total = torch.zeros((), device=tasks.device)
            for same in by_k.values():  # one batched solve for all sites with the same k
                deltas = refit_delta(torch.stack([ac[n][0] for n in same]), torch.stack([ac[n][1] for n in same]),
                                     eta, self.cfg.refit_ridge)
                for n, delta in zip(same, deltas):
                    total = total + self.adapters[n].apply_refit(task, delta)
            predicted.append(total)
        return self._predicted(predicted)

    def _predicted(self, per_task: list[Tensor]) -> dict[str, float]:
        """The step metrics: each task's predicted loss change of this process's sites, summed over the stages."""
        total = torch.stack(per_task)
        if self.layer_group is not None:  # None: every layer is here (not the world group, which may be data parallel)
            collectives.all_reduce(total, self.layer_group)
        return {f"refit_{t}_predicted_dloss": v for t, v in enumerate(total.tolist())}

    def gradient_access(self, step: int) -> str:
        """``whole`` in a refit step (``apply_refit`` reads ⟨∂L/∂G_t[bins], δ⟩, a sum over elements); ``none``
        otherwise (the task-id check reads no gradient)."""
        return "none" if self._captured is None else "whole"

    def value_access(self, hook: str, ctx: StepContext) -> bool:
        """Only a refit step's before-step hook (it adds δ to ``folora_G``)."""
        return hook == "before_optimizer_step" and self._captured is not None

    def before_optimizer_step(self, ctx: StepContext) -> None:
        self.check_tasks()
        self.step_metrics = {}
        if self._captured is not None:
            for a in self.adapters.values():
                a.recorder = None
            self.step_metrics = self._refit(ctx.lr)
            self._captured = None

    def after_optimizer_step(self, ctx: StepContext) -> None:
        self.step = ctx.step + 1

    def on_skipped_step(self, ctx: StepContext) -> None:
        """A refit step's captured tokens are the skipped batch's (with non-finite gradients): drop them, so the
        step's next try captures its own and refits on those alone."""
        for a in self.adapters.values():
            a.recorder = None
        self._captured = None

    def state_dict(self) -> dict[str, Tensor]:
        """The step counter and every site's bin → task vector (the masks)."""
        return {"step": torch.tensor(self.step), **{f"bins/{n}": a.folora_bins for n, a in self.adapters.items()}}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        expected = set(self.state_dict())
        if set(state) != expected:
            raise ValueError(f"FO-LoRA controller state: expected {len(expected)} entries (step and the bins of "
                             f"each site), got {sorted(set(state) ^ expected)[:3]} differing")
        self.step = int(state["step"])
        with torch.no_grad():
            for name, a in self.adapters.items():
                a.folora_bins.copy_(state[f"bins/{name}"])
        self._index_masks()


@register_method("folora", FoloraConfig)
class FoloraAdapter(Adapter):
    trainable_names = ("folora_U", "folora_V", "folora_G")
    size_knob = "r"
    buffer_names = ("folora_bins",)
    controller_cls = FoloraController

    def __init__(self, site: Site, spec: ShardSpec, cfg: FoloraConfig):
        super().__init__(site, spec, cfg)
        m, n, num_bins = site.weight.shape[0], site.in_features, site.in_features // 2 + 1
        self.k = cfg.frequencies_per_task or num_bins // cfg.num_tasks
        if self.k < 1 or self.k * cfg.num_tasks > num_bins:
            raise ValueError(f"{site.name}: {cfg.num_tasks} tasks x {self.k} bins do not fit the {num_bins} rfft "
                             f"bins of n = {n} (frequencies_per_task)")
        kw = {"device": site.weight.device, "dtype": torch.float32}
        self.folora_U = nn.Parameter(torch.zeros(m, cfg.r, **kw))
        # Decision: V is always the full r x n (row splits included) and drawn like LoRA's full A.
        self.folora_V = nn.Parameter(torch.empty(cfg.r, n, **kw))
        nn.init.kaiming_uniform_(self.folora_V, a=math.sqrt(5))
        self.folora_G = nn.Parameter(torch.ones(cfg.num_tasks, num_bins, **kw))
        self.register_buffer("folora_bins", default_allocation(num_bins, cfg.num_tasks, self.k).to(kw["device"]))
        self.scale = cfg.scale
        self.cols = spec.local_range(n) if spec.kind is ShardKind.ROW else (0, n)
        self.task_ids: int | Tensor | None = None
        """Task of this forward's inputs: one task, per-sample ids (dim 0 of x), or None for default_task."""
        self.recorder: Callable[[FoloraAdapter, Tensor, Tensor, int | Tensor], None] | None = None
        """Called with (adapter, x, ∂L/∂y, ids) during backward while set (calibration and refit capture)."""
        self.calib_spectrum: Tensor | None = None
        self._bin_index: tuple[Tensor, int, Tensor, tuple[Tensor, ...]] | None = None

    def filters(self) -> Tensor:
        """This shard's columns of every V_t: (T, r, n_loc)."""
        return task_filters(self.folora_V, self._index()[0], self.folora_G)[..., self.cols[0]:self.cols[1]]

    def _tasks(self, x: Tensor) -> int | Tensor:
        ids = self.cfg.default_task if self.task_ids is None else self.task_ids
        if isinstance(ids, int):
            if not 0 <= ids < self.cfg.num_tasks:
                raise ValueError(f"{self.site.name}: task {ids} is not one of the {self.cfg.num_tasks} tasks")
        elif ids.shape != (x.shape[self.site.batch_dim],):
            raise ValueError(f"{self.site.name}: {tuple(ids.shape)} task ids for an input of shape {tuple(x.shape)}"
                             f" (one id per sample, along the input's dimension {self.site.batch_dim})")
        return ids

    def forward(self, x: Tensor, base_out: Tensor) -> Tensor:
        ids = self._tasks(x)
        vt, u = self.filters().to(x.dtype), self.folora_U.to(x.dtype)
        if isinstance(ids, int):
            z = F.linear(x, vt[ids])
        else:  # mixed tasks: V_t gathered per sample, one batched GEMM (samples moved to the front)
            xb = x.movedim(self.site.batch_dim, 0)
            z = torch.bmm(xb.reshape(xb.shape[0], -1, xb.shape[-1]), vt[ids].transpose(1, 2))
            z = z.reshape(*xb.shape[:-1], -1).movedim(0, self.site.batch_dim)
        out = add_product(base_out, z, u, self.scale)
        if self.recorder is not None and out.requires_grad:
            xd, record = x.detach(), self.recorder
            out.register_hook(lambda g: record(self, xd, g, ids))
        return out

    def delta_weight(self, task: int | None = None) -> Tensor:
        """The local shard of ΔW_t = s U V_t (Eq. 3) for ``task`` (default: the config's default_task)."""
        t = self.cfg.default_task if task is None else task
        return self.scale * (self.folora_U @ self.filters()[t])

    def param_layouts(self) -> dict[str, ParamLayout]:
        kind = self.spec.kind
        split = kind is not ShardKind.REPLICATED
        return {"folora_U": ParamLayout(0 if kind is ShardKind.COLUMN else None, kind is ShardKind.ROW),
                "folora_V": ParamLayout(None, split), "folora_G": ParamLayout(None, split)}

    @classmethod
    def trainable_numel(cls, shape: SiteShape, cfg: FoloraConfig) -> int:
        """U (m_local x r), the full V (r x n) and G (T x (n//2 + 1))."""
        return cfg.r * (shape.m_local + shape.in_features) + cfg.num_tasks * (shape.in_features // 2 + 1)

    @classmethod
    def cast_numel(cls, shape: SiteShape, cfg: FoloraConfig) -> int:
        """U only: V and G reach the GEMM as the filters V_t, whose copies ``forward_saved_bytes`` counts."""
        return cfg.r * shape.m_local

    @classmethod
    def buffer_bytes(cls, shape: SiteShape, cfg: FoloraConfig) -> tuple[int, int]:
        """The bin owners ``folora_bins`` (n//2 + 1, int64)."""
        return 8 * (shape.in_features // 2 + 1), 0

    @classmethod
    def forward_saved_bytes(cls, shape: SiteShape, cfg: FoloraConfig, act_bytes: int, tokens: int,
                            samples: int) -> int:
        """Per token z = V_t x (r, x's dtype); per sample the V_t that the batched GEMM gathers (r x n_local, x's
        dtype); per forward the filters' spectra (V's rfft, r rows of complex64, and M_t ⊙ G_t and M_t, 4 + 4 bytes
        over the T x (n//2 + 1) bins).

        Decision: every forward is planned on the batched path. With num_tasks ≥ 2 a run has data.tasks, so every
        batch carries per-sample ids and gathers one V_t per sample, however many distinct tasks the micro-batch
        holds (one or all: the same bytes). A one-task run without data.tasks takes the single-task GEMM, which
        saves the (T, r, n) filters once instead (n_local columns after a cast to x's dtype), and a site whose
        input needs no gradient (the first layer's q/k/v under a frozen embedding) saves no V_t: both planned as
        the batched path. Not counted: under megatron's sequence-first layout the batched GEMM saves a
        samples-first copy of x in place of x (the same bytes, but one per site, not shared by the sites reading
        that input)."""
        return (act_bytes * cfg.r * (tokens + samples * shape.n_local)
                + 8 * (cfg.r + cfg.num_tasks) * (shape.in_features // 2 + 1))

    @classmethod
    def extra_flops(cls, shape: SiteShape, tokens: int, cfg: FoloraConfig) -> tuple[int, int]:
        """LoRA's GEMMs on the local V_t columns, 2r(n_local + m_local) per token forward and twice that backward,
        plus the filters of all T tasks once per forward: rfft and irfft of V (≈ 5 r n log₂ n, the same again in
        backward)."""
        lora = cfg.r * (shape.n_local + shape.m_local) * tokens
        fft = 5 * cfg.num_tasks * cfg.r * shape.in_features * max(1, shape.in_features.bit_length() - 1)
        return 2 * lora + fft, 4 * lora + fft

    def task_bins(self, task: int) -> Tensor:
        """Task ``task``'s bins, ascending."""
        return self._index()[1][task]

    def _index(self) -> tuple[Tensor, tuple[Tensor, ...]]:
        """The masks M (T, K) of ``task_masks`` and each task's bins, built once per change of ``folora_bins``
        (calibration, loading; the controller builds them then), so a step's forward constructs no mask and the
        split by task reads the per-task counts on the host only then. Decision: keyed by the buffer object and
        its version counter (an in-place write bumps it; a move or an assigning load replaces the object), never
        its ``data_ptr`` (loca.py's module docstring: a pointer key can change on some ranks only)."""
        bins, cached = self.folora_bins, self._bin_index
        if cached is None or cached[0] is not bins or cached[1] != bins._version:
            masks = task_masks(bins, self.cfg.num_tasks)
            counts = masks.sum(1, dtype=torch.long).tolist()
            order = torch.argsort(torch.where(bins < 0, self.cfg.num_tasks, bins), stable=True)
            self._bin_index = cached = (bins, bins._version, masks, order[: sum(counts)].split(counts))
        return cached[2], cached[3]

    def spectrum_bytes(self) -> int:
        """Bytes of this site's calibration spectrum rfft(Gr): m_local x (n//2 + 1) complex64."""
        return self.folora_U.shape[0] * self.folora_G.shape[1] * 8

    @torch.no_grad()
    def accumulate_spectrum(self, x: Tensor, g: Tensor) -> None:
        """Calibration: add rfft(Gr) = Σ_τ g_τ x̂_τᵀ (m_loc x K, complex) of one micro-batch to ``calib_spectrum``
        in place (the controller sets it to a view of its buffer; None: set it). Row split: x̂ of the zero-padded
        local columns, so the result is a partial sum over the split."""
        x2, g2 = x.reshape(-1, x.shape[-1]).float(), g.reshape(-1, g.shape[-1]).float()
        n = self.site.in_features
        xhat = torch.fft.rfft(F.pad(x2, (self.cols[0], n - self.cols[1])))
        spectrum = g2.T.to(xhat.dtype) @ xhat
        if self.calib_spectrum is None:
            self.calib_spectrum = spectrum
        else:
            self.calib_spectrum.add_(spectrum)

    @torch.no_grad()
    def refit_gradient_product(self, x: Tensor, g: Tensor) -> Tensor:
        """Uᵀ Gr = (g U)ᵀ X (r x n_loc) for tokens x (N, n_loc), g (N, m_loc). Column: a partial sum over the
        split; row: this shard's columns. A sum over data-parallel ranks either way."""
        return (g @ self.folora_U).T @ x

    @torch.no_grad()
    def refit_features(self, x: Tensor, ut_gr: Tensor, task: int) -> tuple[Tensor, Tensor]:
        """Z (N, k, r) of the task's bins and Q = X (Uᵀ Gr)ᵀ (N, r); partial sums over a row split."""
        vhat = torch.fft.rfft(self.folora_V)
        z = spectral_features(x, vhat, self.task_bins(task), self.site.in_features, self.cols[0])
        return z, x @ ut_gr.T

    @torch.no_grad()
    def refit_normal_equations(self, z: Tensor, q: Tensor) -> tuple[Tensor, Tensor]:
        """A = s² Σ_τ Z_τ UᵀU Z_τᵀ (k x k) and c = s Σ_τ Z_τ Q_τ (k); partial sums over a column split (U's rows)."""
        gram = self.folora_U.T @ self.folora_U
        a = self.scale ** 2 * torch.einsum("tjr,rq,tiq->ji", z, gram, z)
        return a, self.scale * torch.einsum("tjr,tr->j", z, q)

    @torch.no_grad()
    def apply_refit(self, task: int, delta: Tensor) -> Tensor:
        """G_t[bins] += δ (from ``refit_delta``); returns ⟨∂L/∂G_t, δ⟩, the predicted first-order loss change, as
        a device scalar."""
        bins = self.task_bins(task)
        grad = self.folora_G.grad
        predicted = grad[task, bins] @ delta if grad is not None else delta.new_zeros(())
        self.folora_G[task, bins] += delta
        return predicted
