"""FRoD's HJD bases for each adapted module type: computed once from Gram matrices, cached on disk with a
checksum, loaded by every later run (specs/frod.md §4 Stage 1, §8.2, §8.3).

One module type (``compute_hjd``), with the kernels of ops/hjd.py:
  1. G_i, the fp64 Gram of each layer's latent side (WᵢᵀWᵢ, or WᵢWᵢᵀ for the output side). A shard of Wᵢ split
     on the other side gives a partial sum: one coalesced all-reduce over ``shard_group`` for all layers.
  2. G = Σ_i G_i and L, summed over ``layer_group`` (ranks holding different layers, e.g. pipeline stages).
  3. R = chol(G)ᵀ, or TSQR of the weight blocks when the Gram is ill-conditioned (R factors gathered over the
     groups, at most d × d each).
  4. M = Σ_i (G_i + πG)⁻¹ summed over ``layer_group``, divided by L.
  5. (λ, Z) = eigh(R M Rᵀ), sign-fixed;
  6. σ_i for the local layers.
``hjd_bases`` then broadcasts R, Z, λ from rank 0, loaded or computed, so that every rank holds the same bits
(§8.2: never rely on ranks recomputing eigenvectors independently).
A group of None means this process holds every layer of the type whole (the transformers integration): no
collective is issued for it. Every collective goes through dist_peft.parallel.collectives.

Cache entry (one folder per module type, written by files.atomic_dir with a SHA-256 manifest; safetensors, never
pickle): ``hjd.safetensors`` (R, Z, λ and σ of every layer, fp64), ``key.json`` (format version, module type,
side, π, weight dtype, layer names, shape, SHA-256 fingerprint of the weights' bytes) and ``info.json`` (route,
condition estimate, seconds). Decision: without an explicit folder the entry lives under
``cache_root()/frod/<type>-<side>-<key digest>``, so other settings or other weights find their own entry and
compute it once; an explicit folder (``hjd_cache``) holds ``<folder>/<type>/`` and refuses an entry whose key
differs from this run's, naming every differing field. A manifest mismatch (altered or truncated file) is refused
in both cases. Decision: the fingerprint hashes every byte of the type's weights (≈0.3 s for SmolLM2-135M);
for multi-GB types a sampled hash would be cheaper — not needed at the sizes run here.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor
from tqdm import tqdm

from dist_peft.files import BadFileError, atomic_dir, load_tensors, read_json, save_tensors, verify_dir, write_json
from dist_peft.ops import hjd
from dist_peft.parallel import collectives

FORMAT_VERSION = 1
WEIGHTS, KEY, INFO = "hjd.safetensors", "key.json", "info.json"


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


def fingerprint(weights: Mapping[str, Tensor]) -> str:
    """SHA-256 over the names, shapes, dtypes and bytes of the weights (in the given order)."""
    h = hashlib.sha256()
    for name, w in weights.items():
        t = w.detach().contiguous().cpu()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def cache_key(module_type: str, side: str, weights: Mapping[str, Tensor], pi: float) -> dict[str, Any]:
    first = next(iter(weights.values()))
    return {"format_version": FORMAT_VERSION, "module_type": module_type, "side": side,
            "regularization_alpha": pi, "dtype": str(first.dtype).removeprefix("torch."),
            "shape": list(first.shape), "layers": list(weights), "fingerprint": fingerprint(weights)}


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
    count = torch.tensor([float(len(grams))], dtype=torch.float64)
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


def save_hjd(folder: Path, key: Mapping[str, Any], bases: HjdBases, info: Mapping[str, Any]) -> None:
    tensors = {"R": bases.r, "Z": bases.z, "eigenvalues": bases.eigenvalues,
               "sigma": torch.stack([bases.sigma[name] for name in key["layers"]])}
    with atomic_dir(folder) as tmp:
        save_tensors(tmp / WEIGHTS, tensors)
        write_json(tmp / KEY, dict(key))
        write_json(tmp / INFO, dict(info))


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def load_hjd(folder: Path, key: Mapping[str, Any]) -> HjdBases:
    """The entry in ``folder`` after checking its manifest and that its key equals ``key``."""
    verify_dir(folder)
    found = read_json(folder / KEY)
    diffs = [f"{k} {_short(found.get(k))} in the cache, {_short(v)} in this run" for k, v in key.items()
             if found.get(k) != v]
    if diffs:
        raise BadFileError(f"{folder}: HJD cache built for other settings or weights ({'; '.join(diffs)}); "
                           "delete the folder or point method.hjd_cache elsewhere")
    t = load_tensors(folder / WEIGHTS)
    d = key["shape"][1] if key["side"] == "input" else key["shape"][0]
    expected = {"R": (d, d), "Z": (d, d), "eigenvalues": (d,), "sigma": (len(key["layers"]), d)}
    for name, shape in expected.items():
        if name not in t or tuple(t[name].shape) != shape or not torch.isfinite(t[name]).all():
            raise BadFileError(f"{folder / WEIGHTS}: {name} is missing, not finite, or not of shape {shape}")
    sigma = dict(zip(key["layers"], t["sigma"].unbind(0)))
    return HjdBases(key["module_type"], key["side"], t["R"], t["Z"], t["eigenvalues"], sigma)


def hjd_bases(weights_by_type: Mapping[str, Mapping[str, Tensor]], sides: Mapping[str, str], pi: float,
              cache: str | Path | None = None) -> dict[str, HjdBases]:
    """The bases of every module type: loaded from its cache entry when one exists (and verifies), otherwise
    computed, saved by rank 0, and returned. Prints one line per type saying which."""
    out = {}
    for module_type, weights in weights_by_type.items():
        side = sides[module_type]
        key = cache_key(module_type, side, weights, pi)
        folder = entry_dir(key, cache)
        if folder.exists():
            bases = load_hjd(folder, key)
            print(f"HJD {module_type}: loaded from {folder} (checksum and key verified; not recomputed)", flush=True)
        else:
            print(f"HJD {module_type}: no cache entry at {folder}; computing from {len(weights)} layers", flush=True)
            bases, info = compute_hjd(module_type, side, weights, pi)
            if collectives.group_rank() == 0:
                save_hjd(folder, key, bases, info)
            print(f"HJD {module_type}: {info['route']} route, {info['seconds']} s; saved to {folder}", flush=True)
        for t in (bases.r, bases.z, bases.eigenvalues):  # every rank, loaded or computed: the same bits (§8.2)
            collectives.broadcast(t, src=0)
        out[module_type] = bases
    return out
