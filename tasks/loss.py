"""A causal-LM cross-entropy that never holds fp32 logits over the whole vocabulary.

With a 128k vocabulary, the logits of one 8 x 2048 batch are 2.1e9 floats: 8 GiB in
fp32, more than the rest of a LoRA step. Here the final hidden states are
projected and scored a chunk of tokens at a time, each chunk under activation
checkpointing, so forward and backward hold one chunk's logits at once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE = -100


def _chunk_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = hidden.to(weight.dtype) @ weight.t()  # the recompute in backward runs outside autocast
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 logits are scored in fp32
    return F.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="sum")


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                          chunk_tokens: int = 4096, num_items: int | torch.Tensor | None = None) -> torch.Tensor:
    """Mean next-token loss of `hidden` [B, T, H] under the head `weight` [V, H].

    `labels` [B, T] are the input ids with -100 where no loss is wanted; they are
    shifted here as transformers does. `num_items` is the number of counted tokens
    to divide by (Trainer passes it across gradient accumulation); default: this batch's.
    """
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    y = labels[:, 1:].reshape(-1)
    keep = y != IGNORE
    h, y = h[keep], y[keep]  # score only the tokens that count
    total = hidden.new_zeros((), dtype=torch.promote_types(hidden.dtype, torch.float32))
    for start in range(0, y.numel(), chunk_tokens):
        part = slice(start, start + chunk_tokens)
        total = total + checkpoint(_chunk_loss, h[part], weight, y[part], use_reentrant=False)
    return total / (num_items if num_items is not None else max(y.numel(), 1))


def install(model, chunk_tokens: int):
    """Make `model` return its final hidden states as `logits` and score them with the chunked loss.

    Returns (compute_loss_func for Trainer, restore): Trainer still calls the model's
    own forward (so DDP/FSDP hooks run), only the vocabulary projection moves into the loss.
    """
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = causal_lm.lm_head
    causal_lm.lm_head = torch.nn.Identity()

    def compute_loss(outputs, labels, num_items_in_batch=None):
        return chunked_cross_entropy(outputs.logits, head.weight, labels, chunk_tokens, num_items_in_batch)

    def restore() -> None:
        causal_lm.lm_head = head

    return compute_loss, restore
