"""Stage 5, gate: promote the candidate only if it clears every threshold and the champion.

A `reject` is an outcome, not a failure: reports/gate.json records the decision
and every reason, and merge and deploy then do nothing.
"""

from __future__ import annotations

from tuneline import run_view, tracking
from tuneline.atomic import read_json, write_json
from tuneline.config import Params


def decide(report: dict, params: Params) -> tuple[bool, list[str], list[str]]:
    """(promote?, reasons it failed, checks it passed), from an eval report."""
    g = params.gate
    cand, base, champ = report["candidate"], report.get("base"), report.get("champion")
    failed, passed = [], []

    def check(ok: bool, text: str) -> None:
        (passed if ok else failed).append(text)

    for metric, floor in (("exact_match", g.min_exact_match), ("rouge_l", g.min_rouge_l)):
        if metric in cand:
            check(cand[metric] >= floor, f"{metric} {cand[metric]:.4f}, needs >= {floor} (gate.min_{metric})")
    if "perplexity" in cand:
        check(cand["perplexity"] <= g.max_perplexity,
              f"perplexity {cand['perplexity']:.4f}, needs <= {g.max_perplexity} (gate.max_perplexity)")
    key = g.champion_metric
    if key not in cand:
        failed.append(f"gate.champion_metric {key!r} was not measured (see evaluate.metrics)")
        return False, failed, passed
    if g.must_beat_base and base:
        check(cand[key] > base[key], f"{key} {cand[key]:.4f}, needs > base model's {base[key]:.4f}")
    if champ:
        need = champ[key] + g.min_margin_over_champion
        check(cand[key] >= need, f"{key} {cand[key]:.4f}, needs >= champion "
                                 f"v{report.get('champion_version')}'s {champ[key]:.4f} + "
                                 f"{g.min_margin_over_champion} (gate.min_margin_over_champion)")
    return not failed, failed, passed


def outcome(promote: bool, failed: list[str], passed: list[str]) -> tuple[str, list[str]]:
    """The run's outcome (merge makes a pass `promoted vN`) and its reasons."""
    if promote:
        return "passed the gate", passed
    more = f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""
    return f"rejected: {failed[0]}{more}", failed


def run(params: Params) -> dict:
    import mlflow

    report = read_json(params.report("eval.json"))
    promote, failed, passed = decide(report, params)
    decision = "promote" if promote else "reject"
    out = {"decision": decision, "reasons": failed if failed else passed, "failed": failed, "passed": passed,
           "champion_version": report.get("champion_version")}
    write_json(params.report("gate.json"), out)
    with tracking.pipeline_run(params):
        tracking.log_section_params(params, "gate")
        mlflow.set_tag("tuneline.gate", decision)
        run_view.set_outcome(*outcome(promote, failed, passed))
        mlflow.log_metric("gate.promote", float(promote))
        tracking.log_files(params.report("gate.json"))
    if promote:
        print(f"gate: promote ({len(passed)} checks passed)")
    else:
        print("gate: reject, because:\n  - " + "\n  - ".join(failed))
    return {"decision": decision}
