"""Resumable checkpoints: trainable tensors, optimizer state, RNG states, data position and method state.

A checkpoint is a folder ``checkpoints/step_NNNNNNN`` written through ``files.atomic_dir`` (temporary folder,
fsync, rename, SHA-256 manifest): ``state.safetensors`` holds every tensor and ``state.json`` everything else,
including the run config. The megatron-core engine writes one such folder per rank (its shards, its RNG) inside
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

FORMAT_VERSION = 1
PARTS = "parts.json"


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    step: int
    data_position: int
    config: dict[str, Any]
    meta: dict[str, Any]
    tensors: dict[str, Tensor]


def _rng_states() -> dict[str, Tensor]:
    states = {"rng/cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        states |= {f"rng/cuda/{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())}
    return states


def save_checkpoint(folder: Path, *, step: int, data_position: int, config: dict[str, Any],
                    params: dict[str, Tensor], optimizer: torch.optim.Optimizer, controller: Controller) -> Path:
    opt = optimizer.state_dict()
    tensors = {f"param/{n}": p for n, p in params.items()} | _rng_states()
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
    from dist_peft.parallel import collectives

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
    torch.set_rng_state(t["rng/cpu"])
    if torch.cuda.is_available():
        torch.cuda.set_rng_state_all([t[f"rng/cuda/{i}"] for i in range(torch.cuda.device_count())])


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:07d}"


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run (incomplete ones never get their final name)."""
    found = sorted((Path(run_dir) / "checkpoints").glob("step_*"))
    return found[-1] if found else None


def prune(run_dir: Path, keep: int) -> None:
    for old in sorted((run_dir / "checkpoints").glob("step_*"))[:-keep]:
        shutil.rmtree(old)
