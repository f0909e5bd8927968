"""A causal-LM cross-entropy that never holds fp32 logits over the whole vocabulary.

With a 128k vocabulary, the logits of one 8 x 2048 batch are 2.1e9 floats: 8 GiB in
fp32, more than the rest of a LoRA step. Here the final hidden states are
projected and scored a chunk of tokens at a time, and each chunk's gradient is
computed in the same pass (softmax minus one-hot, times the head), as Liger's fused
linear cross-entropy does: one chunk's logits live at a time, and backward only
scales the stored gradients instead of running the vocabulary projection twice more.

Eager, a chunk's softmax is seven passes over a [chunk, vocabulary] fp32 tensor (cast,
max, exp, sum, subtract, exp, cast back): on a 1B model that is a tenth of a training
step. Compiled (`compiled=True`, on with `train.compile`), the passes fuse into two
that read the bf16 logits; only the two matmuls stay outside.
"""

from __future__ import annotations

import torch

IGNORE = -100


def _score_chunk(h: torch.Tensor, weight: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk's summed loss and its d(loss)/d(logits), in the head's dtype."""
    exact = torch.promote_types(weight.dtype, torch.float32)  # bf16 logits are scored in fp32
    logits = (h.to(weight.dtype) @ weight.t()).to(exact)
    lse = torch.logsumexp(logits, dim=-1)
    loss = (lse - logits.gather(1, y[:, None]).squeeze(1)).sum()
    probs = logits.sub_(lse[:, None]).exp_()  # in place: eager, the chunk's logits become its softmax
    probs[torch.arange(y.numel(), device=y.device), y] -= 1
    return loss, probs.to(weight.dtype)


# Chunk lengths vary (the last one, and every one with packed rows): one dynamic-shape graph serves them all.
_score_chunk_compiled = torch.compile(_score_chunk, dynamic=True)


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of `hidden` [N, H] under `weight` [V, H] against `labels` [N]."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_tokens: int,
                compiled: bool):
        score = _score_chunk_compiled if compiled else _score_chunk
        exact = torch.promote_types(weight.dtype, torch.float32)
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros_like(weight, dtype=exact) if weight.requires_grad else None
        total = torch.zeros((), dtype=exact, device=hidden.device)
        for start in range(0, labels.numel(), chunk_tokens):
            h, y = hidden[start:start + chunk_tokens], labels[start:start + chunk_tokens]
            loss, probs = score(h, weight, y)
            total += loss
            grad_hidden[start:start + chunk_tokens] = (probs @ weight).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight += probs.t() @ h.to(weight.dtype)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        grad_w = None if grad_weight is None else (grad_weight * grad_total).to(ctx.weight_dtype)
        return grad_hidden * grad_total.to(grad_hidden.dtype), grad_w, None, None, None


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                          chunk_tokens: int = 4096, num_items: int | torch.Tensor | None = None,
                          compiled: bool = False) -> torch.Tensor:
    """Mean next-token loss of `hidden` [B, T, H] under the head `weight` [V, H].

    `labels` [B, T] are the input ids with -100 where no loss is wanted; they are
    shifted here as transformers does. `num_items` is the number of counted tokens
    to divide by (Trainer passes it across gradient accumulation); default: this batch's.
    """
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    y = labels[:, 1:].reshape(-1)
    keep = y != IGNORE
    h, y = h[keep], y[keep]  # score only the tokens that count
    total = _LinearCrossEntropy.apply(h, weight, y, chunk_tokens, compiled)
    return total / (num_items if num_items is not None else max(y.numel(), 1))


def install(model, chunk_tokens: int, compiled: bool = False):
    """Make `model` return its final hidden states as `logits` and score them with the chunked loss.

    Returns (compute_loss_func for Trainer, restore): Trainer still calls the model's
    own forward (so DDP/FSDP hooks run), only the vocabulary projection moves into the loss.
    """
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = causal_lm.lm_head
    causal_lm.lm_head = torch.nn.Identity()

    def compute_loss(outputs, labels, num_items_in_batch=None):
        if head.weight.device != outputs.logits.device:  # out of the model, the head missed Trainer's move
            head.to(outputs.logits.device)
        return chunked_cross_entropy(outputs.logits, head.weight, labels, chunk_tokens, num_items_in_batch,
                                     compiled)

    def restore() -> None:
        causal_lm.lm_head = head

    return compute_loss, restore
