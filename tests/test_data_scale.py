"""Data at scale (issue 12): a corpus of 10⁶ records is tokenized once into a memory-mapped Arrow cache with bounded
peak memory, a restart reuses the cache, and data-parallel ranks read disjoint slices of it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

RECORDS = 1_000_000
RSS_BOUND_MB = 256
"""Peak resident memory the load may add to the process. The corpus is ~4.5·10⁷ tokens: held as a Python list of
ints (what packing with lists did) it alone would take ~360 MB, as int64 tensors ~360 MB."""

LOAD = textwrap.dedent("""
    import json, logging, resource, sys
    from pathlib import Path
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")  # the data lines, as a run logs them
    from dist_peft.train.config import DataConfig
    from dist_peft.train.data import build_data
    from dist_peft.train.models import byte_tokenizer
    tok = byte_tokenizer()
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cfg = DataConfig(source="files", path=sys.argv[1], seq_len=128, eval_examples=32)
    train, evals, order = build_data(cfg, tok, 260, Path(sys.argv[2]))
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
    rank0 = [e["input_ids"] for e in order.micro_batch(train, 5, 4, rank=0, world=2)]
    rank1 = [e["input_ids"] for e in order.micro_batch(train, 5, 4, rank=1, world=2)]
    whole = [e["input_ids"] for e in order.micro_batch(train, 5, 8)]
    print("RESULT " + json.dumps({"rss_mb": grown, "train": len(train), "eval": len(evals[""]),
                                  "slices": rank0 + rank1 == whole and rank0 != rank1}))
""")


def _load(corpus: Path, cache: Path) -> tuple[dict, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", LOAD, str(corpus), str(cache)], capture_output=True, text=True,
                         env=env, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    (line,) = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
    return json.loads(line[len("RESULT "):]), out.stdout


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    with open(path, "w") as f:
        for i in range(RECORDS):
            f.write(json.dumps({"text": f"record {i}: the quick brown fox {i % 97} jumps"}) + "\n")
    return path


def test_million_records_bounded_memory_and_cache_reuse(corpus, tmp_path):
    cache = tmp_path / "data-cache"
    first, log = _load(corpus, cache)
    assert "data: tokenized" in log and "reusing" not in log
    assert first["rss_mb"] < RSS_BOUND_MB, f"loading grew the process by {first['rss_mb']:.0f} MB"
    assert first["train"] > 300_000 and first["eval"] == 32
    assert first["slices"], "two data-parallel ranks must read adjacent, disjoint slices of one global batch"
    again, log = _load(corpus, cache)
    assert "data: reusing the tokenized" in log and "data: tokenized" not in log
    assert {k: again[k] for k in ("train", "eval")} == {k: first[k] for k in ("train", "eval")}
    assert again["rss_mb"] < RSS_BOUND_MB


def _build_missing(path: str, cache: str):
    from dist_peft.train.config import DataConfig
    from dist_peft.train.data import build_data
    from dist_peft.train.models import byte_tokenizer

    try:
        build_data(DataConfig(source="files", path=path), byte_tokenizer(), 260, Path(cache))
    except (ValueError, FileNotFoundError) as e:
        return str(e)
    return None


def test_a_source_that_fails_on_the_builder_rank_is_an_error_on_every_rank(tmp_path):
    """Only local rank 0 tokenizes; its failure reaches the waiting ranks at once (no wait for the group timeout)."""
    from distributed import run_dist

    out = run_dist(_build_missing, 2, path=str(tmp_path / "missing.jsonl"), cache=str(tmp_path / "cache"))
    assert "does not exist" in out[0]
    assert "failed on another node's local rank 0" in out[1]
