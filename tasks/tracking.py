"""MLflow: one run per pipeline run, every stage's params and metrics in it.

`tuneline run` opens the run before the first stage and passes its id to the
stages through TUNELINE_MLFLOW_RUN_ID. Under `dvc repro` each stage is its own
process: `train` opens the run (a new candidate is born there, and it logs the
validate and tokenize reports it was trained on), and the stages after it
resume the run whose id `reports/train.json` records.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tasks.atomic import read_json
from tasks.config import Params

RUN_ID_ENV = "TUNELINE_MLFLOW_RUN_ID"


def setup(params: Params):
    """Point MLflow at the configured store; make the experiment (artifacts beside the DB)."""
    import mlflow

    mlflow.set_tracking_uri(params.registry.tracking_uri)
    exp = mlflow.get_experiment_by_name(params.registry.experiment)
    if exp is None:
        exp_id = mlflow.create_experiment(params.registry.experiment, artifact_location=artifact_location(params))
    else:
        exp_id = exp.experiment_id
    return exp_id


def artifact_location(params: Params) -> str | None:
    """Where a new experiment keeps its artifacts.

    A URI as given (`s3://bucket/prefix`: this client writes there directly, with its own AWS
    credentials); a folder as a file URI, except with an http(s) tracking server, which stores
    artifacts itself (`--serve-artifacts`, to its `--artifacts-destination`): a folder of this
    client means nothing there. None: the server's default.
    """
    location = params.registry.artifact_location
    if location is None or "://" in str(location):
        return None if location is None else str(location)
    if params.registry.tracking_uri.startswith(("http://", "https://")):
        return None
    return Path(location).resolve().as_uri()


def current_run_id(params: Params) -> str | None:
    """The run this pipeline run logs to: the env's, else the one train recorded."""
    if os.environ.get(RUN_ID_ENV):
        return os.environ[RUN_ID_ENV]
    train_report = params.report("train.json")
    if train_report.exists():
        return read_json(train_report).get("mlflow_run_id")
    return None


@contextmanager
def pipeline_run(params: Params, *, new: bool = False, run_name: str | None = None) -> Iterator[object]:
    """The pipeline's MLflow run; `new=True` starts one unless the env already names one."""
    import mlflow

    exp_id = setup(params)
    run_id = os.environ.get(RUN_ID_ENV) if new else current_run_id(params)
    if run_id is None and not new:
        raise RuntimeError("no MLflow run to log to: run the train stage first")
    with mlflow.start_run(run_id=run_id, experiment_id=exp_id, run_name=run_name) as run:
        yield run


def log_section_params(params: Params, *sections: str) -> None:
    """Log config sections as MLflow params `section.key` (secrets never live in params)."""
    import mlflow

    flat = {}
    for name in sections:
        for key, value in params.section(name).items():
            flat[f"{name}.{key}"] = json.dumps(value) if isinstance(value, list | dict) else value
    mlflow.log_params(flat)


def numeric(d: dict, prefix: str = "") -> dict[str, float]:
    """The numeric leaves of a nested report, as flat MLflow metric names."""
    out: dict[str, float] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, bool):
            out[name] = float(value)
        elif isinstance(value, int | float):
            out[name] = float(value)
        elif isinstance(value, dict):
            out.update(numeric(value, f"{name}."))
    return out


def file_md5(*paths: Path) -> str:
    """DVC's content hash (md5) of one file; of several, the md5 of their md5s in order."""
    digests = []
    for path in paths:
        h = hashlib.md5()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        digests.append(h.hexdigest())
    return digests[0] if len(digests) == 1 else hashlib.md5("".join(digests).encode()).hexdigest()


def params_hash(params: Params) -> str:
    blob = json.dumps(params.model_dump(mode="json", by_alias=True), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def open_pipeline_run(params: Params, run_name: str, tags: dict[str, str] | None = None) -> str:
    """Create the run a whole `tuneline run` logs into; stages find it through RUN_ID_ENV."""
    from mlflow import MlflowClient

    exp_id = setup(params)
    run = MlflowClient().create_run(exp_id, run_name=run_name, tags={"tuneline.entry": "tuneline run", **(tags or {})})
    return run.info.run_id


def close_pipeline_run(params: Params, run_id: str, ok: bool) -> None:
    from mlflow import MlflowClient

    setup(params)
    MlflowClient().set_terminated(run_id, status="FINISHED" if ok else "FAILED")
