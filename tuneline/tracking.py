"""MLflow: one run per pipeline run, every stage's params and metrics in it.

`tuneline run` (and the Prefect flow) opens the run before the first stage and hands its
id to the stages in their Params (`Params.mlflow_run_id`, set by `Params.in_mlflow_run`,
never read from params.yaml). Under `dvc repro` each stage is its own
process: `train` opens the run (a new candidate is born there, and it logs the
validate and tokenize reports it was trained on), and the stages after it
resume the run whose id `reports/train.json` records.

An http(s) tracking server that stops answering does not stop a stage: metrics
logged through `log_metrics` wait in this process and go, in order, with the
next call; when the stage's run closes, it waits up to
`registry.tracking_wait_s` for the server, then fails naming it (the stage's
outputs are written by then). A server that is down when a stage starts gets
the same wait.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from tuneline.atomic import read_json
from tuneline.config import Params
from tuneline.errors import TunelineError

# MLflow's HTTP client retries a failed request with backoff for minutes; a buffered send tries once.
ONE_TRY = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}

log = logging.getLogger("tuneline")


class TrackingUnreachable(TunelineError):
    pass


def setup(params: Params):
    """Point MLflow at the configured store; make the experiment (artifacts beside the DB)."""
    import mlflow

    wait_for_server(params)
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
    """The run this pipeline run logs to: the one its Params carry, else the one train recorded."""
    if params.mlflow_run_id:
        return params.mlflow_run_id
    train_report = params.report("train.json")
    if train_report.exists():
        return read_json(train_report).get("mlflow_run_id")
    return None


@contextmanager
def pipeline_run(params: Params, *, new: bool = False, run_name: str | None = None) -> Iterator[object]:
    """The pipeline's MLflow run; `new=True` starts one unless the Params already carry one."""
    import mlflow

    exp_id = setup(params)
    run_id = params.mlflow_run_id if new else current_run_id(params)
    if run_id is None and not new:
        raise RuntimeError("no MLflow run to log to: run the train stage first")
    run = mlflow.start_run(run_id=run_id, experiment_id=exp_id, run_name=run_name)
    try:
        yield run
        _outbox.drain(params)
    except BaseException:
        with _one_try(), suppress(Exception):  # a server that is away keeps the run RUNNING; the error is what counts
            mlflow.end_run("FAILED")
        raise
    mlflow.end_run()


def wait_for_server(params: Params) -> None:
    """An http(s) tracking server that does not answer: wait up to registry.tracking_wait_s, then fail naming it."""
    import requests

    uri = params.registry.tracking_uri
    if not uri.startswith(("http://", "https://")):
        return
    deadline = time.monotonic() + params.registry.tracking_wait_s
    while True:
        try:
            status = requests.get(f"{uri.rstrip('/')}/health", timeout=10).status_code
            if status < 500:  # any answer but a server error: it is there (401 behind auth too)
                return
            error: Exception = ConnectionError(f"HTTP {status}")
        except requests.RequestException as e:
            error = e
        if time.monotonic() >= deadline:
            raise TrackingUnreachable(f"MLflow tracking server {uri} (registry.tracking_uri) is unreachable after "
                                      f"{params.registry.tracking_wait_s:g}s (registry.tracking_wait_s): "
                                      f"{error}") from error
        time.sleep(1)


@contextmanager
def _one_try() -> Iterator[None]:
    saved = {key: os.environ.get(key) for key in ONE_TRY}
    os.environ.update(ONE_TRY)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _unreachable(e: Exception) -> bool:
    """The server did not answer, or failed (5xx): worth trying again, unlike a request it refused."""
    from mlflow.exceptions import MlflowException

    return isinstance(e, MlflowException) and e.get_http_status_code() >= 500


class _Outbox:
    """What the tracking server has not taken yet, oldest first, as (run id, metrics, tags, files).

    Files are (local path, artifact folder), read when sent: the stage's own reports, written before.
    """

    def __init__(self):
        self.items: list[tuple[str, list, list, list]] = []
        self.error: Exception | None = None  # why the last send failed; None while the server takes them

    def send(self) -> bool:
        """Send what waits, in order; False when the server did not take it (it keeps waiting)."""
        import mlflow

        client = mlflow.MlflowClient()
        while self.items:
            run_id, metrics, tags, files = self.items[0]
            try:
                with _one_try():
                    if metrics or tags:
                        client.log_batch(run_id, metrics=metrics, tags=tags)
                    for path, folder in files:
                        client.log_artifact(run_id, str(path), folder)
            except Exception as e:
                if not _unreachable(e):
                    raise
                if self.error is None:
                    log.warning(f"MLflow tracking server {mlflow.get_tracking_uri()} is not answering ({e}); going "
                                "on, its metrics kept here until it is back")
                self.error = e
                return False
            self.items.pop(0)
        if self.error is not None:
            log.info(f"MLflow tracking server {mlflow.get_tracking_uri()} is back: the kept metrics were sent")
            self.error = None
        return True

    def drain(self, params: Params) -> None:
        deadline = time.monotonic() + params.registry.tracking_wait_s
        while not self.send():
            if time.monotonic() >= deadline:
                values = sum(len(metrics) + len(tags) + len(files) for _, metrics, tags, files in self.items)
                raise TrackingUnreachable(
                    f"MLflow tracking server {params.registry.tracking_uri} (registry.tracking_uri) is unreachable: "
                    f"{values} metric, tag and file values were not sent after waiting "
                    f"{params.registry.tracking_wait_s:g}s (registry.tracking_wait_s). The stage's outputs are "
                    f"written (its metrics are also in {params.reports_dir}/); run it again when the server is "
                    "back.") from self.error
            time.sleep(1)


_outbox = _Outbox()


def log_metrics(metrics: dict[str, float], step: int | None = None, tags: dict[str, str] | None = None) -> None:
    """Log to the active run; while the tracking server does not answer, keep them and go on (see the top)."""
    import mlflow
    from mlflow.entities import Metric, RunTag

    now = int(time.time() * 1000)
    _outbox.items.append((mlflow.active_run().info.run_id,
                          [Metric(key, float(value), now, step or 0) for key, value in metrics.items()],
                          [RunTag(key, str(value)) for key, value in (tags or {}).items()], []))
    _outbox.send()


def log_files(*paths: Path, folder: str = "reports") -> None:
    """Attach the stage's report files that exist to the active run, under `folder`; kept like metrics while the
    tracking server does not answer."""
    import mlflow

    files = [(path, folder) for path in paths if path.exists()]
    if files:
        _outbox.items.append((mlflow.active_run().info.run_id, [], [], files))
        _outbox.send()


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
    """Create the run a whole `tuneline run` logs into; stages get it through `Params.in_mlflow_run`."""
    from mlflow import MlflowClient

    exp_id = setup(params)
    run = MlflowClient().create_run(exp_id, run_name=run_name, tags={"tuneline.entry": "tuneline run", **(tags or {})})
    return run.info.run_id


def close_pipeline_run(params: Params, run_id: str, ok: bool) -> None:
    from mlflow import MlflowClient

    setup(params)
    MlflowClient().set_terminated(run_id, status="FINISHED" if ok else "FAILED")
