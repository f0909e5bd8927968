"""Text scores on the default task's short answers (one to three words)."""

from __future__ import annotations

import pytest

from tuneline.scoring import text_scores

REFERENCES = ["mango", "three", "jungle meadow island", "rabbit"]


def test_right_short_answers_score_full_marks():
    scores = text_scores(list(REFERENCES), REFERENCES)
    assert scores["exact_match"] == 1.0
    assert scores["rouge_l"] == pytest.approx(1.0)
    assert scores["bleu"] == pytest.approx(1.0)  # corpus BLEU-4 without effective order gives 0 here


def test_a_wordy_wrong_answer_scores_below_right_ones():
    wordy = text_scores(["mango", "three", "jungle meadow island", "the animal here is a rabbit"], REFERENCES)
    assert wordy["exact_match"] == 0.75
    assert 0 < wordy["bleu"] < 1.0
