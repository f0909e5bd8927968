"""A job is a run of the Prefect deployment `finetune/finetune-on-demand`: its inputs become params (`sets`), its
state is Prefect's.

Each job runs in a folder of its own under `jobs.jobs_dir` (its validated and tokenized data, adapter,
merged model and reports), on the project's params.yaml with the job's values laid over it as `sets`
(dotted KEY=VALUE, exactly as `tuneline run --set`). Why a folder per job and not the project's own
folders: two jobs of two tenants must never read each other's data or overwrite each other's adapter or
reports, and the job's folder must still hold its results after later jobs ran (events, checkpoints and
result files are read from it). The base model, bootstrap's outputs, the MLflow store and the Prefect
stage cache stay shared: the cache keys on each stage's params and data, so a job's stages never hit
another job's results. Runs still go one at a time, because the work pool's concurrency limit is 1
(flows/local.py): the project's base model, SQLite MLflow store and CPU are shared, and a second
training run on the same machine would only halve the speed of both. A larger pool (or several
workers on other machines) runs jobs in parallel without any change here.

Each job registers its own model name (`ft-<tenant>[-<suffix>]-<job>`), so the gate compares it with
its thresholds and the base model but never with the project's champion, and `serving.deploy` is off:
a job's model is served beside the champion (flows/jobs/serve_app.py), never instead of it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from flows.deployments import FINETUNE_ON_DEMAND
from tuneline.config import Params

FINETUNE_DEPLOYMENT = FINETUNE_ON_DEMAND  # its knobs keep params.yaml's values; the job's values come as `sets`

# Prefect's state types, as the client sees a job.
STATUS_OF_STATE = {"SCHEDULED": "queued", "PENDING": "queued", "PAUSED": "queued", "RUNNING": "running",
                   "CANCELLING": "running", "COMPLETED": "succeeded", "FAILED": "failed", "CRASHED": "failed",
                   "CANCELLED": "cancelled"}
FINAL = {"succeeded", "failed", "cancelled"}


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()[:40] or "x"


def registered_name(tenant: str, suffix: str | None, job_id: str) -> str:
    """The job's registered model name: tenant, suffix and job, each reduced to what registry names allow."""
    parts = ["ft", _slug(tenant), *([_slug(suffix)] if suffix else []), job_id.removeprefix("ftjob-")[:12]]
    return "-".join(parts)


def job_dir(params: Params, project: Path, job_id: str) -> Path:
    root = params.jobs.jobs_dir
    return (root if root.is_absolute() else project / root) / job_id


def job_sets(params: Params, project: Path, job: dict[str, Any], train_path: Path | str,
             eval_path: Path | str | None, data_format: str, base: str | None) -> list[str]:
    """The job's params as dotted KEY=VALUE items (values in JSON, which YAML reads back unchanged)."""
    folder = job_dir(params, project, job["id"])
    method = job["method"]
    hyper = method.get(method["type"], {}).get("hyperparameters", {}) or {}
    values: dict[str, Any] = {
        "reports_dir": folder / "reports",
        "data.train_path": train_path, "data.eval_path": eval_path, "data.format": data_format,
        "data.validated_dir": folder / "data/validated", "data.tokenized_dir": folder / "data/tokenized",
        "train.output_dir": folder / "models/adapter", "train.checkpoint_dir": folder / "models/checkpoints",
        "train.seed": job["seed"], "merge.output_dir": folder / "models/merged",
        "registry.model_name": registered_name(job["tenant"], job["suffix"], job["id"]),
        "serving.deploy": False,
    }
    if base is not None:
        values["model.base"] = base
    if method["type"] == "dpo":
        # DPO tunes the project's SFT adapter (train.dpo_from) on the job's pairs; the job's own adapter beside.
        sft = params.train.dpo_from
        values.update({"train.method": "dpo", "train.output_dir": folder / "models/adapter-dpo",
                       "train.dpo_from": sft if sft.is_absolute() else project / sft})
    if isinstance(hyper.get("n_epochs"), int):
        values.update({"train.epochs": hyper["n_epochs"], "train.max_steps": -1})
    if isinstance(hyper.get("batch_size"), int):
        values["train.batch_size"] = hyper["batch_size"]
    if isinstance(hyper.get("learning_rate_multiplier"), int | float):
        values["train.learning_rate"] = params.train.learning_rate * hyper["learning_rate_multiplier"]
    if isinstance(hyper.get("beta"), int | float):
        values["train.dpo_beta"] = hyper["beta"]
    return [f"{key}={json.dumps(str(v) if isinstance(v, Path) else v)}" for key, v in values.items()]


def _client():
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


def submit(job_id: str, tenant: str, sets: list[str]) -> str:
    """Start the job's flow run; its id. The job id is the idempotency key: submitting again (the API
    died between starting the run and recording it) finds the same run."""
    from prefect.deployments import run_deployment

    run = run_deployment(FINETUNE_DEPLOYMENT, parameters={"sets": sets},
                         timeout=0, tags=["tuneline-api", f"tenant:{tenant}"], idempotency_key=job_id)
    return str(run.id)


def flow_run(flow_run_id: str):
    with _client() as c:
        return c.read_flow_run(flow_run_id)


def status_of(run) -> str:
    return STATUS_OF_STATE.get(run.state.type.value, "queued") if run.state else "queued"


def stage_runs(flow_run_id: str) -> list:
    """The flow run's task runs (one per stage that started), oldest first."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with _client() as c:
        runs = c.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return sorted(runs, key=lambda r: r.start_time or r.expected_start_time or r.created)


def cancel(flow_run_id: str) -> None:
    """A run not started yet is cancelled at once; a running one is asked to stop (the worker ends its
    process, then Prefect marks it Cancelled)."""
    from prefect.states import Cancelled, Cancelling

    with _client() as c:
        run = c.read_flow_run(flow_run_id)
        kind = run.state.type.value if run.state else "SCHEDULED"
        if kind in ("SCHEDULED", "PENDING", "PAUSED"):
            c.set_flow_run_state(flow_run_id, Cancelled(message="cancelled through the fine-tuning API"), force=True)
        elif kind == "RUNNING":
            c.set_flow_run_state(flow_run_id, Cancelling(message="cancelled through the fine-tuning API"))
