"""LoRA against HF PEFT (the reference implementation and file format) on a tiny random Llama."""

import copy

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model

from conftest import check_merge_round_trip
from dist_peft.integrations.transformers import (adapted_sites, inject_adapters, load_adapter, merge_and_unload,
                                                 save_adapter)
from dist_peft.methods.lora import LoraConfig
from dist_peft.train.config import TinyModelConfig
from dist_peft.train.models import build_tiny_llama

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _ours(cfg: LoraConfig, seed: int = 0):
    model = build_tiny_llama(TinyModelConfig())
    torch.manual_seed(seed)
    inject_adapters(model, "lora", cfg, TARGETS)
    with torch.no_grad():  # non-zero B, so the update is not trivially zero
        for site in adapted_sites(model).values():
            site.adapter.lora_B.normal_(0, 0.1)
    return model


def _peft_twin(ours, cfg: LoraConfig):
    peft_model = get_peft_model(build_tiny_llama(TinyModelConfig()),
                                PeftLoraConfig(r=cfg.r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                                               use_rslora=cfg.use_rslora, target_modules=TARGETS))
    modules = dict(peft_model.named_modules())
    with torch.no_grad():
        for path, site in adapted_sites(ours).items():
            m = modules[f"base_model.model.{path}"]
            m.lora_A["default"].weight.copy_(site.adapter.lora_A)
            m.lora_B["default"].weight.copy_(site.adapter.lora_B)
    return peft_model


def _ids():
    return torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("use_rslora", [False, True])
def test_outputs_and_gradients_match_peft(use_rslora):
    """Same A, B → same logits and same gradients of A and B as peft's LoRA (scale α/r and rsLoRA α/√r)."""
    cfg = LoraConfig(r=4, lora_alpha=8, use_rslora=use_rslora)
    ours = _ours(cfg)
    theirs = _peft_twin(ours, cfg)
    ids = _ids()
    out, ref = ours(ids).logits, theirs(ids).logits
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out, build_tiny_llama(TinyModelConfig())(ids).logits, atol=1e-3)
    (out ** 2).mean().backward()
    (ref ** 2).mean().backward()
    modules = dict(theirs.named_modules())
    for path, site in adapted_sites(ours).items():
        m = modules[f"base_model.model.{path}"]
        torch.testing.assert_close(site.adapter.lora_A.grad, m.lora_A["default"].weight.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(site.adapter.lora_B.grad, m.lora_B["default"].weight.grad, rtol=1e-4, atol=1e-6)


def test_init_matches_peft_distribution_and_is_zero_update():
    """At init B = 0 (output equals the base model's) and A has peft's Kaiming-uniform bound 1/√n."""
    model = build_tiny_llama(TinyModelConfig())
    base = copy.deepcopy(model)
    sites = inject_adapters(model, "lora", LoraConfig(r=4), TARGETS)
    ids = _ids()
    assert torch.equal(model(ids).logits, base(ids).logits)
    for site in sites.values():
        a, n = site.adapter.lora_A, site.adapter.site.in_features
        assert a.abs().max() <= 1 / n ** 0.5 and a.abs().max() > 0.5 / n ** 0.5
        assert not site.adapter.lora_B.any()


def test_saved_files_load_in_peft_with_same_outputs(tmp_path):
    """Our adapter files load in peft.PeftModel.from_pretrained and give the same logits."""
    cfg = LoraConfig(r=4, lora_alpha=8)
    ours = _ours(cfg)
    save_adapter(ours, tmp_path / "adapter", base_model="tiny-llama")
    theirs = PeftModel.from_pretrained(build_tiny_llama(TinyModelConfig()), tmp_path / "adapter")
    ids = _ids()
    torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, rtol=1e-5, atol=1e-5)


def test_peft_files_load_here_with_same_outputs(tmp_path):
    """An adapter saved by peft loads into a fresh model through load_adapter with the same logits."""
    cfg = LoraConfig(r=4, lora_alpha=8)
    theirs = _peft_twin(_ours(cfg), cfg)
    theirs.save_pretrained(tmp_path / "peft")
    fresh = build_tiny_llama(TinyModelConfig())
    load_adapter(fresh, tmp_path / "peft")
    ids = _ids()
    torch.testing.assert_close(fresh(ids).logits, theirs(ids).logits, rtol=1e-5, atol=1e-5)


def test_merged_forward_equals_unmerged_forward():
    """merge → same logits; unmerge → base weights restored; merge_and_unload leaves plain linears."""
    model = _ours(LoraConfig(r=4, lora_alpha=8))
    ids = _ids()
    unmerged = check_merge_round_trip(model, ids, merged_tol=1e-5, restore_tol=1e-6)
    plain = merge_and_unload(model)
    assert not adapted_sites(plain)
    torch.testing.assert_close(plain(ids).logits, unmerged, rtol=1e-5, atol=1e-5)


def test_bad_adapter_files_are_refused(tmp_path):
    """A non-finite tensor, a wrong shape or a missing key in adapter files is a clear error, not a load."""
    from safetensors.torch import load_file, save_file

    from dist_peft.files import BadFileError

    save_adapter(_ours(LoraConfig(r=4, lora_alpha=8)), tmp_path / "a")
    f = tmp_path / "a" / "adapter_model.safetensors"
    tensors = load_file(f)
    key = sorted(tensors)[0]
    (tmp_path / "a" / "manifest.json").unlink()  # so that the edits below reach the tensor checks
    for bad, message in [({**tensors, key: tensors[key] * float("nan")}, "non-finite"),
                         ({**tensors, key: tensors[key][:, :1].contiguous()}, "shape"),
                         ({k: v for k, v in tensors.items() if k != key}, "missing")]:
        save_file(bad, f)
        with pytest.raises(BadFileError, match=message):
            load_adapter(build_tiny_llama(TinyModelConfig()), tmp_path / "a")


def test_altered_adapter_file_fails_its_checksum(tmp_path):
    from dist_peft.files import BadFileError

    save_adapter(_ours(LoraConfig(r=4, lora_alpha=8)), tmp_path / "a")
    f = tmp_path / "a" / "adapter_model.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(BadFileError, match="checksum"):
        load_adapter(build_tiny_llama(TinyModelConfig()), tmp_path / "a")


def test_unknown_target_is_an_error():
    with pytest.raises(ValueError, match="qq_proj"):
        inject_adapters(build_tiny_llama(TinyModelConfig()), "lora", LoraConfig(), ["q_proj", "qq_proj"])
