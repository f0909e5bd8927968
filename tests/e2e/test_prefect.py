"""Prefect orchestration: the `finetune` flow, its cache, its deployments, its event trigger.

The server tests run against a real Prefect server that this module starts on a free
loopback port (its database in a temp folder), with a process worker started by
`tuneline prefect up` in a tiny project (tests/conftest.py `tiny_params`). They share that
project and run in order, each from the state the one before left:

1. the deployments are registered, the retrain cron comes from params;
2. in-process: `evaluate` fails once (not a transient error, so no retry), the re-run takes
   bootstrap..train from the cache (their functions are not called) and completes; a
   transient error in the re-run is retried; the failed MLflow run is continued;
   the gate rejects: the run ends in a Completed state named Rejected, merge and deploy Skipped;
3. `finetune/finetune-on-demand` through the Prefect client with an override, as the API sends it:
   the gate promotes, merge registers version 1, deploy serves it (its own Ray, port free); the
   run report is the run's first artifact, its Parameters show the knobs it used;
4. `tuneline data push` emits `tuneline.data.updated`, whose trigger starts a run of
   `finetune/finetune-on-new-data`.

The project's params gate out every candidate (gate.min_rouge_l 1.0) unless overridden,
so only run 3 pays for merge and a Ray deployment.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import uuid
from datetime import UTC
from pathlib import Path

import pytest
import yaml
from support.prefect_server import prefect_env, prefect_server, tuneline_cli
from support.project import tiny_params
from support.services import free_port

from flows import local
from flows.deployments import (
    DATA_UPDATED_AUTOMATION,
    FINETUNE_ON_DEMAND,
    FINETUNE_ON_NEW_DATA,
    FINETUNE_SCHEDULED,
)
from flows.finetune import STAGE_NAMES
from tuneline.config import Params
from tuneline.errors import TunelineError

TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


# ---------------------------------------------------------------- a real server, a worker, a project



@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A tiny project whose params gate every candidate out, with its own results folder and pool."""
    root = tmp_path_factory.mktemp("prefect") / "project"
    root.mkdir()
    params = tiny_params(root, gate__min_rouge_l=1.0, serving__ray_address="local", serving__port=free_port(),
                         orchestration__results_dir=str(root / ".prefect-results"),
                         orchestration__work_pool=f"tuneline-test-{uuid.uuid4().hex[:6]}",
                         orchestration__retrain_cron="30 4 * * 2", orchestration__retry_delay_s=0.5,
                         orchestration__server_port=free_port())
    (root / "params.yaml").write_text(yaml.safe_dump(params.model_dump(mode="json", by_alias=True), sort_keys=False))
    return root, params


@pytest.fixture(scope="module")
def server(project):
    """`prefect server start` on a free loopback port, PREFECT_HOME in a temp folder; stopped at the end."""
    root, params = project
    with prefect_server(root.parent, params.orchestration.server_port) as url:
        yield url


@pytest.fixture(scope="module")
def up(project, server):
    """`tuneline prefect up`: finds the server running, creates the pool, deploys, starts a worker."""
    root, _ = project
    proc = tuneline_cli("prefect", "up", cwd=root)
    state = json.loads((root / ".prefect" / "state.json").read_text())
    assert state["api_url"] == server and state["server_pid"] is None  # not ours: `down` leaves it alone
    yield proc.stdout
    tuneline_cli("prefect", "down", cwd=root)
    assert not local._alive(state["worker_pid"]) or _zombie(state["worker_pid"])


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except OSError:
        return True


def _client():
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


def _task_states(flow_run_id) -> dict[str, tuple[str, int]]:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with _client() as c:
        runs = c.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {r.name.rsplit("-", 1)[0]: (r.state.name, r.run_count) for r in runs}  # "validate-3f2" -> validate


def _mlflow(params: Params):
    import mlflow

    mlflow.set_tracking_uri(params.registry.tracking_uri)
    return mlflow.MlflowClient()


@pytest.mark.slow
def test_deployments_registered_with_cron_from_params_and_event_trigger(project, up):
    _, params = project
    with _client() as c:
        on_demand = c.read_deployment_by_name(FINETUNE_ON_DEMAND)
        on_new_data = c.read_deployment_by_name(FINETUNE_ON_NEW_DATA)
        retrain = c.read_deployment_by_name(FINETUNE_SCHEDULED)
        automations = c.read_automations_by_name(DATA_UPDATED_AUTOMATION)
        pool = c.read_work_pool(params.orchestration.work_pool)
    schedules = [(s.schedule.cron, s.schedule.timezone, s.active) for s in retrain.schedules]
    assert schedules == [("30 4 * * 2", "UTC", True)]  # orchestration.retrain_cron of the project's params
    assert on_demand.schedules == [] and retrain.parameters == {"trigger": "schedule"}
    assert on_demand.work_pool_name == retrain.work_pool_name == params.orchestration.work_pool
    assert on_demand.entrypoint == "flows.finetune.finetune" and pool.type == "process"
    form = on_demand.parameter_openapi_schema["properties"]  # the UI's run form, defaults from the project
    assert form["min_rouge_l"]["default"] == 1.0 and "overrides" in form and "trigger" not in form
    assert on_new_data.entrypoint == retrain.entrypoint == "flows.finetune.finetune_from_params"
    (automation,) = [a for a in automations if a.actions[0].deployment_id == on_new_data.id]
    assert automation.trigger.expect == {"tuneline.data.updated"}

    # The server's scheduler puts the next retrains on the calendar: Tuesdays 04:30 UTC.
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    deadline = time.monotonic() + 90
    with _client() as c:
        while not (scheduled := c.read_flow_runs(deployment_filter=DeploymentFilter(
                id=DeploymentFilterId(any_=[retrain.id])))) and time.monotonic() < deadline:
            time.sleep(2)
    assert scheduled, f"the scheduler created no run of {FINETUNE_SCHEDULED}"
    starts = [r.expected_start_time.astimezone(UTC) for r in scheduled]
    assert all((t.weekday(), t.hour, t.minute) == (1, 4, 30) for t in starts), starts


@pytest.mark.slow
def test_failed_evaluate_then_rerun_skips_completed_stages(project, up, monkeypatch):
    import tasks.evaluate
    import tasks.tokenize
    import tasks.train
    import tasks.validate
    from flows.finetune import finetune_from_params

    root, params = project
    calls: dict[str, int] = {}
    failures = [TunelineError("injected: evaluate crashed"), ConnectionError("injected: tracking server away")]

    def counting(name, fn, fail=False):
        def run(p):
            calls[name] = calls.get(name, 0) + 1
            if fail and failures and calls[name] <= 2:
                raise failures.pop(0)
            return fn(p)
        return run

    for module in (tasks.validate, tasks.tokenize, tasks.train):
        monkeypatch.setattr(module, "run", counting(module.__name__, module.run))
    monkeypatch.setattr(tasks.evaluate, "run", counting("tasks.evaluate", tasks.evaluate.run, fail=True))

    first = finetune_from_params(params_path=str(root / "params.yaml"), return_state=True)
    assert first.is_failed() and "injected: evaluate crashed" in first.message
    states = _task_states(first.state_details.flow_run_id)
    assert {s: states[s][0] for s in STAGE_NAMES[:5]} == {s: "Completed" for s in STAGE_NAMES[:4]} | {
        "evaluate": "Failed"}
    assert states["evaluate"][1] == 1  # a bad stage is not retried
    assert calls == {"tasks.validate": 1, "tasks.tokenize": 1, "tasks.train": 1, "tasks.evaluate": 1}
    failed_run = json.loads((root / "reports" / "train.json").read_text())["mlflow_run_id"]
    assert _mlflow(params).get_run(failed_run).info.status == "FAILED"

    second = finetune_from_params(params_path=str(root / "params.yaml"), return_state=True)
    assert second.is_completed() and second.name == "Rejected", second.message
    assert second.message.startswith("gate rejected the candidate: ") and "rouge_l" in second.message
    states = _task_states(second.state_details.flow_run_id)
    assert {s: states[s][0] for s in STAGE_NAMES} == {
        "bootstrap": "Cached", "validate": "Cached", "tokenize": "Cached", "train": "Cached",
        "evaluate": "Completed", "gate": "Completed", "merge": "Skipped", "deploy": "Skipped"}
    assert states["evaluate"][1] == 2  # the transient error was retried
    assert calls == {"tasks.validate": 1, "tasks.tokenize": 1, "tasks.train": 1, "tasks.evaluate": 3}
    summary = second.result()
    assert summary["decision"] == "reject" and summary["model_version"] is None
    assert summary["mlflow_run_id"] == failed_run and summary["mlflow_resumed"]  # one MLflow run for the pipeline
    run = _mlflow(params).get_run(failed_run)
    assert run.info.status == "FINISHED" and run.data.tags["tuneline.gate"] == "reject"
    assert {"train.loss", "eval.candidate.rouge_l", "validate.splits.train.records"} <= set(run.data.metrics)
    # validate logged its figures in the first flow run; train, which adds the reports' others, did not repeat them
    assert len(_mlflow(params).get_metric_history(failed_run, "validate.duplicate_rate")) == 1
    assert run.info.run_name.startswith("tuneline-default@") and "nodata" not in run.info.run_name
    assert run.data.tags["tuneline.outcome"].startswith("rejected: ")
    assert "run_report.md" in {a.path for a in _mlflow(params).list_artifacts(failed_run)}


def _wait_terminal(flow_run_id, timeout: float = 420):
    deadline = time.monotonic() + timeout
    with _client() as c:
        while True:
            run = c.read_flow_run(flow_run_id)
            if run.state and run.state.type.value in TERMINAL or time.monotonic() > deadline:
                return run
            time.sleep(1)


@pytest.mark.slow
def test_on_demand_run_with_override_registers_and_deploys_a_model(project, up):
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
    from prefect.deployments import run_deployment

    _, params = project
    # What the UI's custom-run form sends: only the keys that were filled in.
    run = run_deployment(FINETUNE_ON_DEMAND, parameters={"overrides": {"gate": {"min_rouge_l": 0.0}}},
                         timeout=0)
    run = _wait_terminal(run.id)
    assert run.state.type.value == "COMPLETED" and run.state.name == "Completed", run.state.message
    # The Parameters tab: what was sent, and the knobs as the run used them (the override included).
    assert run.parameters["overrides"] == {"gate": {"min_rouge_l": 0.0}} and run.parameters["min_rouge_l"] == 0.0
    assert run.parameters["learning_rate"] == params.train.learning_rate
    assert run.name.startswith(f"{params.registry.model_name}-") and "nodata" not in run.name
    states = _task_states(run.id)
    assert {s: states[s][0] for s in STAGE_NAMES[:5]} == {s: "Cached" for s in STAGE_NAMES[:5]}
    assert {s: states[s][0] for s in STAGE_NAMES[5:]} == {s: "Completed" for s in STAGE_NAMES[5:]}

    client = _mlflow(params)
    (mlrun,) = client.search_runs([client.get_experiment_by_name(params.registry.experiment).experiment_id],
                                  f"tags.`prefect.flow_run_id` = '{run.id}'")
    assert mlrun.info.status == "FINISHED" and mlrun.data.tags["tuneline.gate"] == "promote"
    assert mlrun.data.tags["tuneline.outcome"] == "promoted v1" and mlrun.info.run_name.startswith("tuneline-default@")
    assert "run_report.md" in {a.path for a in client.list_artifacts(mlrun.info.run_id)}
    version = client.get_model_version(params.registry.model_name, "1")
    assert version.run_id == mlrun.info.run_id
    assert str(client.get_model_version_by_alias(params.registry.model_name, "champion").version) == "1"

    with _client() as c:
        # One artifact, the report: made as the run starts (its first), filled in as it ends.
        (artifact,) = c.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(
            any_=[run.id])))
    assert artifact.type == "markdown" and artifact.key == "finetune-tuneline-default"
    assert "## Gate: **promote**" in artifact.data and "| rouge_l |" in artifact.data
    assert f"#/runs/{mlrun.info.run_id}" in artifact.data and "/versions/1)" in artifact.data


@pytest.mark.slow
def test_data_push_event_starts_an_on_demand_run(project, up):
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    root, _ = project
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=root, check=True, env=prefect_env())
    subprocess.run([sys.executable, "-m", "dvc", "remote", "add", "-d", "local", str(root.parent / "dvc-remote")],
                   cwd=root, check=True, env=prefect_env())
    shutil.copytree(root / "data" / "raw", root / "data" / "own")
    out = tuneline_cli("data", "push", "data/own", cwd=root).stdout
    digest = out.split("pushed data/own: ", 1)[1].split()[0]
    assert "event tuneline.data.updated sent to" in out

    with _client() as c:
        deployment = c.read_deployment_by_name(FINETUNE_ON_NEW_DATA)
        deadline = time.monotonic() + 60
        while True:
            runs = [r for r in c.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(
                any_=[deployment.id]))) if r.parameters.get("data_hash") == digest]
            if runs or time.monotonic() > deadline:
                break
            time.sleep(1)
    assert runs, "no flow run was triggered by the event"
    assert runs[0].parameters["trigger"] == "event tuneline.data.updated"
    run = _wait_terminal(runs[0].id)
    assert run.state.type.value == "COMPLETED", run.state.message
    assert run.state.name == "Rejected"  # params.yaml as it is: its gate rejects


@pytest.mark.slow
def test_tuneline_run_reports_to_the_up_server_and_skips_cached_stages(project, server, up):
    root, _ = project
    env = prefect_env()
    env.pop("PREFECT_API_URL")  # nothing configured: `tuneline run` finds the server `up` recorded here
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "run"], cwd=root, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(f"fully cached `tuneline run` against the up server: {time.perf_counter() - start:.1f}s")
    assert f"(Prefect: {server})" in proc.stdout and "ran: none;" in proc.stdout
