"""The Prefect flow `finetune`: every stage of tasks/ as a Prefect task, in the order of tasks.ALL_STAGES.

Nothing here does the work: each task calls `tasks.run_stage(name, params)`, as
`dvc repro` and `tuneline stage` do. What the flow adds:

- parameters: `overrides` (a typed form of every key of params.yaml, all optional; what you
  leave empty comes from params.yaml) and `sets` (dotted `KEY=VALUE`, as `tuneline run --set`);
- a stage cache (flows/cache.py): a stage whose code, params and input data are unchanged,
  and whose outputs are still the ones it wrote, is not run again (state `Cached`). A re-run
  after a crash therefore continues at the stage that failed. Results persist under
  `orchestration.results_dir` in the project;
- retries with exponential backoff, for transient errors only (network, MLflow, S3): a bad
  config or bad data fails at once;
- one MLflow run per pipeline run, opened when the first stage actually runs (a fully cached
  run opens none). A re-run with the same params after a failure continues the failed run
  when the candidate (train) is cached, so the registered version links to one run holding
  every stage;
- a markdown artifact per flow run: stage states, the eval table, the gate decision, links to
  the MLflow run and the model version. Flow-run names carry model, data hash and date.
"""

from __future__ import annotations

import json
import os
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

from prefect import flow, task
from prefect.tasks import exponential_backoff
from pydantic import BaseModel, ConfigDict, Field, create_model

from flows import cache
from tasks import ALL_STAGES
from tuneline.config import DEFAULT_PARAMS, Params, load_params
from tuneline.tracking import RUN_ID_ENV

# The flow's stages: exactly tasks.ALL_STAGES (a test checks it against dvc.yaml).
STAGE_NAMES: list[str] = list(ALL_STAGES)
LOCAL_ONLY = {"bootstrap"}  # makes files from config alone: nothing transient to retry
StageName = Literal[tuple(ALL_STAGES)]  # type: ignore[valid-type]


# ---------------------------------------------------------------- parameters


def _optional(model: type[BaseModel]) -> type[BaseModel]:
    """The same model with every field optional and None by default, sections included."""
    fields: dict[str, Any] = {}
    for name, info in model.model_fields.items():
        ann = info.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):  # a section: always there, its keys optional
            section = _optional(ann)
            fields[name] = (section, Field(default_factory=section, alias=info.alias))
            continue
        if info.metadata:
            ann = Annotated[(ann, *info.metadata)]
        fields[name] = (Optional[ann], Field(None, alias=info.alias, description=info.description))  # noqa: UP045
    doc = (model.__doc__ or f"{model.__name__} section of params.yaml.").strip()
    return create_model(f"{model.__name__}Overrides",
                        __config__=ConfigDict(extra="forbid", populate_by_name=True, title=model.__name__),
                        __doc__=doc + " Empty keys keep their value from params.yaml.", **fields)


ParamsOverrides = _optional(Params)
NO_OVERRIDES = ParamsOverrides()


def _flatten(tree: Any, prefix: str = "") -> list[str]:
    """{"train": {"epochs": 2}} -> ["train.epochs=2"] (values as JSON, which YAML reads back); None skipped."""
    if isinstance(tree, BaseModel):
        tree = tree.model_dump(mode="json", by_alias=True, exclude_none=True)
    out: list[str] = []
    for key, value in (tree or {}).items():
        if value is None:
            continue
        key = "validate" if key == "validate_" else key
        if isinstance(value, dict):
            out += _flatten(value, f"{prefix}{key}.")
        else:
            out.append(f"{prefix}{key}={json.dumps(value, default=str)}")
    return out


def resolve_params(params_path: str | Path = DEFAULT_PARAMS, overrides: Any = None,
                   sets: list[str] | None = None) -> Params:
    """params.yaml, then the typed overrides, then the dotted `sets`; validated with the keys named."""
    return load_params(params_path, _flatten(overrides) + list(sets or []))


# ---------------------------------------------------------------- retries


_TRANSIENT_NAMES = {"ConnectionError", "TimeoutError", "TransportError", "TimeoutException",
                    "EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError",
                    "ServiceUnavailable", "GetTimeoutError"}
# A database error is transient when the database was busy or away, not when the query was wrong.
_TRANSIENT_DB_WORDS = ("locked", "timeout", "timed out", "connection", "could not connect", "server closed")
_TRANSIENT_MLFLOW_CODES = {"TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED"}
_TRANSIENT_S3_CODES = {"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "Throttling",
                       "ThrottlingException", "RequestTimeTooSkewed", "500", "502", "503", "504"}


def is_transient(exc: BaseException | None) -> bool:
    """A network, tracking-server or object-storage hiccup, anywhere in the exception's chain."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        names = {c.__name__ for c in type(exc).__mro__}
        if names & _TRANSIENT_NAMES:
            return True
        if "OperationalError" in names and any(w in str(exc).lower() for w in _TRANSIENT_DB_WORDS):
            return True
        if "MlflowException" in names:
            code = str(getattr(exc, "error_code", ""))
            if (code in _TRANSIENT_MLFLOW_CODES or ("RestException" in names and code == "INTERNAL_ERROR")
                    or "Max retries exceeded" in str(exc)):  # a 5xx of the server; the REST client giving up
                return True
        if "ClientError" in names:  # botocore
            code = str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))
            if code in _TRANSIENT_S3_CODES:
                return True
        exc = exc.__cause__ or exc.__context__
    return False


def retry_if_transient(task, task_run, state) -> bool:
    """Prefect's retry_condition_fn: retry a failed stage only for a transient error."""
    exc = state.data if isinstance(state.data, BaseException) else state.result(raise_on_failure=False)
    return is_transient(exc if isinstance(exc, BaseException) else None)


# ---------------------------------------------------------------- the pipeline's MLflow run

# Set by the flow for the tasks it calls (same process, same thread): who runs, and why.
_CONTEXT: dict[str, Any] = {}


def _resumable_run(params: Params, params_hash: str) -> str | None:
    """The failed flow run's MLflow run that trained the cached candidate, if the params are the same."""
    from tuneline import tracking
    from tuneline.atomic import read_json

    report = params.report("train.json")
    if not report.exists():
        return None
    run_id = read_json(report).get("mlflow_run_id")
    if not run_id:
        return None
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

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


def ensure_mlflow_run(stage: str, params: Params) -> None:
    """Before a stage runs (not when it is cached): make sure the pipeline's MLflow run is open."""
    if stage in LOCAL_ONLY or os.environ.get(RUN_ID_ENV):
        return
    from mlflow import MlflowClient

    from tuneline import tracking

    params_hash = tracking.params_hash(params)
    tags = {"tuneline.entry": "prefect flow", "tuneline.params_hash": params_hash,
            "tuneline.trigger": str(_CONTEXT.get("trigger") or "manual"),
            "prefect.flow_run_id": str(_CONTEXT.get("flow_run_id") or ""),
            "prefect.flow_run_name": str(_CONTEXT.get("flow_run_name") or "")}
    if _CONTEXT.get("event_data_hash"):
        tags["tuneline.event_data_hash"] = str(_CONTEXT["event_data_hash"])
    after_train = STAGE_NAMES.index(stage) > STAGE_NAMES.index("train")
    run_id = _resumable_run(params, params_hash) if after_train else None
    if run_id:
        client = MlflowClient()
        previous = client.get_run(run_id).data.tags.get("prefect.flow_run_id", "")
        client.update_run(run_id, status="RUNNING")
        for key, value in {**tags, "tuneline.resumed_from_flow_run": previous}.items():
            client.set_tag(run_id, key, value)
        _CONTEXT["mlflow_resumed"] = True
        print(f"MLflow: continuing run {run_id} (the failed run that trained this candidate)")
    else:
        if after_train and params.report("train.json").exists():
            from tuneline.atomic import read_json

            tags["tuneline.candidate_run_id"] = str(read_json(params.report("train.json")).get("mlflow_run_id"))
        run_id = tracking.open_pipeline_run(params, f"finetune-{params.registry.model_name}", tags)
    os.environ[RUN_ID_ENV] = run_id
    _CONTEXT["mlflow_run_id"] = run_id
    _CONTEXT["experiment_id"] = tracking.setup(params)


# ---------------------------------------------------------------- the tasks


def _execute(name: str, params: Params) -> dict[str, Any]:
    from tasks import run_stage
    from tuneline.logs import quiet_libraries

    quiet_libraries()
    start = time.perf_counter()
    ensure_mlflow_run(name, params)
    opened = time.perf_counter()
    result = run_stage(name, params)
    return {"stage": name, "result": json.loads(json.dumps(result, default=str)),
            "seconds": round(time.perf_counter() - opened, 2), "mlflow_open_s": round(opened - start, 2),
            "mlflow_run_id": os.environ.get(RUN_ID_ENV), "outputs": cache.outputs(name, params)}


def _stage_task(name: str):
    def stage_fn(params: Params, cache_key: str) -> dict[str, Any]:
        return _execute(name, params)

    stage_fn.__name__ = stage_fn.__qualname__ = name  # a task key of its own per stage
    stage_fn.__doc__ = f"tasks/{name}.py: run({name!r} stage) through tasks.run_stage."
    return task(stage_fn, name=name, cache_key_fn=lambda ctx, p: p["cache_key"], persist_result=True,
                result_serializer="json", retry_condition_fn=retry_if_transient, retry_jitter_factor=0.5)


STAGE_TASKS = {name: _stage_task(name) for name in STAGE_NAMES}


def _storage(params: Params) -> Path:
    """The results folder (a Path: Prefect makes it a LocalFileSystem, no block to register)."""
    path = Path(params.orchestration.results_dir).resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def _cached_outputs_intact(storage: Path, key: str, name: str, params: Params) -> bool:
    """Whether the result stored under `key` was written with the outputs now on disk."""
    from prefect.filesystems import LocalFileSystem
    from prefect.results import ResultStore

    store = ResultStore(result_storage=LocalFileSystem(basepath=str(storage)), cache_result_in_memory=False)
    if not store.exists(key):
        return False
    try:
        stored = store.read(key).result
    except Exception:  # an unreadable record is a miss
        return False
    now = cache.outputs(name, params)
    return isinstance(stored, dict) and stored.get("outputs") == now and None not in now.values()


def _with_options(name: str, params: Params, refresh: bool):
    o = params.orchestration
    retries = 0 if name in LOCAL_ONLY else o.retries
    delays = exponential_backoff(o.retry_delay_s)(retries) if retries else 0
    return STAGE_TASKS[name].with_options(result_storage=_storage(params), refresh_cache=refresh,
                                          retries=retries, retry_delay_seconds=delays)


# ---------------------------------------------------------------- naming and reporting


def run_name(params: Params, data_hash: str | None, when: datetime | None = None) -> str:
    when = when or datetime.now(UTC)
    return f"{params.registry.model_name}-{(data_hash or 'nodata')[:8]}-{when:%Y%m%d-%H%M%S}"


def _flow_run_name() -> str:
    from prefect.runtime import flow_run

    p = flow_run.parameters or {}
    try:
        params = resolve_params(p.get("params_path") or DEFAULT_PARAMS, p.get("overrides"), p.get("sets"))
        remote = any("://" in str(x) for x in (params.data.train_path, params.data.eval_path))
        return run_name(params, None if remote else cache.data_hash(params))
    except Exception:  # a bad config fails in the flow, with its message; the name must not
        return f"finetune-{datetime.now(UTC):%Y%m%d-%H%M%S}"


def _rename(params: Params, data_hash: str | None) -> None:
    """After bootstrap or a remote fetch, the data hash is known: put it in the flow-run name."""
    from prefect.client.orchestration import get_client
    from prefect.runtime import flow_run

    name = flow_run.name or ""
    short = (data_hash or "nodata")[:8]
    if not flow_run.id or f"-{short}-" in name:
        return
    new = run_name(params, data_hash)
    with get_client(sync_client=True) as client:
        client.set_flow_run_name(flow_run.id, new)
    _CONTEXT["flow_run_name"] = new


# ---------------------------------------------------------------- the flow


@flow(name="finetune", flow_run_name=_flow_run_name, log_prints=True, validate_parameters=True,
      description="Fine-tune, evaluate, gate, merge, register and deploy: the stages of tasks/, "
                  "each cached on its code, params and input data.")
def finetune(
    overrides: ParamsOverrides = NO_OVERRIDES,  # type: ignore[valid-type]
    sets: list[str] | None = None,
    params_path: str = str(DEFAULT_PARAMS),
    refresh: list[StageName] | None = None,  # type: ignore[valid-type]
    trigger: str = "manual",
    data_hash: str | None = None,
) -> dict[str, Any]:
    """Run every stage in order; unchanged stages come from the cache.

    Args:
        overrides: any key of params.yaml; keys left empty keep their params.yaml value.
        sets: dotted KEY=VALUE overrides, applied after `overrides` (e.g. `train.epochs=2`,
            `data.eval_path=null`), exactly as `tuneline run --set`.
        params_path: the params file, relative to the project folder the flow runs in.
        refresh: stages to run even when their cached result is valid (e.g. `deploy` after
            the serving cluster was stopped).
        trigger: what started the run (`manual`, `schedule`, or the event's name).
        data_hash: the data hash an event announced (`tuneline data push`), for the record.
    """
    from prefect.artifacts import create_markdown_artifact
    from prefect.runtime import flow_run

    from flows import report
    from tuneline import tracking

    params = resolve_params(params_path, overrides, sets)
    forced = set(refresh or [])
    _CONTEXT.clear()
    _CONTEXT.update(trigger=trigger, event_data_hash=data_hash, flow_run_id=flow_run.id,
                    flow_run_name=flow_run.name)
    os.environ.pop(RUN_ID_ENV, None)  # this run's MLflow run is opened by its first stage that runs
    rows: list[dict[str, Any]] = []
    ok = False
    try:
        for name in STAGE_NAMES:
            key = cache.cache_key(name, params)
            fresh = name in forced or not _cached_outputs_intact(_storage(params), key, name, params)
            state = _with_options(name, params, fresh)(params, key, return_state=True)
            row = {"stage": name, "state": state.name, "key": key}
            if state.is_completed():
                row.update({k: v for k, v in state.result().items() if k != "outputs"})
                if state.name == "Cached":
                    print(f"[{name}] cached: inputs, code and outputs unchanged since a previous run")
            else:
                row["error"] = str(state.message or "")
            rows.append(row)
            if not state.is_completed():
                state.result()  # raises the stage's exception: the flow run fails with it
            if name == "bootstrap" or ("://" in str(params.data.train_path) and name == "validate"):
                _rename(params, cache.data_hash(params))
        ok = True
    finally:
        run_id = _CONTEXT.get("mlflow_run_id")
        os.environ.pop(RUN_ID_ENV, None)
        if run_id:
            try:
                tracking.close_pipeline_run(params, run_id, ok)
            except Exception as e:  # never hide the run's own outcome behind a tracking hiccup
                print(f"could not mark MLflow run {run_id} {'FINISHED' if ok else 'FAILED'}: {e}")
        summary = report.summary(params, rows, _CONTEXT, ok)
        try:
            create_markdown_artifact(markdown=report.markdown(params, summary), key=report.artifact_key(params),
                                     description=f"finetune {summary['flow_run_name']}: {summary['outcome']}")
        except Exception as e:  # the report must never hide the run's own outcome
            print(f"could not create the run report artifact: {e}")
    return summary


def stage_names() -> list[str]:
    """The flow's stages, in order (a test compares them with dvc.yaml)."""
    return list(STAGE_NAMES)

