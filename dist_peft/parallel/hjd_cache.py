"""FRoD's HJD bases for each adapted module type: computed once from Gram matrices, cached on disk with a
checksum, loaded by every later run (specs/frod.md §4 Stage 1, §8.2, §8.3).

Latent rows: the HJD of layer i works on A_i = W_i (input side, d = in_features) or A_i = W_iᵀ (output side,
d = out_features), rows × d. A tensor-parallel split (``ShardSpec``) either cuts the rows of A (a column split on
the input side, a row split on the output side): each rank's Gram is a partial sum over the split's group and no
weight moves; or it cuts the latent dimension d (row/input, column/output): a Gram needs whole rows of A, so
``LatentRows`` all-gathers a layer's shards over the group each time a pass reads that layer (one m × n at a
time). Each rank reads only its own shard of the checkpoint either way.

One module type (``compute_hjd``), with the kernels of ops/hjd.py, streamed: memory is one layer's Gram and
weight (fp64) plus a few d × d, never L Grams (43 GB per type at d = 8192, L = 80). Three passes over the layers
each compute G_i = AᵢᵀAᵢ (fp64) again, all-reduced over ``shard_group`` when the rows of A are split:
  1. pass 1: G = Σ_i G_i and L, summed over ``layer_group`` (ranks holding different layers, e.g. stages);
  2. R = chol(G)ᵀ, or a streamed TSQR of the weight blocks when the Gram is ill-conditioned (R folded one block
     at a time, then over the groups' R factors, d × d each);
  3. pass 2: M = Σ_i (G_i + πG)⁻¹ summed over ``layer_group``, divided by L;
  4. (λ, Z) = eigh(R M Rᵀ), sign-fixed;
  5. pass 3: σ_i for the local layers.
Same operations in the same order as holding all Grams: on the Cholesky route the bits are those of the
all-at-once computation. A group of None means no split (``shard_group``) or no layers elsewhere
(``layer_group``): no collective is issued for it. Every collective goes through dist_peft.parallel.collectives,
except the long wait below (a barrier on its own gloo group).

``hjd_bases`` makes every rank hold the same bits (§8.2: never rely on ranks recomputing eigenvectors
independently). Only rank 0 touches the cache folder: it broadcasts one status per type (loaded, missing, or
refused: then every rank raises, none waits) and the loaded entries. Each missing type is computed once, by one
model replica (``_replicas``: the ranks joined by the split and layer groups; one rank under DP/ZeRO), the
missing types dealt round-robin over the replicas, on the GPU when there is one (``compute_device``); the σ of
every layer are summed into one table over ``layer_group``. The other ranks wait in a barrier on a gloo group
created for it with ``WAIT_TIMEOUT`` (hours of CPU work at 70B would otherwise outlast the default group's
collective timeout); then each type's R, Z, λ and σ table are broadcast from its replica's lowest rank, every
rank keeps the σ_i of its own layers, and rank 0 saves the entries. Every rank must hold every module type
(checked once): types are processed in sorted order, so all ranks issue the same collectives in the same order.

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

import datetime
import hashlib
import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import Tensor
from tqdm import tqdm

from dist_peft.files import BadFileError, atomic_dir, cache_root, load_tensors, read_json, save_tensors, verify_dir, \
    write_json
from dist_peft.ops import hjd
from dist_peft.parallel import collectives
from dist_peft.parallel.shard import ShardSpec

_log = logging.getLogger(__name__)

FORMAT_VERSION = 2
"""2: the fingerprint is built from row digests (layout-independent); 1 hashed the bytes as one stream."""
WEIGHTS, KEY, INFO = "hjd.safetensors", "key.json", "info.json"
WAIT_TIMEOUT = datetime.timedelta(hours=24)
"""How long ranks wait for the ranks computing a missing HJD (a barrier on its own gloo group): hours on a CPU at
70B; the default group's collective timeout never sees the wait."""
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
    hold whole latent rows (read one layer at a time), split over ``shard_group``; the other layers of the type
    are on ``layer_group``."""
    digests, d, dtype = [], 0, None
    for w in weights.values():
        digests.append(row_digests(w, side))
        d, dtype = (w.shape[1] if side == "input" else w.shape[0]), w.dtype
    rows = _gather(torch.stack(digests).to(_first_local(weights).device), 1, shard_group).cpu()
    mine = [(name, hashlib.sha256(name.encode() + r.numpy().tobytes()).hexdigest()) for name, r in zip(weights, rows)]
    parts = collectives.all_gather_object(mine, layer_group) if layer_group is not None else [mine]
    layers = dict(sorted((item for part in parts for item in part), key=lambda item: _layer_order(item[0])))
    return {"format_version": FORMAT_VERSION, "module_type": module_type, "side": side,
            "regularization_alpha": pi, "dtype": str(dtype).removeprefix("torch."),
            "shape": [rows.shape[1], d] if side == "input" else [d, rows.shape[1]], "layers": list(layers),
            "fingerprint": hashlib.sha256("".join(layers.values()).encode()).hexdigest()}


def entry_dir(key: Mapping[str, Any], cache: str | Path | None) -> Path:
    """Where the entry of ``key`` lives: ``<cache>/<type>`` or, without ``cache``, a folder named by the key."""
    if cache is not None:
        return Path(cache) / key["module_type"]
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return cache_root() / "frod" / f"{key['module_type']}-{key['side']}-{digest}"


def _sum(tensors: list[Tensor], group: Any) -> None:
    if group is not None:
        collectives.all_reduce_coalesced(tensors, group)


def _gather(t: Tensor, dim: int, group: Any) -> Tensor:
    return collectives.all_gather_cat(t, dim, group) if group is not None else t


class LatentRows(Mapping[str, Tensor]):
    """The layers' weights with whole latent rows, read one layer at a time: the local weight, or, when the
    latent dimension is split (``group``), the shards all-gathered over the split's group on each read (a
    collective: every rank of the group reads the same layers in the same order). Never all layers at once; a
    ZeRO-3 partitioned weight is gathered whole for each read (``_whole``)."""

    def __init__(self, local: Mapping[str, Tensor], dim: int = 0, group: Any = None):
        self.local, self.dim, self.group = dict(local), dim, group

    def __getitem__(self, name: str) -> Tensor:
        return _gather(_whole(self.local[name]), self.dim, self.group)

    def __iter__(self):
        return iter(self.local)

    def __len__(self) -> int:
        return len(self.local)


def _whole(w: Tensor) -> Tensor:
    """``w``, or the whole value of a weight that ZeRO-3 partitions (``models.load_partitioned``), gathered for this
    read only through the partitioned tensor's own all-gather (a collective over the data ranks; this layer imports
    no engine)."""
    if getattr(w, "ds_status", None) is None or w.ds_status.name != "NOT_AVAILABLE":
        return w
    w.all_gather()
    try:
        return w.detach().clone()
    finally:
        w.partition(has_been_updated=False)


def _first_local(weights: Mapping[str, Tensor]) -> Tensor:
    """A local tensor of ``weights`` (no gather): its device and dtype are the run's."""
    return next(iter((weights.local if isinstance(weights, LatentRows) else weights).values()))


def whole_latent(weights: Mapping[str, Tensor], side: str, spec: ShardSpec | None) -> tuple[LatentRows, Any]:
    """(the weights with the whole latent dimension, the group their latent rows are split over or None), from
    the local shards and their split (module docstring): rows of A split → the shards and the split's group; the
    latent dimension split → the shards, all-gathered over the group one layer at a time when read, and None."""
    if spec is None or spec.weight_dim is None:
        return LatentRows(weights), None
    if spec.size > 1 and (spec.group is None or collectives.group_rank(spec.group) != spec.rank):
        raise ValueError(f"the HJD of a {spec.kind.value}-split module type needs the split's process group, with "
                         f"shard k on group rank k (got group {spec.group!r}, rank {spec.rank}); a virtual shard "
                         "has none: give the whole weights")
    latent_dim = 1 if side == "input" else 0
    if spec.weight_dim != latent_dim:
        return LatentRows(weights), spec.group
    return LatentRows(weights, latent_dim, spec.group), None


def compute_device(local: Tensor) -> torch.device:
    """Where the HJD runs (fp64): the weights' accelerator, else the current CUDA device when there is one (the
    transformers path prepares adapters before the model moves to the GPU), else the host."""
    if local.device.type != "cpu" or not torch.cuda.is_available():
        return local.device
    return torch.device("cuda", torch.cuda.current_device())


def _fold(r: Tensor, group: Any) -> Tensor:
    """The R of the stacked R factors of the group's ranks: each factor broadcast in group-rank order and folded
    in by ``tsqr_step`` (d × d at a time), the same steps on every rank, so every rank gets the same bits."""
    out, me = None, collectives.group_rank(group)
    for k in range(collectives.group_size(group)):
        out = hjd.tsqr_step(out, collectives.broadcast(r if k == me else torch.empty_like(r), src=k, group=group))
    return out


def _tsqr(weights: Mapping[str, Tensor], side: str, shard_group: Any, layer_group: Any, device: torch.device) -> Tensor:
    r = None
    for w in weights.values():
        r = hjd.tsqr_step(r, (w if side == "input" else w.T).to(device))
    for group in (shard_group, layer_group):
        if group is not None:
            r = _fold(r, group)
    return hjd.check_full_rank(hjd.positive_rows(r))


def compute_hjd(module_type: str, side: str, weights: Mapping[str, Tensor], pi: float, shard_group: Any = None,
                layer_group: Any = None, device: torch.device | None = None) -> tuple[HjdBases, dict[str, Any]]:
    """Steps 1–6 above for one module type, streamed: three passes over the layers (G; M; σ), each computing
    G_i from W_i again on ``device`` (default ``compute_device``), so at most one layer's Gram and weight (fp64)
    are held, plus a few d × d (G, R, M, the ridge inverse and its factor). Returns the bases and an info
    record (route, cond, seconds)."""
    start = time.perf_counter()
    device = device or compute_device(_first_local(weights))
    bar = tqdm(total=3 * len(weights), desc=f"HJD {module_type} ({side} side)", unit="layer", dynamic_ncols=True)

    def grams():
        """G_i of each local layer in order, summed over ``shard_group`` (one all-reduce per layer)."""
        for w in weights.values():
            g = hjd.latent_gram(w.to(device), side)
            _sum([g], shard_group)
            bar.update()
            yield g

    total = None
    for g in grams():
        total = torch.zeros_like(g) if total is None else total
        total += g
    count = torch.tensor([float(len(weights))], dtype=torch.float64, device=device)
    _sum([total, count], layer_group)
    r, route = hjd.cholesky_r(total), "cholesky"
    if r is None:
        try:
            r, route = _tsqr(weights, side, shard_group, layer_group, device), "tsqr"
        except hjd.RankDeficientError as e:
            other = "output" if side == "input" else "input"
            raise hjd.RankDeficientError(f"HJD of {module_type} ({side} side, d={total.shape[0]}, {int(count.item())} "
                                         f"layers): {e}; leave {module_type} out of target_modules or adapt it "
                                         f"on the {other} side (output_side_modules)") from None
    mean_inverse = torch.zeros_like(total)
    for g in grams():
        mean_inverse += hjd.inverse_ridge(g, total, pi)
    _sum([mean_inverse], layer_group)
    lam, z = hjd.joint_eigenbasis(r, mean_inverse / count)
    del mean_inverse, total
    b = hjd.inverse_transpose_basis(r, z)
    sigma = {name: hjd.strengths(g, b) for name, g in zip(weights, grams())}
    bar.close()
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
    if not isinstance(found, dict):
        raise BadFileError(f"{folder / KEY}: expected a JSON object")
    diffs = [f"{k} {_short(found.get(k))} in the cache, {_short(v)} in this run" for k, v in key.items()
             if found.get(k) != v]
    if diffs:
        raise BadFileError(f"{folder}: HJD cache built for other settings or weights ({'; '.join(diffs)}); "
                           "delete the folder or point method.hjd_cache elsewhere")
    t = load_tensors(folder / WEIGHTS)
    for name, shape in _entry_shapes(key).items():
        if name not in t or tuple(t[name].shape) != shape or not t[name].is_floating_point() \
                or not torch.isfinite(t[name]).all():
            raise BadFileError(f"{folder / WEIGHTS}: {name} is missing, not finite floats, or not of shape {shape}")
    return [t[name] for name in ENTRY]


def _load_entries(keys: Mapping[str, Mapping[str, Any]], folders: Mapping[str, Path],
                  device: torch.device) -> dict[str, list[Tensor] | None]:
    """The entry of each type that rank 0 found in the cache, on every rank (None: to compute). Rank 0 broadcasts
    one status per type (0: compute, 1: loaded, 2: refused; then every rank raises, none waits), then the
    loaded tensors."""
    types, rank0 = list(keys), collectives.group_rank() == 0
    status = torch.zeros(len(types), dtype=torch.int64, device=device)
    found: dict[str, list[Tensor]] = {}
    for i, module_type in enumerate(types):
        if rank0 and folders[module_type].exists():
            try:
                found[module_type] = load_hjd(folders[module_type], keys[module_type])
            except Exception:
                status[i] = 2
                collectives.broadcast(status)
                raise
            status[i] = 1
            _log.info(f"HJD {module_type}: loaded from {folders[module_type]} (checksum and key verified; not "
                      "recomputed)")
    codes = collectives.broadcast(status).tolist()
    if 2 in codes:
        bad = types[codes.index(2)]
        raise BadFileError(f"HJD {bad}: rank 0 refused the cache entry {folders[bad]} (its error says why)")
    out: dict[str, list[Tensor] | None] = {}
    for module_type, code in zip(types, codes):
        shapes = _entry_shapes(keys[module_type]).values()
        tensors = found.get(module_type) or [torch.empty(shape, dtype=torch.float64) for shape in shapes]
        out[module_type] = [collectives.broadcast(t.to(device), src=0) for t in tensors] if code == 1 else None
    return out


def _replicas(groups: Sequence[Any]) -> tuple[int, list[int]]:
    """(this rank's replica, the lowest global rank of every replica, ascending). A replica is a set of ranks
    joined by the groups the HJD communicates over (tensor splits, the pipeline group): together they hold every
    layer once, and the data-parallel copies of it are the other replicas. Without groups every rank is one."""
    world, me = collectives.group_size(), collectives.group_rank()
    if world == 1:
        return 0, [0]
    mine = sorted({me} | {r for g in groups if g is not None for r in dist.get_process_group_ranks(g)})
    leader = list(range(world))  # union-find over ranks; the root of a set is its lowest rank

    def find(x: int) -> int:
        while leader[x] != x:
            x = leader[x]
        return x

    for ranks in collectives.all_gather_object(mine):
        for r in ranks:
            a, b = find(ranks[0]), find(r)
            leader[max(a, b)] = min(a, b)
    leaders = sorted({find(r) for r in range(world)})
    return leaders.index(find(me)), leaders


def _wait_group() -> Any:
    """A gloo group over the world whose collectives wait up to ``WAIT_TIMEOUT``: created while every rank is
    present, so the ranks that compute nothing wait in its barrier, outside the default group's timeout."""
    return dist.new_group(backend="gloo", timeout=WAIT_TIMEOUT) if collectives.group_size() > 1 else None


def _compute_missing(missing: Sequence[str], rows: Mapping[str, tuple[LatentRows, Any]], sides: Mapping[str, str],
                     keys: Mapping[str, Mapping[str, Any]], folders: Mapping[str, Path], pi: float,
                     groups: Sequence[Any], layer_group: Any, device: torch.device) -> dict[str, list[Tensor]]:
    """Each missing type computed by one replica (types dealt round-robin over the replicas, on ``device``),
    the others waiting in a long barrier; then the type's tensors broadcast from its replica's lowest rank to
    every rank, and saved by rank 0 (module docstring)."""
    replica, leaders = _replicas(groups)
    owner = {module_type: leaders[i % len(leaders)] for i, module_type in enumerate(missing)}
    rank0 = collectives.group_rank() == 0
    wait = _wait_group()
    done: dict[str, list[Tensor]] = {}
    infos: dict[str, dict[str, Any]] = {}
    try:
        for module_type in missing:
            key = keys[module_type]
            if rank0:
                _log.info(f"HJD {module_type}: no cache entry at {folders[module_type]}; computing from "
                          f"{len(key['layers'])} layers (rank {owner[module_type]})")
            if owner[module_type] != leaders[replica]:
                continue
            weights, shard_group = rows[module_type]
            bases, infos[module_type] = compute_hjd(module_type, sides[module_type], weights, pi, shard_group,
                                                    layer_group, device)
            table = torch.zeros(_entry_shapes(key)["sigma"], dtype=torch.float64, device=device)
            for name, sigma in bases.sigma.items():
                table[key["layers"].index(name)] = sigma
            _sum([table], layer_group)  # each layer group holds every layer once
            done[module_type] = [bases.r, bases.z, bases.eigenvalues, table]
        if wait is not None:
            dist.barrier(group=wait)
    finally:
        if wait is not None:
            dist.destroy_process_group(wait)
    for part in collectives.all_gather_object(infos):
        infos.update(part)
    for module_type in missing:
        shapes = _entry_shapes(keys[module_type]).values()
        tensors = done.get(module_type) or [torch.empty(shape, dtype=torch.float64, device=device) for shape in shapes]
        # contiguous: a backend sends a tensor's storage in memory order (R = Lᵀ and eigh's Z are transposed views)
        done[module_type] = [collectives.broadcast(t.contiguous(), src=owner[module_type]) for t in tensors]
        if rank0:
            info = infos[module_type]
            save_hjd(folders[module_type], keys[module_type], [t.cpu() for t in done[module_type]], info)
            _log.info(f"HJD {module_type}: {info['route']} route, {info['seconds']} s; saved to {folders[module_type]}")
    return done


def hjd_bases(weights_by_type: Mapping[str, Mapping[str, Tensor]], sides: Mapping[str, str], pi: float,
              cache: str | Path | None = None, specs: Mapping[str, ShardSpec | None] | None = None,
              layer_group: Any = None) -> dict[str, HjdBases]:
    """The bases of every module type, the same bits on every rank, σ_i for the local layers: loaded from the
    type's cache entry when one exists (and verifies), otherwise computed once, saved by rank 0 (module
    docstring). ``weights_by_type``: the local shards by site name; ``specs``: the split of each type (absent
    or None: whole); ``layer_group``: the ranks holding the type's other layers (None: this process holds every
    layer). Rank 0 prints one line per type saying which."""
    types = sorted(weights_by_type)
    if any(other != types for other in collectives.all_gather_object(types)):
        raise ValueError(f"every rank must hold layers of the same adapted module types (this rank: {types})")
    if not types:
        return {}
    specs = specs or {}
    rows = {t: whole_latent(weights_by_type[t], sides[t], specs.get(t)) for t in types}
    keys = {t: cache_key(t, sides[t], rows[t][0], pi, rows[t][1], layer_group) for t in types}
    folders = {t: entry_dir(keys[t], cache) for t in types}
    local = _first_local(weights_by_type[types[0]])
    device = compute_device(local)
    entries = _load_entries(keys, folders, device)
    missing = [t for t in types if entries[t] is None]
    if missing:
        groups = [spec.group for spec in specs.values() if spec is not None and spec.weight_dim is not None
                  and spec.size > 1] + [layer_group]
        entries.update(_compute_missing(missing, rows, sides, keys, folders, pi, groups, layer_group, device))
    out = {}
    for t in types:
        r, z, lam, table = (e.to(local.device) for e in entries[t])
        out[t] = HjdBases(t, sides[t], r, z, lam,
                          {name: table[keys[t]["layers"].index(name)] for name in weights_by_type[t]})
    return out
