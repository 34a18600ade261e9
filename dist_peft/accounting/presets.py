"""Model presets: the Hugging Face ``config.json`` fields (no weights) of the 12B–70B models the project targets,
in ``configs/models/<name>.json``. A run config names one as ``model: {preset: llama-3.1-70b, source: DIR}``:
``dist-peft plan`` sizes the run from the preset alone, and ``train`` (or ``plan``, where DIR exists) checks that
the weights folder's ``config.json`` has the preset's shape before any weight is read.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from dist_peft.accounting.shape import ModelShape

PRESET_DIR = Path(__file__).resolve().parents[2] / "configs" / "models"

FUNCTION_KEYS = ("hidden_act", "rope_theta", "rope_scaling", "rms_norm_eps")
"""Fields beside the shapes (``ModelShape``) that change the model's function; a folder may differ in the
others (token ids, max positions, dtype)."""


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def load_preset(name: str) -> dict[str, Any]:
    """The config.json fields of preset ``name`` (a name in configs/models, or a path to a JSON file)."""
    path = Path(name) if name.endswith(".json") else PRESET_DIR / f"{name}.json"
    if not path.is_file():
        raise ValueError(f"unknown model preset {name!r}; known presets: {', '.join(preset_names())}")
    return json.loads(path.read_text())


def check_folder(name: str, folder: str | Path) -> None:
    """Raise ValueError naming every shape field in which ``folder/config.json`` differs from preset ``name``."""
    preset = load_preset(name)
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ValueError(f"{folder}: no config.json to check against preset {name!r}")
    found = json.loads(path.read_text())
    want, got = asdict(ModelShape.from_hf(preset)), asdict(ModelShape.from_hf(found))
    diffs = [f"{k}: preset {want[k]!r}, folder {got[k]!r}" for k in want if want[k] != got[k]]
    diffs += [f"{k}: preset {preset.get(k)!r}, folder {found.get(k)!r}" for k in FUNCTION_KEYS
              if preset.get(k) != found.get(k)]
    if diffs:
        raise ValueError(f"{folder} does not hold preset {name!r}: {'; '.join(diffs)}")
