"""The `finetune` flow run's MLflow run: one per pipeline run, opened when the first stage actually runs.

A fully cached flow run opens none. A re-run with the same params after a failure continues the failed run
when the candidate (train) is cached, so the registered version links to one run that holds every stage.
"""

from __future__ import annotations

from dataclasses import dataclass

from tasks import ALL_STAGES
from tuneline import run_view, tracking
from tuneline.atomic import read_json
from tuneline.config import Params

LOCAL_ONLY = {"bootstrap"}  # makes files from config alone: no MLflow run, nothing transient to retry


@dataclass
class PipelineRun:
    """What started one flow run and the MLflow run it logs to; the flow hands it to each stage task."""

    trigger: str
    event_data_hash: str | None
    flow_run_id: str | None
    flow_run_name: str | None
    mlflow_run_id: str | None = None
    mlflow_resumed: bool = False


def resumable_run(params: Params, params_hash: str) -> str | None:
    """The failed flow run's MLflow run that trained the cached candidate, if the params are the same."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    report = params.report("train.json")
    run_id = read_json(report).get("mlflow_run_id") if report.exists() else None
    if not run_id:
        return None
    tracking.setup(params)
    try:
        run = MlflowClient().get_run(run_id)
    except MlflowException:
        return None
    tags = run.data.tags
    if (run.info.status != "FINISHED" and tags.get("tuneline.entry") == "prefect flow"
            and tags.get("tuneline.params_hash") == params_hash):
        return run_id
    return None


def ensure_open(stage: str, params: Params, run: PipelineRun) -> None:
    """Before a stage runs (not when it is cached): make sure `run` has its MLflow run open."""
    from mlflow import MlflowClient

    if stage in LOCAL_ONLY or run.mlflow_run_id:
        return
    params_hash = tracking.params_hash(params)
    tags = {"tuneline.entry": "prefect flow", "tuneline.params_hash": params_hash,
            "tuneline.trigger": run.trigger or "manual", "prefect.flow_run_id": str(run.flow_run_id or ""),
            "prefect.flow_run_name": str(run.flow_run_name or "")}
    if run.event_data_hash:
        tags["tuneline.event_data_hash"] = run.event_data_hash
    after_train = ALL_STAGES.index(stage) > ALL_STAGES.index("train")
    run_id = resumable_run(params, params_hash) if after_train else None
    if run_id:
        client = MlflowClient()
        previous = client.get_run(run_id).data.tags.get("prefect.flow_run_id", "")
        client.update_run(run_id, status="RUNNING")
        for key, value in {**tags, "tuneline.resumed_from_flow_run": previous}.items():
            client.set_tag(run_id, key, value)
        run.mlflow_resumed = True
        print(f"MLflow: continuing run {run_id} (the failed run that trained this candidate)")
    else:
        if after_train and params.report("train.json").exists():
            tags["tuneline.candidate_run_id"] = str(read_json(params.report("train.json")).get("mlflow_run_id"))
        run_id = tracking.open_pipeline_run(params, run_view.run_name(params), tags)
    run.mlflow_run_id = run_id


def close(params: Params, run: PipelineRun, ok: bool, report: str | None = None) -> None:
    """Attach the run report (markdown) and mark the MLflow run FINISHED or FAILED; a tracking hiccup here
    never hides the run's own outcome."""
    from mlflow import MlflowClient

    if not run.mlflow_run_id:
        return
    try:
        if report is not None:
            tracking.setup(params)
            MlflowClient().log_text(run.mlflow_run_id, report, "run_report.md")
        tracking.close_pipeline_run(params, run.mlflow_run_id, ok)
    except Exception as e:
        print(f"could not mark MLflow run {run.mlflow_run_id} {'FINISHED' if ok else 'FAILED'}: {e}")
