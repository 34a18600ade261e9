"""Files written atomically and read defensively: temporary folder + fsync + rename, SHA-256 manifests,
safetensors only (never pickle), and errors that name the file."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterator

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

MANIFEST = "manifest.json"


def cache_root() -> Path:
    """Where derived files are cached (converted models, FRoD's HJD bases): $DIST_PEFT_CACHE, default
    ~/.cache/dist_peft."""
    return Path(os.environ.get("DIST_PEFT_CACHE", Path.home() / ".cache" / "dist_peft"))


class BadFileError(ValueError):
    """A file that is missing, corrupted, or not what the caller expects."""


class StorageError(RuntimeError):
    """A write that failed (no space, no permission, an I/O error): the message names the path and the cause; what
    the path held before is left as it was."""


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside ``final``; on success write a checksum manifest, fsync every file and
    rename it to ``final`` (replacing an older one), so a reader sees the old folder or the whole new one."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        files = sorted(p for p in tmp.iterdir() if p.is_file())
        write_json(tmp / MANIFEST, {p.name: sha256(p) for p in files})
        for p in files:
            _fsync(p)
        _fsync(tmp / MANIFEST)
        if final.exists():
            old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old)
        else:
            tmp.rename(final)
        _fsync(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_stale(folder: str | os.PathLike) -> list[str]:
    """Clean up after ``atomic_dir`` writes into ``folder`` that a killed process left unfinished: temporary folders
    are removed, and a previous version that was moved aside (``.NAME.old-*``) while its replacement was not yet in
    place is put back. Call it only where no write into ``folder`` can be in flight (a run's writer, at its start).
    Returns the names removed."""
    folder = Path(folder)
    removed = []
    for path in sorted(folder.glob(".*.old-*")) + sorted(folder.glob(".*.tmp-*")):
        final = folder / path.name[1:].rsplit(".", 1)[0]
        if path.name.rsplit(".", 1)[1].startswith("old-") and not final.exists():
            path.rename(final)
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path.name)
    return removed


def plain_name(name: Any, where: str | os.PathLike) -> str:
    """``name`` if it names an entry directly inside a folder (no separator, not ``.``/``..``), else BadFileError:
    a name read from a file from elsewhere never reaches outside its folder."""
    if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise BadFileError(f"{where}: {name!r} is not a file name inside its folder")
    return name


def verify_dir(folder: str | os.PathLike) -> None:
    """Check every file listed in the folder's manifest (plain names inside the folder) against its SHA-256."""
    folder = Path(folder)
    if not (folder / MANIFEST).is_file():
        raise BadFileError(f"{folder}: no {MANIFEST}; not a complete dist_peft folder")
    manifest = read_json(folder / MANIFEST)
    if not isinstance(manifest, dict) or not all(isinstance(d, str) for d in manifest.values()):
        raise BadFileError(f"{folder / MANIFEST}: expected a mapping of file names to SHA-256 digests")
    for name, digest in manifest.items():
        path = folder / plain_name(name, folder / MANIFEST)
        if path.is_symlink() or not path.is_file():
            raise BadFileError(f"{path}: listed in the manifest but missing (or a link)")
        if sha256(path) != digest:
            raise BadFileError(f"{path}: checksum mismatch (file altered or truncated)")


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


MAX_JSON_BYTES = 64 << 20
"""A JSON file larger than this (64 MiB: metadata, never data) is refused before it is read."""


def read_json(path: str | os.PathLike) -> Any:
    """The JSON value of a file (size bounded first); BadFileError for a missing, oversized or invalid one."""
    try:
        if Path(path).stat().st_size > MAX_JSON_BYTES:
            raise BadFileError(f"{path}: larger than {MAX_JSON_BYTES} bytes; not a metadata file")
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BadFileError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise BadFileError(f"{path}: not valid JSON ({type(e).__name__}: {str(e)[:200]})") from None


def save_tensors(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path), metadata=metadata)


def load_tensors(path: str | os.PathLike) -> dict[str, Tensor]:
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise BadFileError(f"{path}: file not found") from None
    except (SafetensorError, OSError) as e:
        raise BadFileError(f"{path}: not a readable safetensors file ({e})") from None
