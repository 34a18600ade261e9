"""Resumable checkpoints: trainable tensors, optimizer state, RNG states, data position and method state.

A checkpoint is a folder ``checkpoints/step_NNNNNNN`` written through ``files.atomic_dir`` (temporary folder,
fsync, rename, SHA-256 manifest): ``state.safetensors`` holds every tensor and ``state.json`` everything else,
including the run config. RNG states are per rank (``rng/<rank>/cpu``, ``rng/<rank>/cuda``: the CPU generator and the
rank's current CUDA device's), gathered to the writer (``gathered_rng_states``) and restored by each rank from its
own entry (``restore``). The megatron-core engine writes one such folder per rank (its shards, its RNG) inside
the step's folder, named in ``parts.json`` (``save_parts``); it resumes only under the layout that wrote it. Nothing is pickled, so a checkpoint from an untrusted source cannot run code; a
truncated or altered one fails its checksum before any state is touched.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dist_peft.files import BadFileError, atomic_dir, load_tensors, read_json, save_tensors, verify_dir, write_json
from dist_peft.methods.base import Controller
from dist_peft.parallel import collectives

FORMAT_VERSION = 2
"""2: RNG states per rank (1 held the writer's states of every CUDA device)."""
PARTS = "parts.json"


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


def save_checkpoint(folder: Path, *, step: int, data_position: int, config: dict[str, Any],
                    params: dict[str, Tensor], optimizer: torch.optim.Optimizer, controller: Controller,
                    rng: dict[str, Tensor]) -> Path:
    """Write one checkpoint folder; ``rng``: ``local_rng_states`` of a part, ``gathered_rng_states`` of a whole."""
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
    meta = {"format_version": FORMAT_VERSION, "step": step, "data_position": data_position, "config": config,
            "param_names": list(params), "param_groups": opt["param_groups"], "optim_scalars": scalars}
    with atomic_dir(folder) as tmp:
        save_tensors(tmp / "state.safetensors", tensors)
        write_json(tmp / "state.json", json.loads(json.dumps(meta)))
    return folder


def save_parts(folder: Path, part: str, is_main: bool, **state: Any) -> Path:
    """Every rank writes its own checkpoint ``part`` (``save_checkpoint``'s arguments) into a staging folder;
    the part names are gathered (a directory listing on a shared filesystem may lag behind other nodes), and the
    main rank moves exactly those parts into ``folder`` at once (atomically) with ``parts.json`` naming them. A
    collective: every rank calls it."""
    staging = folder.parent / f".{folder.name}.parts"
    save_checkpoint(staging / part, **state)
    parts = sorted(collectives.all_gather_object(part))  # after it, every part is written
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
        parts = read_json(folder / PARTS)["parts"] if (folder / PARTS).is_file() else []
        if part not in parts or world is not None and len(parts) != world:
            raise BadFileError(f"{folder}: holds {'the parts ' + ', '.join(parts) if parts else 'whole tensors'}, "
                               f"this rank needs {part or 'whole tensors'} of {world or 'any number of'} parts: resume a checkpoint under the engine and "
                               f"parallel layout that wrote it (adapter files and exports work across engines)")
        folder = folder / part
        verify_dir(folder)
    meta = read_json(folder / "state.json")
    if meta.get("format_version") != FORMAT_VERSION:
        raise BadFileError(f"{folder}: checkpoint format_version {meta.get('format_version')} is not {FORMAT_VERSION}")
    return Checkpoint(folder, meta["step"], meta["data_position"], meta["config"], meta,
                      load_tensors(folder / "state.safetensors"))


def restore_params(ckpt: Checkpoint, params: dict[str, Tensor]) -> None:
    """Copy the checkpoint's trainable tensors into ``params`` after checking names, shapes and finiteness."""
    if ckpt.meta["param_names"] != list(params):
        raise BadFileError(f"{ckpt.path}: trainable tensors differ from this run's (another method or targets?)")
    for name, p in params.items():
        src = ckpt.tensors[f"param/{name}"]
        if src.shape != p.shape or not torch.isfinite(src).all():
            raise BadFileError(f"{ckpt.path}: param/{name} has shape {tuple(src.shape)} or non-finite values")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(ckpt.tensors[f"param/{name}"])


def restore(ckpt: Checkpoint, params: dict[str, Tensor], optimizer: torch.optim.Optimizer,
            controller: Controller) -> None:
    """Put a checkpoint's state back into live objects; refuses a checkpoint of other trainable tensors."""
    restore_params(ckpt, params)
    t = ckpt.tensors
    state: dict[int, dict[str, Any]] = {}
    for key, value in t.items():
        if key.startswith("optim/"):
            _, idx, name = key.split("/", 2)
            state.setdefault(int(idx), {})[name] = value
    for idx, scalars in ckpt.meta["optim_scalars"].items():
        state.setdefault(int(idx), {}).update(scalars)
    optimizer.load_state_dict({"state": state, "param_groups": ckpt.meta["param_groups"]})
    controller.load_state_dict({k[len("method/"):]: v for k, v in t.items() if k.startswith("method/")})
    _restore_rng(t, collectives.group_rank())


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:07d}"


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run (incomplete ones never get their final name)."""
    found = sorted((Path(run_dir) / "checkpoints").glob("step_*"))
    return found[-1] if found else None


def prune(run_dir: Path, keep: int) -> None:
    for old in sorted((run_dir / "checkpoints").glob("step_*"))[:-keep]:
        shutil.rmtree(old)
