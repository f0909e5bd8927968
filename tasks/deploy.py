"""Stage 7, deploy: serve the version that merge registered, and make it the champion.

A `reject` from the gate is an outcome, not a failure: deploy then leaves the
running deployment alone and says why. Otherwise the registered version goes
live on Ray Serve without downtime (serving/switch.py): it starts beside the
version that serves, loading itself from the registry by URI, must answer a
real generation, then takes the traffic; only then does the registry's
`champion` alias move to it. A candidate that fails is removed, the old
version keeps serving, the alias stays, reports/deploy.json records the
rollback, and the stage fails (exit code 1) saying so.
"""

from __future__ import annotations

import logging
from pathlib import Path

from serving import cluster, control, switch
from tuneline import registry, tracking
from tuneline.atomic import read_json, write_json
from tuneline.config import Params
from tuneline.errors import TunelineError

log = logging.getLogger("tuneline")

MERGE_KEYS = ("model_name", "version", "model_dir", "model_uri")


def _read_report(params: Params, name: str, stage: str) -> dict:
    path = params.report(name)
    if not path.exists():
        raise TunelineError(f"{path}: not found; run the {stage} stage first")
    return read_json(path)


def _skip(params: Params, gate: dict) -> dict:
    reasons = "; ".join(map(str, gate.get("reasons") or []))
    reason = f"gate decision is {gate.get('decision')!r}" + (f": {reasons}" if reasons else "")
    report: dict = {"skipped": True, "reason": reason}
    current = control.current_report(params)
    if current:  # the champion keeps serving: remember what that is, so `serve status` can still tell
        report["current"] = current
    write_json(params.report("deploy.json"), report)
    log.info(f"[deploy] skipped: {reason}; the running deployment, if any, is unchanged")
    return {"skipped": True}


def _log_to_run(params: Params, report: dict, latency: float) -> None:
    import mlflow

    if tracking.current_run_id(params) is None:
        log.info("[deploy] no pipeline MLflow run to log to (train did not record one)")
        return
    with tracking.pipeline_run(params):
        # Tags, not params: a re-deploy in the same run may change them, and params are write-once.
        mlflow.set_tags({f"deploy.{k}": v for k, v in report.items() if v is not None})
        mlflow.log_metric("deploy.health_check_s", latency)


def _rolled_back(params: Params, model_name: str, version: str, model_uri: str, previous: dict,
                 failure: switch.PromotionFailed) -> TunelineError:
    """Record the rollback in deploy.json (what serves is unchanged) and make the error that says so."""
    report: dict = {"rolled_back": True, "reason": failure.reason, "serving_version": failure.serving_version,
                    "candidate_version": version, "model_name": model_name, "model_uri": model_uri}
    if previous and failure.serving_version is not None:
        report["current"] = previous  # `serve status` and `serve rollback` still know what serves
    write_json(params.report("deploy.json"), report)
    if tracking.current_run_id(params) is not None:
        import mlflow

        with tracking.pipeline_run(params):
            mlflow.set_tags({"deploy.rolled_back": "true", "deploy.rollback_reason": failure.reason[:5000]})
    still = (f"version {failure.serving_version} keeps serving" if failure.serving_version
             else "nothing served before, nothing serves now")
    return TunelineError(f"deploy of {model_name} v{version} failed and was rolled back: {failure.reason}\n"
                         f"{still}; the '{registry.CHAMPION}' alias is unchanged; see {params.report('deploy.json')}")


def run(params: Params) -> dict:
    gate = _read_report(params, "gate.json", "gate")
    if gate.get("decision") != "promote":
        return _skip(params, gate)
    if not params.serving.deploy:
        write_json(params.report("deploy.json"), {"skipped": True, "reason": "serving.deploy is false"})
        log.info("[deploy] skipped: serving.deploy is false; the registered version is not put live here")
        return {"skipped": True}

    merge = _read_report(params, "merge.json", "merge")
    missing = [k for k in MERGE_KEYS if not merge.get(k)]
    if missing:
        raise TunelineError(f"{params.report('merge.json')}: missing {', '.join(missing)}; "
                            "re-run the merge stage")
    model_name, version, model_uri = merge["model_name"], str(merge["version"]), merge["model_uri"]
    model_dir = Path(merge["model_dir"]).resolve()
    if not (model_dir / "config.json").exists():
        raise TunelineError(f"{model_dir}: no merged model here (no config.json); re-run the merge stage")

    served = model_name
    previous = control.current_report(params)
    try:
        # The replicas load the version from the registry by URI, so they can run on any node.
        outcome = switch.promote(params, served, version, model_uri)
    except switch.PromotionFailed as failure:
        raise _rolled_back(params, model_name, version, model_uri, previous, failure) from None
    report = {"endpoint": cluster.endpoint(params), "model_name": model_name, "version": version,
              "served_model": served, "model_uri": model_uri, "app": outcome["app"],
              "previous_version": outcome["previous_version"]}
    write_json(params.report("deploy.json"), report)
    registry.make_champion(params, model_name, version)
    _log_to_run(params, report, outcome["health_check_s"])
    return {"endpoint": report["endpoint"], "model_name": model_name, "version": version,
            "previous_version": outcome["previous_version"] or "none", "health_check_s": outcome["health_check_s"],
            "switch_s": outcome["switch_s"]}
