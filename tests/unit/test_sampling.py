"""The serving engine's token choice (serving/sampling.py): the greedy part a decode graph runs, and the
per-row draws after it."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from serving.sampling import greedy, sample

EOS = torch.tensor([3])
NO_BAN = torch.zeros(3, dtype=torch.bool)


def logits() -> torch.Tensor:
    out = torch.zeros(3, 6)
    out[:, 3] = 5.0  # EOS is every row's argmax
    out[:, 1] = 4.0
    return out


def job(temperature: float, seed: int = 0, top_p: float = 1.0):
    return SimpleNamespace(temperature=temperature, top_p=top_p, generator=torch.Generator().manual_seed(seed))


def test_greedy_bans_eos_only_in_the_rows_that_ask_and_marks_nan_rows():
    scores = logits()
    scores[2, 0] = float("nan")
    tokens = greedy(scores, torch.tensor([False, True, False]), EOS)
    assert tokens.tolist() == [3, 1, -1]
    assert greedy(logits(), NO_BAN, EOS).tolist() == [3, 3, 3]


def test_sample_draws_only_the_sampling_rows_and_repeats_with_a_seed():
    scores = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    tokens = greedy(scores, NO_BAN, EOS)
    assert sample(scores, tokens, [job(0.0), None, job(0.0)]) is tokens  # all greedy: nothing to draw
    drawn = [sample(scores, tokens, [job(0.0), job(2.0, seed=s), None]) for s in (7, 7, 8)]
    assert drawn[0][0] == tokens[0] and drawn[0][2] == tokens[2]
    assert drawn[0][1] == drawn[1][1]  # same seed, same draw
    assert len({int(sample(scores, tokens, [None, job(2.0, seed=s), None])[1]) for s in range(20)}) > 1
    assert tokens.tolist() == greedy(scores, NO_BAN, EOS).tolist()  # the greedy tokens were not changed in place


@pytest.mark.parametrize("top_p", [0.5, 1.0])
def test_a_nan_row_stays_marked_when_sampled(top_p):
    scores = logits()
    scores[1, 4] = float("nan")
    tokens = sample(scores, greedy(scores, NO_BAN, EOS), [None, job(1.0, top_p=top_p), None])
    assert tokens[1] == -1
