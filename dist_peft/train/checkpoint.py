"""Resumable checkpoints: trainable tensors, optimizer state, RNG states, data position and method state.

A checkpoint is a folder ``checkpoints/step_NNNNNNN`` written through ``files.atomic_dir`` (temporary folder,
fsync, rename, SHA-256 manifest): ``state.safetensors`` holds every tensor and ``state.json`` everything else,
including the run config. RNG states are per rank (``rng/<rank>/cpu``, ``rng/<rank>/cuda``: the CPU generator and the
rank's current CUDA device's), gathered to the writer (``gathered_rng_states``) and restored by each rank from its
own entry (``restore``). The megatron-core engine writes one such folder per rank (its shards, its RNG) inside
the step's folder, named in ``parts.json`` (``save_parts``); it resumes only under the layout that wrote it. Nothing is pickled, so a checkpoint from an untrusted source cannot run code; a
truncated or altered one fails its checksum before any state is touched.

Faults (issue 14): a write that fails on any rank (no space, no permission) is one ``StorageError`` naming the path
and the cause on every rank at once (``written_together``: a flag all-reduce, no rank left waiting), and the
previous checkpoint stays as it was; a process killed mid-write leaves only temporary folders, which the next
start removes (``agreed_resume``). ``train.resume: auto`` continues from the newest checkpoint whose manifest
verifies (``newest_verified``), skipping newer incomplete or corrupt ones with a warning that names them; rank 0
decides and broadcasts, so every rank resumes from the same step. ``prune`` never deletes the checkpoint just
written (verified as it was written).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import Tensor

from dist_peft.files import BadFileError, StorageError, atomic_dir, load_tensors, plain_name, read_json, \
    remove_stale, save_tensors, verify_dir, write_json
from dist_peft.methods.base import Controller
from dist_peft.parallel import collectives
from dist_peft.train import faults

FORMAT_VERSION = 3
"""3: ``skipped_steps``, the non-finite steps skipped so far (issue 14); 2: RNG states per rank (1 held the writer's
states of every CUDA device)."""
PARTS = "parts.json"
META_TYPES = {"step": int, "data_position": int, "skipped_steps": int, "config": dict, "param_names": list,
              "param_groups": list, "optim_scalars": dict}
"""The fields of ``state.json`` and their types, checked when a checkpoint is read."""


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    step: int
    data_position: int
    config: dict[str, Any]
    meta: dict[str, Any]
    tensors: dict[str, Tensor]


def local_rng_states() -> dict[str, Tensor]:
    """This rank's generators: the CPU's and, with CUDA, its current device's (the only one it draws from), keyed
    by its rank in the default group."""
    prefix = f"rng/{collectives.group_rank()}"
    states = {f"{prefix}/cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        states[f"{prefix}/cuda"] = torch.cuda.get_rng_state(torch.cuda.current_device())
    return states


def gathered_rng_states() -> dict[str, Tensor]:
    """Every rank's ``local_rng_states`` (a collective: one all-gather per generator, a few KB), for a checkpoint
    that one rank writes."""
    out = {}
    for key, state in local_rng_states().items():
        name = key.rsplit("/", 1)[1]
        for rank, gathered in enumerate(collectives.all_gather_cat(state[None], dim=0)):
            out[f"rng/{rank}/{name}"] = gathered
    return out


def _restore_rng(tensors: dict[str, Tensor], rank: int) -> None:
    """This rank's generators from its own entry. Decision (issue 17): a rank the checkpoint has no entry for (a
    resume on more ranks) takes rank 0's, the stream every data-parallel rank draws from the same seed; a CUDA
    state is restored into the current device only (any device count), and skipped when either side has no CUDA."""
    own = f"rng/{rank}" if f"rng/{rank}/cpu" in tensors else "rng/0"
    torch.set_rng_state(tensors[f"{own}/cpu"])
    if torch.cuda.is_available() and f"{own}/cuda" in tensors:
        torch.cuda.set_rng_state(tensors[f"{own}/cuda"], torch.cuda.current_device())


def save_checkpoint(folder: Path, *, step: int, data_position: int, skipped_steps: int, config: dict[str, Any],
                    params: dict[str, Tensor], optimizer: torch.optim.Optimizer, controller: Controller,
                    rng: dict[str, Tensor]) -> Path:
    """Write one checkpoint folder; ``rng``: ``local_rng_states`` of a part, ``gathered_rng_states`` of a whole;
    ``skipped_steps``: the trainer's count of skipped non-finite steps (``train/guards.py``)."""
    opt = optimizer.state_dict()
    tensors = {f"param/{n}": p for n, p in params.items()} | rng
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in opt["state"].items():
        for key, value in st.items():
            if isinstance(value, Tensor):
                tensors[f"optim/{idx}/{key}"] = value
            else:
                scalars.setdefault(str(idx), {})[key] = value
    tensors |= {f"method/{k}": v for k, v in controller.state_dict().items()}
    meta = {"format_version": FORMAT_VERSION, "step": step, "data_position": data_position,
            "skipped_steps": skipped_steps, "config": config,
            "param_names": list(params), "param_groups": opt["param_groups"], "optim_scalars": scalars}
    with atomic_dir(folder) as tmp:
        save_tensors(tmp / "state.safetensors", tensors)
        faults.point("ckpt-write", step, tmp)
        write_json(tmp / "state.json", json.loads(json.dumps(meta)))
    return folder


@contextlib.contextmanager
def written_together(path: Path, what: str = "checkpoint") -> Iterator[None]:
    """Run a write (on one rank or on all) and end every rank together when it failed on any: a
    ``StorageError`` naming ``path``, the failed rank and the cause (its errno's text on the other ranks). A
    collective (``collectives.failed_rank``): every rank enters it, also those that write nothing."""
    error = None
    try:
        yield
    except Exception as e:  # noqa: BLE001 — reported on every rank below
        error = e
    failed = collectives.failed_rank(error)
    if failed is None:
        return
    rank, code = failed
    rank = collectives.group_rank() if error is not None else rank  # a failed rank names its own cause
    cause = f"{type(error).__name__}: {error}" if error is not None else \
        f"[Errno {code}] {os.strerror(code)}" if code else "an error (its own message names it)"
    raise StorageError(f"{path}: writing the {what} failed on rank {rank} ({cause}); the previous {what} is left "
                       f"as it was") from error


def save_parts(folder: Path, part: str, is_main: bool, **state: Any) -> Path:
    """Every rank writes its own checkpoint ``part`` (``save_checkpoint``'s arguments) into a staging folder;
    the part names are gathered (a directory listing on a shared filesystem may lag behind other nodes), and the
    main rank moves exactly those parts into ``folder`` at once (atomically) with ``parts.json`` naming them. A
    collective: every rank calls it."""
    staging = folder.parent / f".{folder.name}.parts"
    with written_together(folder):
        save_checkpoint(staging / part, **state)
    parts = sorted(collectives.all_gather_object(part))  # after it, every part is written
    with written_together(folder):
        if is_main:
            with atomic_dir(folder) as tmp:
                for name in parts:
                    (staging / name).rename(tmp / name)
                write_json(tmp / PARTS, {"format_version": FORMAT_VERSION, "step": state["step"], "parts": parts})
            shutil.rmtree(staging)
    return folder


def load_checkpoint(folder: str | Path, part: str | None = None, world: int | None = None) -> Checkpoint:
    """Read and verify a checkpoint folder (checksums first, then format); ``part``: this rank's part of a
    checkpoint written with ``save_parts`` by ``world`` ranks (None: a whole-tensor checkpoint / any world)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise BadFileError(f"{folder}: no such checkpoint folder")
    verify_dir(folder)
    if (folder / PARTS).is_file() or part is not None:
        listing = read_json(folder / PARTS) if (folder / PARTS).is_file() else {"parts": []}
        parts = listing.get("parts") if isinstance(listing, dict) else None
        if not isinstance(parts, list):
            raise BadFileError(f"{folder / PARTS}: expected {{\"parts\": [names]}}")
        parts = [plain_name(name, folder / PARTS) for name in parts]
        if part not in parts or world is not None and len(parts) != world:
            raise BadFileError(f"{folder}: holds {'the parts ' + ', '.join(parts) if parts else 'whole tensors'}, "
                               f"this rank needs {part or 'whole tensors'} of {world or 'any number of'} parts: resume a checkpoint under the engine and "
                               f"parallel layout that wrote it (adapter files and exports work across engines)")
        folder = folder / part
        verify_dir(folder)
    meta = read_json(folder / "state.json")
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        raise BadFileError(f"{folder}: checkpoint format_version {getattr(meta, 'get', dict().get)('format_version')} "
                           f"is not {FORMAT_VERSION}")
    for key, kind in META_TYPES.items():  # what every later use of the metadata assumes
        if type(meta.get(key)) is not kind or kind is int and meta[key] < 0:
            raise BadFileError(f"{folder / 'state.json'}: {key} is {meta.get(key)!r}, expected a "
                               f"{'non-negative integer' if kind is int else kind.__name__}")
    return Checkpoint(folder, meta["step"], meta["data_position"], meta["config"], meta,
                      load_tensors(folder / "state.safetensors"))


def restore_params(ckpt: Checkpoint, params: dict[str, Tensor]) -> None:
    """Copy the checkpoint's trainable tensors into ``params`` after checking names, shapes and finiteness."""
    if ckpt.meta["param_names"] != list(params):
        raise BadFileError(f"{ckpt.path}: trainable tensors differ from this run's (another method or targets?)")
    for name, p in params.items():
        src = ckpt.tensors.get(f"param/{name}")
        if src is None or src.shape != p.shape or not src.is_floating_point() or not torch.isfinite(src).all():
            raise BadFileError(f"{ckpt.path}: param/{name} is missing, or not a finite float tensor of shape "
                               f"{tuple(p.shape)}")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(ckpt.tensors[f"param/{name}"])


def restore(ckpt: Checkpoint, params: dict[str, Tensor], optimizer: torch.optim.Optimizer,
            controller: Controller) -> None:
    """Put a checkpoint's state back into live objects; refuses a checkpoint of other trainable tensors."""
    restore_params(ckpt, params)
    t = ckpt.tensors
    optimizer.load_state_dict(_optimizer_state(ckpt, optimizer))
    method = {k[len("method/"):]: v for k, v in t.items() if k.startswith("method/")}
    if any(v.is_floating_point() and not torch.isfinite(v).all() for v in method.values()):
        raise BadFileError(f"{ckpt.path}: non-finite values in the method state")
    # Decision (issue 14): the method's and torch's own checks of what they load (keys, shapes, RNG state sizes)
    # raise ValueError / RuntimeError / KeyError; from a file from elsewhere they become one BadFileError.
    try:
        controller.load_state_dict(method)
        _restore_rng(t, collectives.group_rank())
    except (ValueError, RuntimeError, KeyError, TypeError, IndexError) as e:
        raise BadFileError(f"{ckpt.path}: method or RNG state not loadable ({type(e).__name__}: {e})") from None


def _kind(value: Any) -> Any:
    """What an optimizer option must stay through JSON: a bool, a finite number, None, a string, or a sequence of
    those (tuples come back as lists)."""
    if isinstance(value, (list, tuple)):
        return tuple(_kind(v) for v in value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return "number" if math.isfinite(value) else "non-finite"
    return type(value).__name__


def _optimizer_state(ckpt: Checkpoint, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The checkpoint's optimizer state dict, checked against the live optimizer before torch reads it (BadFileError
    otherwise): the same groups holding the same tensors, options of the same kinds, and per-tensor state that is
    finite floating point, shaped like its tensor (``step``: a scalar)."""
    live, groups = optimizer.state_dict()["param_groups"], ckpt.meta["param_groups"]
    if len(groups) != len(live) or any(
            not isinstance(g, dict) or g.keys() != ref.keys() or g["params"] != ref["params"]
            or any(_kind(g[k]) != _kind(ref[k]) for k in ref) for g, ref in zip(groups, live)):
        raise BadFileError(f"{ckpt.path}: optimizer groups or options differ from this run's")
    shape_of = {i: p.shape for group, ref in zip(optimizer.param_groups, live)
                for p, i in zip(group["params"], ref["params"])}
    state: dict[int, dict[str, Any]] = {}
    for key, value in ckpt.tensors.items():
        if key.startswith("optim/"):
            _, idx, name = (key.split("/", 2) + ["", ""])[:3]
            shape = shape_of.get(int(idx)) if idx.isdigit() else None
            if shape is None or value.shape != (() if name == "step" else shape) or not value.is_floating_point() \
                    or not torch.isfinite(value).all():
                raise BadFileError(f"{ckpt.path}: {key} is not the finite state of a tensor of this run's optimizer")
            state.setdefault(int(idx), {})[name] = value
    scalars = ckpt.meta["optim_scalars"]
    for idx, entries in scalars.items():
        if not idx.isdigit() or int(idx) not in shape_of or not isinstance(entries, dict) or not all(
                type(v) in (int, float) and math.isfinite(v) for v in entries.values()):
            raise BadFileError(f"{ckpt.path}: optim_scalars[{idx!r}] is not finite numbers of a tensor of this run")
        state.setdefault(int(idx), {}).update(entries)
    # every tensor's state holds the same entries (torch's Adam reads all of them): a partial one is refused
    adam = isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW))
    required = {"step", "exp_avg", "exp_avg_sq"} if adam else set()
    if len({frozenset(st) for st in state.values()}) > 1 or any(not required <= set(st) for st in state.values()):
        raise BadFileError(f"{ckpt.path}: the optimizer state of some tensors is incomplete")
    return {"state": state, "param_groups": groups}


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:07d}"


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest checkpoint folder of a run (unverified: see ``newest_verified``; an interrupted write never
    gets its final name)."""
    found = sorted((Path(run_dir) / "checkpoints").glob("step_*"))
    return found[-1] if found else None


def verify_checkpoint(folder: Path) -> None:
    """Check a checkpoint's manifest and, for one written in parts, every part's (``BadFileError`` if not)."""
    verify_dir(folder)
    if (folder / PARTS).is_file():
        for part in read_json(folder / PARTS)["parts"]:
            if Path(part).name != part:
                raise BadFileError(f"{folder / PARTS}: part name {part!r} is not a folder name")
            verify_dir(folder / part)


def newest_verified(run_dir: str | Path, warn: Callable[[str], None]) -> Path | None:
    """The newest checkpoint of a run whose files all match their manifest; each newer one that does not is
    named in a warning (``warn``) with the reason, and skipped."""
    for folder in sorted((Path(run_dir) / "checkpoints").glob("step_*"), reverse=True):
        try:
            verify_checkpoint(folder)
            return folder
        except BadFileError as e:
            warn(f"skipping checkpoint {folder}: {e}")
    return None


def agreed_resume(run_dir: Path, choice: str | Path | None, is_main: bool,
                  warn: Callable[[str], None]) -> Path | None:
    """The checkpoint this run resumes from, the same on every rank. ``choice``: None or ``never`` — none;
    ``auto`` — the newest verified checkpoint of ``run_dir``, none if there is none; ``latest`` — the same, but
    none is an error (the CLI's bare ``--resume``); anything else — that folder (verified when loaded).

    Rank 0 alone removes the temporary folders interrupted writes left (``files.remove_stale``), lists and
    verifies, and broadcasts the step it chose (-1: none; -2: it failed, its error names why): a listing on a
    shared filesystem may lag on other nodes, so ranks never decide apart. A collective: every rank calls it,
    before any other collective of the run."""
    step, error = -1, None
    if is_main:
        try:
            for folder in (run_dir, run_dir / "checkpoints"):
                remove_stale(folder)
            for staging in (run_dir / "checkpoints").glob(".step_*.parts"):
                shutil.rmtree(staging)  # the parts of a checkpoint whose ranks were killed before it was complete
            found = newest_verified(run_dir, warn) if choice in ("auto", "latest") else None
            step = -1 if found is None else int(found.name[len("step_"):])
        except (OSError, ValueError) as e:
            step, error = -2, e
    step = int(collectives.broadcast(torch.tensor([step], dtype=torch.int64)).item())
    if error is not None:
        raise error
    if step == -2:
        raise BadFileError(f"{run_dir}/checkpoints: rank 0 could not choose a checkpoint to resume (its error names why)")
    if choice == "latest" and step == -1:
        raise BadFileError(f"--resume: no verified checkpoint under {run_dir}/checkpoints")
    if choice in ("auto", "latest"):
        return None if step == -1 else checkpoint_dir(run_dir, step)
    return None if choice in (None, "never") else Path(choice)


def rewind_metrics(path: Path, step: int, keep_eval: bool) -> None:
    """Make a run's ``metrics.jsonl`` read as one run when it starts at ``step``: keep the records of earlier
    steps and the training record of ``step`` (its eval record too when ``keep_eval``: one logged before that
    checkpoint was written), drop what a killed attempt logged after it (a skipped step's record at ``step``
    included); empty at step 0. Written atomically."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line torn by a killed writer
        trained = "loss" in record and not record.get("skipped")  # a skipped step's record came after the checkpoint
        if record["step"] < step or record["step"] == step > 0 and (trained or "eval_loss" in record and keep_eval):
            kept.append(line + "\n")
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(kept))
    tmp.replace(path)


def prune(run_dir: Path, keep: int, newest: Path) -> None:
    """Delete the checkpoints before ``newest`` (just written) but the ``keep`` - 1 last of them. ``newest`` is never
    deleted, nor a checkpoint after it (one a resumed run skipped as unverifiable: its step is written again)."""
    older = [p for p in sorted((run_dir / "checkpoints").glob("step_*")) if p.name < newest.name]
    for old in older[:max(0, len(older) - (keep - 1))]:
        shutil.rmtree(old)
