"""Per-row sampling over a batch of logits: greedy rows take the argmax together; a sampling row draws from
its own generator (temperature, top_p), so a seeded request gets the same text whatever it ran beside."""

from __future__ import annotations

from dataclasses import dataclass

import torch

# A temperature this low samples the argmax anyway, and dividing logits by it overflows to inf (NaN probabilities).
GREEDY_BELOW = 1e-4


@dataclass
class Rows:
    """What sampling needs of a step's rows: their jobs (None: an idle row of the batch, sampled and
    dropped), which of them may not end on EOS, and the EOS ids."""

    jobs: list
    ban_eos: torch.Tensor
    eos: torch.Tensor


def choose(logits: torch.Tensor, rows: Rows) -> torch.Tensor:
    """The next token of each row, [rows] on the logits' device; -1 where the logits hold NaN (broken weights)."""
    if any(j is not None and j.ignore_eos for j in rows.jobs):
        eos_logits = logits[:, rows.eos]
        logits[:, rows.eos] = eos_logits.masked_fill(rows.ban_eos[:, None], -float("inf"))
    tokens = logits.argmax(dim=-1)
    for i, job in enumerate(rows.jobs):
        if job is not None and job.temperature >= GREEDY_BELOW:
            tokens[i] = _sample(logits[i], job.temperature, job.top_p, job.generator)
    return torch.where(logits.isnan().any(dim=-1), -1, tokens)


def _sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> torch.Tensor:
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1:
        sorted_p, order = probs.sort(descending=True)
        sorted_p[(sorted_p.cumsum(0) - sorted_p) > top_p] = 0  # keep the nucleus, and the token crossing it
        probs = torch.zeros_like(probs).scatter(0, order, sorted_p)
    # probs / Exp(1) noise has its argmax distributed as probs (and, unlike multinomial, no error on NaN rows).
    noise = torch.empty_like(probs).exponential_(generator=generator)
    return (probs / noise).argmax()
