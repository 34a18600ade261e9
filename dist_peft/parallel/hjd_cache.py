"""FRoD's HJD bases for each adapted module type: computed once from Gram matrices, cached on disk with a
checksum, loaded by every later run (specs/frod.md §4 Stage 1, §8.2, §8.3).

Latent rows: the HJD of layer i works on A_i = W_i (input side, d = in_features) or A_i = W_iᵀ (output side,
d = out_features), rows × d. A tensor-parallel split (``ShardSpec``) either cuts the rows of A (a column split on
the input side, a row split on the output side): each rank's Gram is a partial sum over the split's group and no
weight moves; or it cuts the latent dimension d (row/input, column/output): a Gram needs whole rows of A, so
``whole_latent`` all-gathers the shards over the group first (m × n per layer, held while its type is decomposed).
Each rank reads only its own shard of the checkpoint either way.

One module type (``compute_hjd``), with the kernels of ops/hjd.py:
  1. G_i, the fp64 Gram AᵢᵀAᵢ of each local layer. When the rows of A are split: one coalesced all-reduce over
     ``shard_group`` for all layers.
  2. G = Σ_i G_i and L, summed over ``layer_group`` (ranks holding different layers, e.g. pipeline stages).
  3. R = chol(G)ᵀ, or TSQR of the weight blocks when the Gram is ill-conditioned (R factors gathered over the
     groups, at most d × d each).
  4. M = Σ_i (G_i + πG)⁻¹ summed over ``layer_group``, divided by L.
  5. (λ, Z) = eigh(R M Rᵀ), sign-fixed;
  6. σ_i for the local layers.
A group of None means no split (``shard_group``) or no layers elsewhere (``layer_group``): no collective is issued
for it. Every collective goes through dist_peft.parallel.collectives.

``hjd_bases`` makes every rank hold the same bits (§8.2: never rely on ranks recomputing eigenvectors
independently): only rank 0 touches the cache folder; it broadcasts whether it loaded the entry (or refused it:
then every rank raises, none waits), every rank takes part in computing a missing one (the σ of every layer then
summed into one table over ``layer_group``) and rank 0 saves it; rank 0 then broadcasts R, Z, λ and the σ table
to every rank, which keeps the σ_i of its own layers. Every rank must hold every module type (checked once): the
types are processed in sorted order, so all ranks issue the same collectives in the same order.

Cache entry (one folder per module type, written by files.atomic_dir with a SHA-256 manifest; safetensors, never
pickle): ``hjd.safetensors`` (R, Z, λ and σ of every layer, fp64), ``key.json`` (format version, module type,
side, π, weight dtype, layer names, whole shape, fingerprint) and ``info.json`` (route, condition estimate,
seconds). Decision: without an explicit folder the entry lives under ``cache_root()/frod/<type>-<side>-<key
digest>``, so other settings or other weights find their own entry and compute it once; an explicit folder
(``hjd_cache``) holds ``<folder>/<type>/`` and refuses an entry whose key differs from this run's, naming every
differing field. A manifest mismatch (altered or truncated file) is refused in both cases.
Decision: the key identifies the whole model's weights and is the same under any TP/PP layout, so an entry
written by a single process (``dist-peft precompute``) serves a megatron run and the other way round. The
fingerprint is SHA-256 over the layers' digests in layer order; a layer's digest is SHA-256 of its name and of
the SHA-256 of each latent row (``row_digests``). A shard holding whole latent rows hashes only its own rows;
the row digests (32 bytes each) are gathered over ``shard_group``, the layer digests over ``layer_group``. This
hashes every byte of the type's weights (≈0.3 s for SmolLM2-135M); for multi-GB types a sampled hash would be
cheaper — not needed at the sizes run here.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor
from tqdm import tqdm

from dist_peft.files import BadFileError, atomic_dir, load_tensors, read_json, save_tensors, verify_dir, write_json
from dist_peft.ops import hjd
from dist_peft.parallel import collectives
from dist_peft.parallel.shard import ShardSpec

FORMAT_VERSION = 2
"""2: the fingerprint is built from row digests (layout-independent); 1 hashed the bytes as one stream."""
WEIGHTS, KEY, INFO = "hjd.safetensors", "key.json", "info.json"
ENTRY = ("R", "Z", "eigenvalues", "sigma")
"""The tensors of an entry, in this order wherever they travel together (sigma: layers × d, in key order)."""


@dataclass(frozen=True)
class HjdBases:
    """The HJD of one module type: W_i = U_i Σ_i Vᵀ with V = RᵀZ (input side; output side: the HJD of Wᵢᵀ)."""

    module_type: str
    side: str
    """``input`` (paper orientation, d = in_features) or ``output`` (HJD of Wᵀ, d = out_features)."""
    r: Tensor
    z: Tensor
    eigenvalues: Tensor
    sigma: dict[str, Tensor]
    """σ_i (d, fp64) by site name."""

    def latent_maps(self) -> tuple[Tensor, Tensor]:
        """(F, F⁻¹) of the latent transform a ↦ a + ((a F) N̂ᵀ) F⁻¹ (methods/frod.py): input side F = V,
        F⁻¹ = V⁻¹ = (R⁻¹Z)ᵀ; output side F = V⁻ᵀ = R⁻¹Z, F⁻¹ = Vᵀ."""
        b = hjd.inverse_transpose_basis(self.r, self.z)
        v = hjd.joint_basis(self.r, self.z)
        return (v, b.T) if self.side == "input" else (b, v.T)


def row_digests(w: Tensor, side: str) -> Tensor:
    """SHA-256 of each latent row of W (a row on the input side, a column on the output side): rows × 32 uint8.
    A shard holding a block of whole latent rows gives its block of the list, whatever the layout."""
    a = (w if side == "input" else w.T).detach().cpu().contiguous()
    digests = b"".join(hashlib.sha256(row).digest() for row in a.view(torch.uint8).numpy())
    return torch.frombuffer(bytearray(digests), dtype=torch.uint8).view(-1, 32)


def _layer_order(name: str) -> list:
    """Natural order of site names (``layers.2`` before ``layers.10``): the key's layer order on any layout."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def cache_key(module_type: str, side: str, weights: Mapping[str, Tensor], pi: float, shard_group: Any = None,
              layer_group: Any = None) -> dict[str, Any]:
    """The key of a type's entry, identical on every rank and under any layout (module docstring): ``weights``
    hold whole latent rows, split over ``shard_group``; the other layers of the type are on ``layer_group``."""
    first = next(iter(weights.values()))
    local = torch.stack([row_digests(w, side) for w in weights.values()]).to(first.device)
    rows = _gather(local, 1, shard_group).cpu()
    mine = [(name, hashlib.sha256(name.encode() + r.numpy().tobytes()).hexdigest()) for name, r in zip(weights, rows)]
    parts = collectives.all_gather_object(mine, layer_group) if layer_group is not None else [mine]
    layers = dict(sorted((item for part in parts for item in part), key=lambda item: _layer_order(item[0])))
    d = first.shape[1] if side == "input" else first.shape[0]
    return {"format_version": FORMAT_VERSION, "module_type": module_type, "side": side,
            "regularization_alpha": pi, "dtype": str(first.dtype).removeprefix("torch."),
            "shape": [rows.shape[1], d] if side == "input" else [d, rows.shape[1]], "layers": list(layers),
            "fingerprint": hashlib.sha256("".join(layers.values()).encode()).hexdigest()}


def entry_dir(key: Mapping[str, Any], cache: str | Path | None) -> Path:
    """Where the entry of ``key`` lives: ``<cache>/<type>`` or, without ``cache``, a folder named by the key."""
    if cache is not None:
        return Path(cache) / key["module_type"]
    from dist_peft.train.models import cache_root  # lazy: train.models imports transformers and the configs

    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return cache_root() / "frod" / f"{key['module_type']}-{key['side']}-{digest}"


def _sum(tensors: list[Tensor], group: Any) -> None:
    if group is not None:
        collectives.all_reduce_coalesced(tensors, group)


def _gather(t: Tensor, dim: int, group: Any) -> Tensor:
    return collectives.all_gather_cat(t, dim, group) if group is not None else t


def whole_latent(weights: Mapping[str, Tensor], side: str, spec: ShardSpec | None) -> tuple[dict[str, Tensor], Any]:
    """(weights with the whole latent dimension, the group their latent rows are split over or None), from the
    local shards and their split (module docstring): rows of A split → the shards and the split's group; the
    latent dimension split → the shards all-gathered over the group, and None."""
    if spec is None or spec.weight_dim is None:
        return dict(weights), None
    if spec.size > 1 and (spec.group is None or collectives.group_rank(spec.group) != spec.rank):
        raise ValueError(f"the HJD of a {spec.kind.value}-split module type needs the split's process group, with "
                         f"shard k on group rank k (got group {spec.group!r}, rank {spec.rank}); a virtual shard "
                         "has none: give the whole weights")
    latent_dim = 1 if side == "input" else 0
    if spec.weight_dim != latent_dim:
        return dict(weights), spec.group
    return {name: _gather(w, latent_dim, spec.group) for name, w in weights.items()}, None


def _tsqr(weights: Mapping[str, Tensor], side: str, shard_group: Any, layer_group: Any) -> Tensor:
    r = hjd.tsqr_r([w if side == "input" else w.T for w in weights.values()])
    for group in (shard_group, layer_group):
        if group is not None:
            r = hjd.tsqr_r([collectives.all_gather_cat(r, 0, group)])
    return hjd.check_full_rank(r)


def compute_hjd(module_type: str, side: str, weights: Mapping[str, Tensor], pi: float, shard_group: Any = None,
                layer_group: Any = None) -> tuple[HjdBases, dict[str, Any]]:
    """Steps 1–6 above for one module type; returns the bases and an info record (route, cond, seconds)."""
    start = time.perf_counter()
    bar = tqdm(total=2 * len(weights), desc=f"HJD {module_type} ({side} side)", unit="layer", dynamic_ncols=True)
    grams = []
    for w in weights.values():
        grams.append(hjd.latent_gram(w, side))
        bar.update()
    _sum(grams, shard_group)
    total = torch.zeros_like(grams[0])
    for g in grams:
        total += g
    count = torch.tensor([float(len(grams))], dtype=torch.float64, device=total.device)
    _sum([total, count], layer_group)
    r, route = hjd.cholesky_r(total), "cholesky"
    if r is None:
        try:
            r, route = _tsqr(weights, side, shard_group, layer_group), "tsqr"
        except hjd.RankDeficientError as e:
            other = "output" if side == "input" else "input"
            raise hjd.RankDeficientError(f"HJD of {module_type} ({side} side, d={total.shape[0]}, {int(count.item())} "
                                         f"layers): {e}; leave {module_type} out of target_modules or adapt it "
                                         f"on the {other} side (output_side_modules)") from None
    mean_inverse = torch.zeros_like(total)
    for g in grams:
        mean_inverse += hjd.inverse_ridge(g, total, pi)
        bar.update()
    bar.close()
    _sum([mean_inverse], layer_group)
    lam, z = hjd.joint_eigenbasis(r, mean_inverse / count)
    b = hjd.inverse_transpose_basis(r, z)
    sigma = {name: hjd.strengths(g, b) for name, g in zip(weights, grams)}
    info = {"route": route, "cond1_R": hjd.condition_1(r), "seconds": round(time.perf_counter() - start, 3)}
    return HjdBases(module_type, side, r, z, lam, sigma), info


def save_hjd(folder: Path, key: Mapping[str, Any], tensors: Sequence[Tensor], info: Mapping[str, Any]) -> None:
    """Write the entry: ``tensors`` in ``ENTRY`` order."""
    with atomic_dir(folder) as tmp:
        save_tensors(tmp / WEIGHTS, dict(zip(ENTRY, tensors)))
        write_json(tmp / KEY, dict(key))
        write_json(tmp / INFO, dict(info))


def _entry_shapes(key: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    d = key["shape"][1] if key["side"] == "input" else key["shape"][0]
    return {"R": (d, d), "Z": (d, d), "eigenvalues": (d,), "sigma": (len(key["layers"]), d)}


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def load_hjd(folder: Path, key: Mapping[str, Any]) -> list[Tensor]:
    """The entry's tensors (``ENTRY`` order) in ``folder`` after checking its manifest and that its key equals
    ``key``."""
    verify_dir(folder)
    found = read_json(folder / KEY)
    diffs = [f"{k} {_short(found.get(k))} in the cache, {_short(v)} in this run" for k, v in key.items()
             if found.get(k) != v]
    if diffs:
        raise BadFileError(f"{folder}: HJD cache built for other settings or weights ({'; '.join(diffs)}); "
                           "delete the folder or point method.hjd_cache elsewhere")
    t = load_tensors(folder / WEIGHTS)
    for name, shape in _entry_shapes(key).items():
        if name not in t or tuple(t[name].shape) != shape or not torch.isfinite(t[name]).all():
            raise BadFileError(f"{folder / WEIGHTS}: {name} is missing, not finite, or not of shape {shape}")
    return [t[name] for name in ENTRY]


def _load_or_compute(module_type: str, side: str, weights: Mapping[str, Tensor], key: Mapping[str, Any],
                     folder: Path, pi: float, shard_group: Any, layer_group: Any) -> HjdBases:
    """One type's bases on every rank (the broadcasts of the module docstring)."""
    device, rank0 = next(iter(weights.values())).device, collectives.group_rank() == 0
    status = torch.zeros(1, dtype=torch.int64, device=device)  # 0: compute, 1: rank 0 loaded, 2: rank 0 refused
    if rank0 and folder.exists():
        try:
            tensors = load_hjd(folder, key)
        except Exception:
            collectives.broadcast(status.fill_(2))
            raise
        status.fill_(1)
        print(f"HJD {module_type}: loaded from {folder} (checksum and key verified; not recomputed)", flush=True)
    collectives.broadcast(status)
    if status.item() == 2:
        raise BadFileError(f"HJD {module_type}: rank 0 refused the cache entry {folder} (its error says why)")
    if status.item() == 1 and not rank0:
        tensors = [torch.empty(shape, dtype=torch.float64) for shape in _entry_shapes(key).values()]
    elif status.item() == 0:
        if rank0:
            print(f"HJD {module_type}: no cache entry at {folder}; computing from {len(key['layers'])} layers",
                  flush=True)
        bases, info = compute_hjd(module_type, side, weights, pi, shard_group, layer_group)
        table = torch.zeros(_entry_shapes(key)["sigma"], dtype=torch.float64, device=device)
        for name, sigma in bases.sigma.items():
            table[key["layers"].index(name)] = sigma
        _sum([table], layer_group)  # each layer group holds every layer once
        tensors = [bases.r, bases.z, bases.eigenvalues, table]
        if rank0:
            save_hjd(folder, key, tensors, info)
            print(f"HJD {module_type}: {info['route']} route, {info['seconds']} s; saved to {folder}", flush=True)
    r, z, lam, table = (collectives.broadcast(t.to(device), src=0) for t in tensors)
    return HjdBases(module_type, side, r, z, lam, {name: table[key["layers"].index(name)] for name in weights})


def hjd_bases(weights_by_type: Mapping[str, Mapping[str, Tensor]], sides: Mapping[str, str], pi: float,
              cache: str | Path | None = None, specs: Mapping[str, ShardSpec | None] | None = None,
              layer_group: Any = None) -> dict[str, HjdBases]:
    """The bases of every module type, the same bits on every rank, σ_i for the local layers: loaded from the
    type's cache entry when one exists (and verifies), otherwise computed, saved by rank 0 (module docstring).
    ``weights_by_type``: the local shards by site name; ``specs``: the split of each type (absent or None: whole);
    ``layer_group``: the ranks holding the type's other layers (None: this process holds every layer). Rank 0
    prints one line per type saying which."""
    types = sorted(weights_by_type)
    if any(other != types for other in collectives.all_gather_object(types)):
        raise ValueError(f"every rank must hold layers of the same adapted module types (this rank: {types})")
    out = {}
    for module_type in types:
        side = sides[module_type]
        weights, shard_group = whole_latent(weights_by_type[module_type], side, (specs or {}).get(module_type))
        key = cache_key(module_type, side, weights, pi, shard_group, layer_group)
        out[module_type] = _load_or_compute(module_type, side, weights, key, entry_dir(key, cache), pi,
                                            shard_group, layer_group)
    return out
