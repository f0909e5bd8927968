"""The run report of a `finetune` flow run: a summary dict and its markdown (a Prefect artifact).

Reads only what the stages wrote (reports/*.json) for the stages that completed in this
run, ran or cached; a failed stage's stale report is never shown as this run's.
"""

from __future__ import annotations

import re
from typing import Any

from flows.mlflow_run import PipelineRun
from tuneline.atomic import read_json
from tuneline.config import Params

# Task states of stages that did their part: ran, came from the cache, or had nothing to do after a reject.
DONE = ("Completed", "Cached", "Skipped")
METRICS = ["exact_match", "rouge_1", "rouge_2", "rouge_l", "bleu", "perplexity"]


def artifact_key(params: Params) -> str:
    """Prefect artifact keys: lowercase letters, digits and dashes."""
    return "finetune-" + (re.sub(r"[^a-z0-9-]+", "-", params.registry.model_name.lower()).strip("-") or "model")


def mlflow_ui(params: Params) -> str:
    if params.orchestration.mlflow_ui_url:
        return params.orchestration.mlflow_ui_url.rstrip("/")
    uri = params.registry.tracking_uri
    return uri.rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"


def _report(params: Params, name: str, done: set[str], stage: str) -> dict:
    path = params.report(name)
    if stage not in done or not path.exists():
        return {}
    try:
        return read_json(path)
    except (OSError, ValueError):
        return {}


def summary(params: Params, rows: list[dict[str, Any]], run: PipelineRun, ok: bool) -> dict[str, Any]:
    done = {r["stage"] for r in rows if r["state"] in DONE}
    failed = next((r for r in rows if r["state"] not in DONE), None)
    gate = _report(params, "gate.json", done, "gate")
    merge = _report(params, "merge.json", done, "merge")
    deploy = _report(params, "deploy.json", done, "deploy")
    train = _report(params, "train.json", done, "train")
    version = None if merge.get("skipped") else merge.get("version")
    return {
        "flow_run_name": run.flow_run_name,
        "outcome": (("rejected" if gate.get("decision") == "reject" else "completed") if ok
                    else (f"failed at {failed['stage']}" if failed else "failed")),
        "stages": {r["stage"]: r["state"] for r in rows},
        "ran": [r["stage"] for r in rows if r["state"] in ("Completed", "Skipped")],
        "cached": [r["stage"] for r in rows if r["state"] == "Cached"],
        "error": failed.get("error") if failed else None,
        "mlflow_run_id": run.mlflow_run_id,
        "mlflow_resumed": run.mlflow_resumed,
        "candidate_run_id": train.get("mlflow_run_id"),
        "decision": gate.get("decision"),
        "reasons": gate.get("reasons") or [],
        "model_name": params.registry.model_name,
        "model_version": str(version) if version is not None else None,
        "endpoint": None if deploy.get("skipped") else deploy.get("endpoint"),
        "eval": _report(params, "eval.json", done, "evaluate"),
        "rows": [{k: r.get(k) for k in ("stage", "state", "seconds", "result", "error")} for r in rows],
        "trigger": run.trigger,
        "event_data_hash": run.event_data_hash,
    }


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "" if value is None else str(value)


def _cell(text: Any) -> str:
    return _fmt(text).replace("|", "\\|").replace("\n", " ")


def markdown(params: Params, s: dict[str, Any]) -> str:
    ui = mlflow_ui(params)
    lines = [f"# finetune `{s['flow_run_name']}`: {s['outcome']}", ""]
    lines.append(f"Trigger: {s['trigger']}" + (f" (event data hash `{s['event_data_hash']}`)"
                                               if s.get("event_data_hash") else ""))
    lines.append("")
    decision = s.get("decision")
    if decision:
        lines.append(f"## Gate: **{decision}**")
        lines += [f"- {_cell(r)}" for r in s["reasons"]]
        lines.append("")
    ev = s.get("eval") or {}
    columns = [("candidate", ev.get("candidate")), ("base", ev.get("base")),
               (f"champion v{ev.get('champion_version')}", ev.get("champion"))]
    columns = [(title, m) for title, m in columns if isinstance(m, dict)]
    if columns:
        lines += ["## Evaluation", "", "| metric | " + " | ".join(t for t, _ in columns) + " |",
                  "|---|" + "---|" * len(columns)]
        names = [m for m in METRICS if any(m in c for _, c in columns)]
        names += sorted({k for _, c in columns for k, v in c.items() if isinstance(v, int | float)} - set(names))
        lines += [f"| {m} | " + " | ".join(_cell(c.get(m)) for _, c in columns) + " |" for m in names]
        lines.append("")
    lines += ["## Links", ""]
    if s.get("mlflow_run_id"):
        resumed = " (continued: the failed run that trained this candidate)" if s.get("mlflow_resumed") else ""
        lines.append(f"- MLflow run: [{s['mlflow_run_id']}]({ui}/#/runs/{s['mlflow_run_id']}){resumed}")
    else:
        lines.append("- MLflow run: none opened (every stage was cached)")
    if s.get("candidate_run_id") and s.get("candidate_run_id") != s.get("mlflow_run_id"):
        cand = s["candidate_run_id"]
        lines.append(f"- Candidate trained in MLflow run [{cand}]({ui}/#/runs/{cand})")
    if s.get("model_version"):
        name, version = s["model_name"], s["model_version"]
        lines.append(f"- Model version: [{name} v{version}]({ui}/#/models/{name}/versions/{version}) "
                     f"(`models:/{name}/{version}`)")
    elif decision:
        lines.append("- Model version: none registered (gate: " + decision + ")")
    if s.get("endpoint"):
        lines.append(f"- Endpoint: {s['endpoint']}")
    lines += ["", "## Stages", "", "| stage | state | seconds | result |", "|---|---|---|---|"]
    for r in s["rows"]:
        result = r.get("error") or ", ".join(f"{k}={_fmt(v)}" for k, v in (r.get("result") or {}).items())
        seconds = "" if r.get("seconds") is None else f"{r['seconds']:.1f}"
        seconds += " (earlier run)" if r["state"] == "Cached" else ""
        lines.append(f"| {r['stage']} | {r['state']} | {seconds} | {_cell(result)} |")
    return "\n".join(lines) + "\n"
