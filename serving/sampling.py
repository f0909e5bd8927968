"""Per-row sampling over a batch of logits, in two parts:
- `greedy`: every row's argmax, EOS banned in rows that may not end on it, -1 where the logits hold NaN (broken
  weights). Fixed work on device tensors: a decode step's CUDA graph includes it (serving/cuda_graphs.py).
- `sample`: each sampling row draws from its own generator (temperature, top_p), so a seeded request gets the
  same text whatever it ran beside. Host-side choices per row: it runs after the graph."""

from __future__ import annotations

import torch

# A temperature this low samples the argmax anyway, and dividing logits by it overflows to inf (NaN probabilities).
GREEDY_BELOW = 1e-4


def greedy(logits: torch.Tensor, ban_eos: torch.Tensor, eos: torch.Tensor) -> torch.Tensor:
    """[rows] argmax tokens; `ban_eos` [rows] bool: rows that may not end on EOS (banned in `logits`, in place)."""
    logits[:, eos] = logits[:, eos].masked_fill(ban_eos[:, None], -float("inf"))
    return torch.where(logits.isnan().any(dim=-1), -1, logits.argmax(dim=-1))


def sample(logits: torch.Tensor, tokens: torch.Tensor, jobs: list) -> torch.Tensor:
    """`tokens` (from `greedy` over the same logits) with each sampling row's token drawn; the same tensor if
    no row samples. `jobs`: each row's job, None for an idle row."""
    rows = [(i, j) for i, j in enumerate(jobs) if j is not None and j.temperature >= GREEDY_BELOW]
    if not rows:
        return tokens
    tokens = tokens.clone()
    for i, job in rows:
        tokens[i] = torch.where(tokens[i] < 0, -1, _draw(logits[i], job.temperature, job.top_p, job.generator))
    return tokens


def _draw(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> torch.Tensor:
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1:
        sorted_p, order = probs.sort(descending=True)
        sorted_p[(sorted_p.cumsum(0) - sorted_p) > top_p] = 0  # keep the nucleus, and the token crossing it
        probs = torch.zeros_like(probs).scatter(0, order, sorted_p)
    # probs / Exp(1) noise has its argmax distributed as probs (and, unlike multinomial, no error on NaN rows).
    noise = torch.empty_like(probs).exponential_(generator=generator)
    return (probs / noise).argmax()
