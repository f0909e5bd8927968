"""The Prefect flow `finetune`: every stage of tasks/ as a Prefect task, in the order of tasks.ALL_STAGES.

Nothing here does the work: each task calls `tasks.run_stage(name, params)`, as `dvc repro`
and `tuneline stage` do. What the flow adds:

- two entry points, both the flow `finetune`: `finetune`, the run form of the deployment
  `finetune/finetune-on-demand` (flows/parameters.py: the knobs people tune with params.yaml's
  values as defaults, then `sets` and `overrides`), and `finetune_from_params`, what starts a run
  without a form (the schedule, the data event, `tuneline run`): what started it and the params
  file, or params already parsed. So the form shows no internal field;
- a stage cache (flows/cache.py): a stage whose code, params and input data are unchanged,
  and whose outputs are still the ones it wrote, is not run again (state `Cached`). A re-run
  after a crash therefore continues at the stage that failed. Results persist under
  `orchestration.results_dir` in the project;
- retries with exponential backoff, for transient errors only (flows/retries.py);
- one MLflow run per pipeline run (flows/mlflow_run.py), carried to the stages in their Params;
- a markdown artifact per flow run (flows/report.py), its first: created as the run starts and
  filled in as it ends: stage states, the eval table, the gate decision, links to the MLflow run
  and the model version. Flow-run names carry model, data hash and date;
- outcomes Prefect shows: a run whose candidate the gate rejected ends in a Completed state
  named "Rejected" (its message says why), and merge and deploy, which then do nothing, in
  Completed states named "Skipped".
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from prefect import flow, task
from prefect.states import Completed, State
from prefect.tasks import exponential_backoff

from flows import cache, mlflow_run, report
from flows.mlflow_run import LOCAL_ONLY, PipelineRun
from flows.parameters import (
    FINETUNE_KNOBS,
    FORM,
    KNOBS,
    NO_OVERRIDES,
    DataFormat,
    LoraMethod,
    Overrides,
    current,
    knob_layer,
    resolve_params,
)
from flows.retries import retry_if_transient
from tasks import ALL_STAGES, run_stage
from tuneline.atomic import read_json
from tuneline.config import DEFAULT_PARAMS, Params
from tuneline.logs import quiet_libraries

# The flow's stages: exactly tasks.ALL_STAGES (a test checks it against dvc.yaml).
STAGE_NAMES: list[str] = list(ALL_STAGES)
StageName = Literal[tuple(ALL_STAGES)]  # type: ignore[valid-type]


# ---------------------------------------------------------------- the tasks


def _execute(name: str, params: Params, run: PipelineRun) -> dict[str, Any]:
    quiet_libraries()
    start = time.perf_counter()
    mlflow_run.ensure_open(name, params, run)
    opened = time.perf_counter()
    result = run_stage(name, params.in_mlflow_run(run.mlflow_run_id))
    return {"stage": name, "result": json.loads(json.dumps(result, default=str)),
            "seconds": round(time.perf_counter() - opened, 2), "mlflow_open_s": round(opened - start, 2),
            "mlflow_run_id": run.mlflow_run_id, "outputs": cache.outputs(name, params)}


def _stage_task(name: str):
    def stage_fn(params: Params, cache_key: str, run: PipelineRun) -> dict[str, Any] | State:
        out = _execute(name, params, run)
        if out["result"].get("skipped") is True:  # merge and deploy after a reject: they did nothing, and say why
            reason = read_json(params.report(f"{name}.json")).get("reason", "")
            return Completed(name="Skipped", message=reason, data=out)
        return out

    stage_fn.__name__ = stage_fn.__qualname__ = name  # a task key of its own per stage
    stage_fn.__doc__ = f"The {name} stage (tasks.{name}), through tasks.run_stage."
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


def _rename(params: Params, data_hash: str | None, run: PipelineRun) -> None:
    """Name the flow run for its model and data (`<model>-<data hash>-<date>`) once they are known: as it
    starts, when the params are parsed, and again when bootstrap or a remote fetch gives the data hash."""
    from prefect.client.orchestration import get_client

    short = (data_hash or "nodata")[:8]
    if not run.flow_run_id or f"{params.registry.model_name}-{short}-" in (run.flow_run_name or ""):
        return
    new = run_name(params, data_hash)
    with get_client(sync_client=True) as client:
        client.set_flow_run_name(run.flow_run_id, new)
    run.flow_run_name = new


# ---------------------------------------------------------------- the flow


def _pipeline(params: Params, run: PipelineRun, refresh: list[str] | None) -> State:
    """Every stage in order, unchanged ones from the cache; the run report is the flow run's first artifact."""
    remote = any("://" in str(x) for x in (params.data.train_path, params.data.eval_path))
    _rename(params, None if remote else cache.data_hash(params), run)
    report_id = _create_report(params, run)
    forced = set(refresh or [])
    rows: list[dict[str, Any]] = []
    ok = False
    try:
        for name in STAGE_NAMES:
            key = cache.cache_key(name, params)
            fresh = name in forced or not _cached_outputs_intact(_storage(params), key, name, params)
            state = _with_options(name, params, fresh)(params, key, run, return_state=True)
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
                _rename(params, cache.data_hash(params), run)
        ok = True
    finally:
        summary = report.summary(params, rows, run, ok)
        markdown = report.markdown(params, summary)
        mlflow_run.close(params, run, ok, markdown)  # the MLflow run keeps the report too (run_report.md)
        _fill_report(report_id, params, summary, markdown)
    if summary["decision"] == "reject":
        why = "; ".join(map(str, summary["reasons"])) or "the gate rejected the candidate"
        return Completed(name="Rejected", message=f"gate rejected the candidate: {why}", data=summary)
    return Completed(message=f"gate: {summary['decision']}", data=summary)


def _create_report(params: Params, run: PipelineRun):
    """The run report's placeholder, so that it is the flow run's first artifact; None if Prefect refused."""
    from prefect.artifacts import create_markdown_artifact

    try:
        return create_markdown_artifact(markdown=f"# finetune `{run.flow_run_name}`: running\n",
                                        key=report.artifact_key(params), description="finetune: running")
    except Exception as e:  # the report must never stop the run
        print(f"could not create the run report artifact: {e}")
        return None


def _fill_report(report_id, params: Params, summary: dict[str, Any], markdown: str) -> None:
    from prefect.artifacts import create_markdown_artifact
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import ArtifactUpdate

    description = f"finetune {summary['flow_run_name']}: {summary['outcome']}"
    try:
        if report_id is None:
            create_markdown_artifact(markdown=markdown, key=report.artifact_key(params), description=description)
            return
        with get_client(sync_client=True) as client:
            client.update_artifact(report_id, ArtifactUpdate(data=markdown, description=description))
    except Exception as e:  # the report must never hide the run's own outcome
        print(f"could not write the run report artifact: {e}")


def _show_used(params: Params) -> None:
    """The run's Parameters tab: the knobs as this run resolved them (overrides and sets included)."""
    from prefect.client.orchestration import get_client
    from prefect.runtime import flow_run

    used = {name: current(KNOBS[name][0], params) for name in FINETUNE_KNOBS}
    try:
        with get_client(sync_client=True) as client:
            client.update_flow_run(flow_run.id, parameters={**flow_run.parameters, **used})
    except Exception as e:  # cosmetic: never stop the run for it
        print(f"could not record the parameters used: {e}")


def _start(trigger: str, data_hash: str | None) -> PipelineRun:
    from prefect.runtime import flow_run

    return PipelineRun(trigger=trigger, event_data_hash=data_hash, flow_run_id=flow_run.id,
                       flow_run_name=flow_run.name)


_DESCRIPTION = ("Fine-tune, evaluate, gate, merge, register and deploy: the stages of tasks/, each cached on its "
                "code, params and input data.")


# The form's fields, in order: the knobs (defaults and descriptions from flows/parameters.py FORM), then the rest.
@flow(name="finetune", flow_run_name="finetune-manual", log_prints=True, validate_parameters=True,
      description=_DESCRIPTION)
def finetune(
    train_path: str = FORM["train_path"],
    eval_path: str = FORM["eval_path"],
    data_format: DataFormat = FORM["data_format"],  # type: ignore[valid-type]
    base_model: str = FORM["base_model"],
    lora_method: LoraMethod = FORM["lora_method"],  # type: ignore[valid-type]
    lora_r: int = FORM["lora_r"],
    lora_alpha: int = FORM["lora_alpha"],
    learning_rate: float = FORM["learning_rate"],
    epochs: float = FORM["epochs"],
    max_steps: int = FORM["max_steps"],
    batch_size: int = FORM["batch_size"],
    seed: int = FORM["seed"],
    min_exact_match: float = FORM["min_exact_match"],
    min_rouge_l: float = FORM["min_rouge_l"],
    max_perplexity: float = FORM["max_perplexity"],
    must_beat_base: bool = FORM["must_beat_base"],
    refresh: list[StageName] = [],  # type: ignore[valid-type]  # noqa: B006 (Prefect passes a new list)
    sets: list[str] = [],  # noqa: B006
    overrides: Overrides = NO_OVERRIDES,  # type: ignore[valid-type]
) -> dict[str, Any]:
    """The run form: the knobs people tune, defaults from params.yaml; any other key through `sets` or `overrides`.

    A knob applies only when it differs from params.yaml's value as the run starts (flows/parameters.py).

    Args:
        refresh: stages to run even when their cached result is valid (e.g. deploy, after the serving cluster
            was stopped).
        sets: any other params key as dotted KEY=VALUE, applied last, as `tuneline run --set`
            (e.g. `train.warmup_ratio=0.1`, `data.eval_path=null`).
        overrides: any keys of params.yaml, nested as there (e.g. `{"train": {"warmup_ratio": 0.1}}`), checked
            against its types as the run starts. Applied after the knobs, before `sets`.
    """
    knobs = {name: value for name, value in locals().items() if name in FINETUNE_KNOBS}
    params = resolve_params(DEFAULT_PARAMS, overrides, sets, knob_layer(knobs))
    _show_used(params)
    return _pipeline(params, _start("manual", None), refresh)  # type: ignore[return-value]


@flow(name="finetune", flow_run_name="finetune-{trigger}", log_prints=True, validate_parameters=True,
      description=_DESCRIPTION)
def finetune_from_params(
    trigger: str = "manual",
    data_hash: str | None = None,
    params_path: str = str(DEFAULT_PARAMS),
    params: Params | None = None,
    refresh: list[StageName] | None = None,  # type: ignore[valid-type]
) -> dict[str, Any]:
    """The flow `finetune` without a form: for the schedule, the data event and `tuneline run`.

    Args:
        trigger: what started the run (`manual`, `schedule`, or the event's name).
        data_hash: the data hash an event announced (`tuneline data push`), for the record.
        params_path: the params file, relative to the project folder the flow runs in.
        params: params already resolved (what `tuneline run` passes, having parsed its options once);
            None: params_path as it is.
        refresh: stages to run even when their cached result is valid.
    """
    params = params or resolve_params(params_path)
    return _pipeline(params, _start(trigger, data_hash), refresh)  # type: ignore[return-value]
