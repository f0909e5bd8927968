"""The gate's decision: thresholds, the base model and the champion's margin."""

from __future__ import annotations

from tasks.evaluate import eval_table
from tasks.gate import decide, outcome
from tuneline.config import Params

GOOD = {"exact_match": 0.7, "rouge_l": 0.7, "perplexity": 1.3}
BASE = {"exact_match": 0.0, "rouge_l": 0.1, "perplexity": 900.0}


def report(candidate=GOOD, base=BASE, champion=None):
    return {"candidate": candidate, "base": base, "champion": champion,
            "champion_version": "1" if champion else None}


def test_promotes_when_every_check_passes():
    promote, failed, passed = decide(report(), Params())
    assert promote and not failed and len(passed) == 4


def test_rejects_below_thresholds_with_reasons():
    promote, failed, _ = decide(report(candidate={**GOOD, "exact_match": 0.1, "perplexity": 99.0}), Params())
    assert not promote
    assert any("exact_match 0.1000, needs >= 0.55" in f for f in failed)
    assert any("perplexity 99.0000, needs <= 3.0" in f for f in failed)


def test_rejects_when_not_better_than_base():
    promote, failed, _ = decide(report(base={**BASE, "rouge_l": 0.8}), Params())
    assert not promote and failed == ["rouge_l 0.7000, needs > base model's 0.8000"]


def test_champion_must_be_beaten_by_the_margin():
    params = Params()
    tie = report(champion=dict(GOOD))
    promote, failed, _ = decide(tie, params)
    assert not promote and "champion v1" in failed[0]
    better = report(champion={**GOOD, "rouge_l": 0.7 - params.gate.min_margin_over_champion})
    assert decide(better, params)[0]


def test_the_outcome_names_the_first_failed_check_and_counts_the_others():
    failed = decide(report(candidate={**GOOD, "exact_match": 0.1, "perplexity": 99.0}), Params())[1]
    text, reasons = outcome(False, failed, [])
    assert text == "rejected: exact_match 0.1000, needs >= 0.55 (gate.min_exact_match) (and 1 more)"
    assert reasons == failed
    assert outcome(True, [], ["a", "b"]) == ("passed the gate", ["a", "b"])


def test_the_eval_table_puts_the_models_side_by_side():
    champion = {**GOOD, "rouge_l": 0.6}
    assert eval_table(report(champion=champion)) == {
        "metric": ["exact_match", "rouge_l", "perplexity"], "candidate": [0.7, 0.7, 1.3],
        "base": [0.0, 0.1, 900.0], "champion": [0.7, 0.6, 1.3]}
    assert eval_table(report(base=None))["base"] == [None] * 3
    assert eval_table(report())["champion"] == ["no champion yet"] * 3
