import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from dist_peft.train.config import from_dict  # noqa: E402


@pytest.fixture(autouse=True)
def _fixed_threads():
    torch.set_num_threads(2)


def tiny_config(run_dir, **sections):
    """A RunConfig for the tiny random Llama on synthetic data; ``sections`` update the defaults."""
    raw = {
        "model": {"source": "tiny-llama"},
        "method": {"name": "lora", "target_modules": ["q_proj", "v_proj", "down_proj"], "r": 4, "lora_alpha": 8},
        "data": {"source": "synthetic", "seq_len": 16, "eval_examples": 8, "synthetic_examples": 64},
        "train": {"steps": 6, "micro_batch_size": 4, "lr": 0.01, "warmup_steps": 2, "progress": False},
        "output": {"dir": str(run_dir)},
    }
    for key, value in sections.items():
        raw[key] = {**raw[key], **value}
    return from_dict(raw)
