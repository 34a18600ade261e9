"""Hostile or broken input (issue 14): configs, adapter files, checkpoints and datasets from elsewhere give a valid
load or one clear error (ConfigError / BadFileError), never another exception or a hang; nothing in the package
unpickles; names read from manifests stay inside their folder.

The property tests mutate valid files with ``hypothesis`` (seeded: ``derandomize``, a bounded number of examples,
no deadline; all of them together well under a minute on one core)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings, strategies as st
from safetensors.torch import load_file, save_file

from conftest import tiny_config
from dist_peft.files import BadFileError, MANIFEST, sha256, verify_dir, write_json
from dist_peft.parallel.collectives import _decode, _encode
from dist_peft.train import checkpoint as ckpt
from dist_peft.train.config import ConfigError, RunConfig, load_config
from dist_peft.train.loop import Trainer

PACKAGE = Path(__file__).resolve().parent.parent / "dist_peft"
FUZZ = settings(max_examples=100, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))
UNSAFE = {  # what would let a file, or a peer, run code in this process
    "pickle": re.compile(r"\bimport pickle\b|\bpickle\.|\bcPickle\b|\bdill\b|\bjoblib\.load\b|\bmarshal\.loads?\b"),
    "torch.load without weights_only=True": re.compile(r"torch\.load\((?!.*weights_only\s*=\s*True)"),
    "numpy allow_pickle": re.compile(r"allow_pickle\s*=\s*True"),
    "unsafe YAML": re.compile(r"yaml\.(unsafe_load|full_load|load_all)\("
                              r"|yaml\.load\((?!.*Loader=(_NoAliasLoader|yaml\.C?SafeLoader)\b)"
                              r"|yaml\.(Unsafe|Full)?Loader\b(?<!SafeLoader)"),
    "object collectives (pickled)": re.compile(r"\bdist\.(all_gather_object|gather_object|broadcast_object_list|"
                                               r"scatter_object_list|send_object_list|recv_object_list)\("),
    "remote code": re.compile(r"trust_remote_code\s*=\s*True"),
}


def test_nothing_in_the_package_unpickles_or_loads_unsafely():
    """No pickle (nor dill/joblib/marshal), no torch.load without weights_only=True, no numpy allow_pickle, no
    YAML loader that builds objects, no torch.distributed object collective (they pickle), no remote code."""
    found = [f"{path.relative_to(PACKAGE.parent)}:{n}: {what}: {line.strip()}"
             for path in sorted(PACKAGE.rglob("*.py")) for n, line in enumerate(path.read_text().splitlines(), 1)
             for what, pattern in UNSAFE.items() if pattern.search(line)]
    assert not found, "\n".join(found)
    torch_load = UNSAFE["torch.load without weights_only=True"]
    assert UNSAFE["pickle"].search("import pickle") and torch_load.search("torch.load(f)")
    assert not torch_load.search("torch.load(f, weights_only=True)")


def test_object_gather_encoding_round_trips_plain_values_and_tensors_without_pickle():
    """all_gather_object's wire format keeps types (tuples, non-string keys, NaN, tensors of any dtype) and refuses
    objects that only pickle could send."""
    obj = {"a": [1, 2.5, None, True, float("inf")], ("k", 1): (torch.arange(3.0), "s"),
           3: {"t": torch.ones(2, 2, dtype=torch.bfloat16)}}
    back = _decode(_encode(obj))
    assert back.keys() == obj.keys() and back["a"] == obj["a"] and isinstance(back[("k", 1)], tuple)
    assert torch.equal(back[("k", 1)][0], obj[("k", 1)][0]) and back[3]["t"].dtype == torch.bfloat16
    with pytest.raises(TypeError, match="no pickle"):
        _encode({"x": object()})


def test_manifest_names_cannot_reach_outside_their_folder(tmp_path):
    """A manifest naming ../x, an absolute path, a sub-path or a link is refused before any file is read."""
    outside = tmp_path / "secret"
    outside.write_text("x")
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "link").symlink_to(outside)
    for name in ("../secret", str(outside), "sub/secret", "..", "link"):
        write_json(folder / MANIFEST, {name: sha256(outside)})
        with pytest.raises(BadFileError):
            verify_dir(folder)
    write_json(folder / MANIFEST, ["not", "a", "mapping"])
    with pytest.raises(BadFileError, match="mapping"):
        verify_dir(folder)


# ---- datasets ---------------------------------------------------------------------------------------------------

def _data_cfg(tmp_path, path, **data):
    from dist_peft.train.config import DataConfig

    return DataConfig(**{"source": "files", "path": str(path), "eval_examples": 1, "seq_len": 16, **data})


def _build(cfg, tmp_path):
    from dist_peft.train.data import build_data
    from dist_peft.train.models import byte_tokenizer

    said = []
    train, _, _ = build_data(cfg, byte_tokenizer(), 260, tmp_path / "cache", said.append)
    return train, " ".join(said)


def test_dataset_rows_that_cannot_be_used_are_skipped_and_counted(tmp_path, monkeypatch):
    """Empty, non-text, over-long and label-less rows are skipped with a count in the data line; the usable rows
    train. Classification: a label that is not an integer >= 0 (or missing) skips its row."""
    import dist_peft.train.data as data

    monkeypatch.setattr(data, "MAX_FIELD_CHARS", 50)
    rows = [{"text": "good text number one"}, {"text": ""}, {"text": "   "}, {"text": None}, {"text": 7},
            {"text": "x" * 51}, {"other": "no text"}, {"text": "good text number two"}, {"text": "three is good"}]
    path = tmp_path / "lm.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    _, said = _build(_data_cfg(tmp_path, path, seq_len=8), tmp_path)
    assert "6 rows skipped" in said, said
    rows = [{"text": "a", "label": 1}, {"text": "b", "label": None}, {"text": "c", "label": -1},
            {"text": "e", "label": 1.5}, {"text": "f"}, {"text": "g", "label": 0}, {"text": "h", "label": 2.0}]
    path = tmp_path / "cls.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    train, said = _build(_data_cfg(tmp_path, path, format="classification"), tmp_path)
    assert "4 rows skipped" in said and len(train) == 2 and set(train["labels"]) < {0, 1, 2}, said
    path.write_text("\n".join(json.dumps({"text": "t", "label": label}) for label in ("1", "b", None)) + "\n")
    with pytest.raises(ConfigError, match="no training examples left"):
        _build(_data_cfg(tmp_path, path, format="classification"), tmp_path)


def test_unreadable_or_mismatched_dataset_files_are_one_clear_error(tmp_path):
    """Non-UTF-8 bytes, malformed JSON and a missing text column each end in one error naming the file or key."""
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9 \xff"}\n')
    with pytest.raises(BadFileError, match="bad.jsonl"):
        _build(_data_cfg(tmp_path, bad), tmp_path)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "fine"}\nnot json at all\n')
    with pytest.raises(BadFileError, match="broken.jsonl"):
        _build(_data_cfg(tmp_path, broken), tmp_path)
    other = tmp_path / "other.jsonl"
    other.write_text('{"body": "no text column"}\n' * 3)
    with pytest.raises(ConfigError, match=r"data.text_field: no column 'text'"):
        _build(_data_cfg(tmp_path, other), tmp_path)


# ---- property tests: mutated configs, adapter files and checkpoints ----------------------------------------------

SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12))
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6),
                                                                                           inner, max_size=3),
                      max_leaves=6)


def _paths(tree, prefix=()):
    """Every path to a value in a nest of dicts and lists."""
    yield prefix
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else ()
    for k, v in items:
        yield from _paths(v, prefix + (k,))


@st.composite
def mutated(draw, tree):
    """``tree`` with one to three edits: a value replaced, a key deleted, or an unknown key added."""
    tree = json.loads(json.dumps(tree))
    for _ in range(draw(st.integers(1, 3))):
        paths = list(_paths(tree))
        path = draw(st.sampled_from(paths))
        if not path:
            continue
        parent = tree
        for k in path[:-1]:
            parent = parent[k]
        action = draw(st.sampled_from(["replace", "delete", "add"]))
        if action == "replace":
            parent[path[-1]] = draw(VALUES)
        elif action == "delete" and isinstance(parent, dict):
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[draw(st.text(min_size=1, max_size=8))] = draw(VALUES)
    return tree


CONFIGS = sorted(p for p in (PACKAGE.parent / "configs").glob("*.yaml") if "compare" not in p.name)


@FUZZ
@given(data=st.data())
def test_mutated_configs_load_or_raise_one_config_error(tmp_path_factory, data):
    """Any mutation of a shipped config's keys and values, or of its text, loads or raises ConfigError."""
    source = data.draw(st.sampled_from(CONFIGS))
    path = tmp_path_factory.mktemp("cfg") / "run.yaml"
    if data.draw(st.booleans()):
        raw = data.draw(mutated(yaml.safe_load(source.read_text())))
        path.write_text(yaml.safe_dump(raw, allow_unicode=True))
    else:
        text = bytearray(source.read_bytes())
        for _ in range(data.draw(st.integers(1, 4))):
            at = data.draw(st.integers(0, len(text)))
            text[at:at + data.draw(st.integers(0, 4))] = data.draw(st.binary(max_size=4))
        path.write_bytes(bytes(text))
    try:
        assert isinstance(load_config(path), RunConfig)
    except ConfigError:
        pass


def test_config_aliases_non_utf8_and_oversized_files_are_config_errors(tmp_path):
    """A YAML alias bomb, non-UTF-8 bytes and a file over the size bound are refused with ConfigError."""
    bomb = "a: &a [x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n" for p, c in zip("abcdefgh", "bcdefghi"))
    for name, content in (("bomb.yaml", bomb.encode()), ("latin.yaml", b"model: {source: caf\xe9}\n"),
                          ("big.yaml", b"#" * (1 << 20) + b"\n")):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ConfigError):
            load_config(tmp_path / name)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A one-step tiny LoRA run: its adapter folder and checkpoint, and the live objects to load them into."""
    root = tmp_path_factory.mktemp("trained")
    trainer = Trainer(tiny_config(root, train={"steps": 1}), echo=lambda m: None)
    trainer.run()
    return trainer, root / "adapter", ckpt.latest_checkpoint(root)


TENSOR_EDITS = ["flip", "truncate", "nan", "inf", "reshape", "dtype", "drop", "extra", "huge_header"]


def _mutate_tensors(path: Path, data) -> None:
    edit = data.draw(st.sampled_from(TENSOR_EDITS))
    raw = bytearray(path.read_bytes())
    if edit in ("flip", "truncate", "huge_header"):
        if edit == "flip":
            at = data.draw(st.integers(0, len(raw) - 1))
            raw[at] ^= data.draw(st.integers(1, 255))
        elif edit == "truncate":
            raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
        else:
            raw[:8] = (2 ** 62).to_bytes(8, "little")
        path.write_bytes(bytes(raw))
        return
    tensors = load_file(str(path))
    key = data.draw(st.sampled_from(sorted(tensors)))
    t = tensors[key]
    if edit in ("nan", "inf") and t.is_floating_point() and t.numel():
        t = t.clone()
        t.view(-1)[data.draw(st.integers(0, t.numel() - 1))] = float(edit)
    elif edit == "reshape":
        t = t.reshape(-1)[: max(0, t.numel() - 1)].clone()
    elif edit == "dtype":
        t = t.to(data.draw(st.sampled_from([torch.int64, torch.float16, torch.bool, torch.uint8])))
    if edit == "drop":
        del tensors[key]
    else:
        tensors[key if edit != "extra" else key + ".extra"] = t.clone()
    save_file(tensors, str(path))


def _remanifest(folder: Path) -> None:
    """A consistent folder from a hostile source: the manifest re-written to match the mutated files."""
    if (folder / MANIFEST).is_file():
        write_json(folder / MANIFEST, {p.name: sha256(p) for p in sorted(folder.iterdir())
                                       if p.is_file() and p.name != MANIFEST})


@FUZZ
@given(data=st.data())
def test_mutated_adapter_files_load_or_raise_one_bad_file_error(trained, tmp_path_factory, data):
    """Mutated adapter_model.safetensors (bytes, shapes, dtypes, NaN/inf, keys) or adapter config JSON, with the
    manifest kept consistent or not: load_adapter loads or raises BadFileError, and never leaves a non-finite weight."""
    from dist_peft.integrations.transformers import load_adapter

    trainer, adapter, _ = trained
    folder = tmp_path_factory.mktemp("adapter") / "a"
    shutil.copytree(adapter, folder)
    target = data.draw(st.sampled_from(sorted(p.name for p in folder.iterdir() if p.name != MANIFEST)))
    if target.endswith(".safetensors"):
        _mutate_tensors(folder / target, data)
    else:
        (folder / target).write_text(json.dumps(data.draw(mutated(json.loads((folder / target).read_text())))))
    if data.draw(st.booleans()):
        _remanifest(folder)
    try:
        load_adapter(trainer.model, folder)
    except BadFileError:
        pass
    assert all(torch.isfinite(p).all() for p in trainer.params.values())


@FUZZ
@given(data=st.data())
def test_mutated_checkpoints_load_or_raise_one_bad_file_error(trained, tmp_path_factory, data):
    """Mutated state.safetensors or state.json of a checkpoint (manifest re-written to match, or not): reading and
    restoring it into the live run succeeds or raises BadFileError; the optimizer then still steps."""
    trainer, _, checkpoint = trained
    folder = tmp_path_factory.mktemp("ckpt") / checkpoint.name
    shutil.copytree(checkpoint, folder)
    if data.draw(st.booleans()):
        _mutate_tensors(folder / "state.safetensors", data)
    else:
        meta = json.loads((folder / "state.json").read_text())
        (folder / "state.json").write_text(json.dumps(data.draw(mutated(meta)), allow_nan=True))
    if data.draw(st.booleans()):
        _remanifest(folder)
    try:
        ckpt.restore(ckpt.load_checkpoint(folder), trainer.params, trainer.optimizer, trainer.controller)
    except BadFileError:
        return
    trainer.train_step()


def test_classification_labels_past_the_head_are_one_config_error(tmp_path):
    """A label >= model.num_labels is refused when the data is built, not as an index error mid-step."""
    from dist_peft.train.config import from_dict

    path = tmp_path / "cls.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"row {i}", "label": i % 4}) for i in range(12)) + "\n")
    raw = tiny_config(tmp_path / "run").to_dict()
    raw["model"] = {**raw["model"], "task": "classification", "num_labels": 3, "trainable_modules": ["score"]}
    raw["data"] = {**raw["data"], "source": "files", "path": str(path), "format": "classification", "eval_examples": 2}
    with pytest.raises(ConfigError, match="model.num_labels: 3 classes, but the data has label 3"):
        Trainer(from_dict(raw), echo=lambda m: None)
