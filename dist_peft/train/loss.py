"""The training loss without the micro-batch's logits: token-chunked cross-entropy over the output layer.

For T target positions, hidden states h_t (d) and the output layer W (V × d):

    loss = Σ_t [y_t ≠ IGNORE] · (logsumexp(W h_t) − (W h_t)[y_t])

is summed over chunks of ``chunk`` positions. Each chunk's logits W h_t are computed in fp32 (upcast from the
autocast dtype, as before), reduced to its loss sum, and freed; under autograd the chunk is checkpointed, so its
backward recomputes them. At most one chunk's fp32 logits (chunk × V × 4 bytes, ``CHUNK_BYTES``) exist at once,
instead of the whole micro-batch's b·s × V logits, their fp32 copy and the saved log-softmax (≈ 8.4 GB each at
b = 4, s = 4096, V = 128k). The argmax accuracy is computed only where asked (evaluation).

Decision (issue 17): the final hidden states come from the model's own forward (its root module runs, so
DeepSpeed's ZeRO-3 hooks see a normal forward) with ``logits_to_keep`` empty, captured at the decoder's output;
the output layer is then called chunk by chunk as a module (ZeRO-3 gathers its weight, an adapter on it applies).
This is exact only for model types whose logits are ``lm_head(decoder(x))`` (``HEAD_ONLY_TYPES``); any other type
(logit soft-capping, logit scaling) computes its logits in its own forward and only the loss is chunked.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from dist_peft.train.data import IGNORE

CHUNK_BYTES = 256 * 2**20
"""fp32 logits of one chunk: 512 tokens at V = 128k."""
HEAD_ONLY_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})
"""transformers model types whose causal-LM logits are exactly ``lm_head(last_hidden_state)``."""


def chunk_tokens(vocab: int, budget: int = CHUNK_BYTES) -> int:
    """Positions per chunk so that one chunk's fp32 logits take at most ``budget`` bytes."""
    return max(1, budget // (4 * vocab))


def _chunk_sums(project: Callable[[Tensor], Tensor], hidden: Tensor, labels: Tensor,
                with_correct: bool) -> tuple[Tensor, Tensor | None]:
    logits = project(hidden).float()
    loss = F.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="sum")
    if not with_correct:
        return loss, None
    return loss, ((logits.argmax(-1) == labels) & (labels != IGNORE)).sum()


def chunked_cross_entropy(project: Callable[[Tensor], Tensor], hidden: Tensor, labels: Tensor, chunk: int,
                          with_correct: bool = False, recompute: bool = True) -> tuple[Tensor, Tensor | None]:
    """(Σ cross-entropy, argmax hits or None) of ``project(hidden)`` (T × V logits) against ``labels`` (T), over
    chunks of ``chunk`` positions (module docstring). No host synchronisation: the sums stay on the device.
    ``recompute=False`` keeps each chunk's graph instead of checkpointing it (for an output layer whose weight
    cannot be recomputed in the backward: ZeRO-3's, partitioned again by then)."""
    loss = hidden.new_zeros((), dtype=torch.float32)
    correct = labels.new_zeros(()) if with_correct else None
    grad = torch.is_grad_enabled() and recompute
    for start in range(0, labels.shape[0], chunk):
        h, y = hidden[start:start + chunk], labels[start:start + chunk]
        if grad:
            part, hits = checkpoint(_chunk_sums, project, h, y, with_correct, use_reentrant=False)
        else:
            part, hits = _chunk_sums(project, h, y, with_correct)
        loss = loss + part
        if with_correct:
            correct = correct + hits
    return loss, correct


def _final_hidden(model: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """The decoder's output (after the final norm) from the model's own forward, which projects no position."""
    captured: list[Tensor] = []
    handle = model.get_decoder().register_forward_hook(
        lambda _module, _args, out: captured.append(out.last_hidden_state))
    try:
        model(input_ids=input_ids, attention_mask=attention_mask,
              logits_to_keep=torch.empty(0, dtype=torch.long, device=input_ids.device))
    finally:
        handle.remove()
    return captured[-1]


def causal_lm_loss(model: nn.Module, batch: dict[str, Tensor], with_correct: bool = False,
                   budget: int = CHUNK_BYTES) -> tuple[Tensor, Tensor | None]:
    """(Σ next-token cross-entropy over the targets, argmax hits or None) of a causal LM on a collated batch:
    position i predicts token i + 1; labels IGNORE are not targets."""
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    labels = labels[:, 1:].reshape(-1)
    config = getattr(model, "module", model).config  # DeepSpeed's engine wraps the model (its .config is its own)
    vocab = config.vocab_size
    if config.model_type in HEAD_ONLY_TYPES:
        hidden = _final_hidden(model, ids, mask)
        project = model.get_output_embeddings()
    else:
        hidden, project = model(input_ids=ids, attention_mask=mask).logits, nn.Identity()
    hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    # Decision: under ZeRO-3 the head's weight is released after its forward and a checkpointed chunk's recompute
    # would see the partition (a metadata mismatch), so its chunks keep their graphs: the logits are then saved
    # per chunk, as before this module (ZeRO-3 runs are the ones to pair with a TP engine at large vocabularies).
    zero3 = hasattr(getattr(project, "weight", None), "ds_id")
    return chunked_cross_entropy(project, hidden, labels, chunk_tokens(vocab, budget), with_correct, not zero3)
