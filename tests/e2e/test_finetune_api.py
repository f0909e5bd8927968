"""The fine-tuning API through the official `openai` client, against the real thing: the Serve endpoint that
`tuneline serve start` brings up (in this process's own Ray), a real Prefect server, a worker started by
`tuneline prefect up`, and a tiny project whose jobs train in seconds.

One server for the module; the scenarios run in order, the jobs one at a time (the work pool's limit):

1. files: upload, list, retrieve, content, delete; 413 over the size limit; a bad line refused at upload;
2. tenants: no key or a wrong one 401; another tenant's ids 404; the unfinished-jobs and upload limits 429;
3. a validation file whose prompts are in the training file fails the job at `validating_files`,
   naming the file, the line and the field;
4. a job from create to `succeeded`, its API process SIGKILLed while it runs: the status sequence, the
   registered model, trained tokens, the metrics CSV, stage and training events, checkpoints;
   then chat with its `fine_tuned_model` on the same endpoint, which only its tenant sees;
5. a job cancelled while it runs: `cancelled`, its Prefect run cancelled, no model registered.
"""

from __future__ import annotations

import csv
import io
import json
import os
import random
import signal
import time
import uuid

import httpx
import openai
import pytest
import yaml
from support.prefect_server import prefect_server, tuneline_cli
from support.project import tiny_params
from support.services import free_port

from tasks.bootstrap.data import generate_records

KEYS_ENV = "TUNELINE_TEST_API_KEYS"
KEYS = {"acme": f"sk-acme-{uuid.uuid4().hex}", "globex": f"sk-globex-{uuid.uuid4().hex}",
        "initech": f"sk-initech-{uuid.uuid4().hex}"}
MAX_FILE_BYTES, MAX_TENANT_BYTES = 40_000, 70_000
FINAL = {"succeeded", "failed", "cancelled"}


def _jsonl(records: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


def _records(n: int, seed: int) -> list[dict]:
    return generate_records(n, random.Random(seed), set())



@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("ftapi") / "project"
    root.mkdir()
    params = tiny_params(root, serving__ray_address="local", serving__port=free_port(),
                         orchestration__results_dir=str(root / ".prefect-results"),
                         orchestration__work_pool=f"tuneline-api-{uuid.uuid4().hex[:6]}",
                         orchestration__server_port=free_port(), orchestration__retry_delay_s=0.5,
                         jobs__keys_env=KEYS_ENV, jobs__max_file_bytes=MAX_FILE_BYTES,
                         jobs__max_tenant_bytes=MAX_TENANT_BYTES, jobs__max_running_jobs=2,
                         jobs__database_url=f"sqlite:///{root / 'jobs.db'}", jobs__files_dir=str(root / "data/files"),
                         jobs__jobs_dir=str(root / "jobs"))
    (root / "params.yaml").write_text(yaml.safe_dump(params.model_dump(mode="json", by_alias=True), sort_keys=False))
    return root, params


@pytest.fixture(scope="module")
def endpoint(project):
    """Prefect server + `tuneline prefect up` (pool, deployments, worker) + `serve start`; the base URL."""
    import ray
    from ray import serve

    from flows.jobs import serve_app

    root, params = project
    with prefect_server(root.parent, params.orchestration.server_port), pytest.MonkeyPatch.context() as mp:
        tuneline_cli("prefect", "up", cwd=root)
        mp.setenv(KEYS_ENV, ",".join(f"{tenant}:{key}" for tenant, key in KEYS.items()))
        try:
            started = serve_app.start(params, root / "params.yaml", root)
            yield started["endpoint"]
        finally:
            serve.shutdown()
            ray.shutdown()  # the local cluster this process started (ray_address local); later modules start theirs
            tuneline_cli("prefect", "down", cwd=root)


def _client(endpoint: str, tenant: str | None = "acme", retries: int = 2) -> openai.OpenAI:
    return openai.OpenAI(base_url=endpoint, api_key=KEYS[tenant] if tenant else "sk-wrong", max_retries=retries)


def _poll(client: openai.OpenAI, job_id: str, until: set[str], timeout: float = 420, seen: list | None = None):
    """Poll the job until its status is in `until`; the statuses seen, in order, go to `seen`."""
    seen = [] if seen is None else seen
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            job = client.fine_tuning.jobs.retrieve(job_id)
        except (openai.APIConnectionError, openai.InternalServerError, openai.APIStatusError) as e:
            if getattr(e, "status_code", 503) not in (500, 502, 503, 504):
                raise
            time.sleep(0.5)  # the API's replica is being replaced
            continue
        if not seen or seen[-1] != job.status:
            seen.append(job.status)
        if job.status in until:
            return job
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} did not reach {until} within {timeout}s; statuses seen: {seen}")


@pytest.fixture(scope="module")
def data(endpoint):
    """acme's training and validation files, uploaded once."""
    client = _client(endpoint)
    train, valid = _records(96, 1), _records(16, 2)
    train_file = client.files.create(file=("train.jsonl", _jsonl(train)), purpose="fine-tune")
    valid_file = client.files.create(file=("valid.jsonl", _jsonl(valid)), purpose="fine-tune")
    return {"train": train_file, "valid": valid_file, "train_records": train, "valid_records": valid}


@pytest.mark.slow
def test_files_upload_list_retrieve_content_delete_and_limits(endpoint, data):
    client = _client(endpoint)
    train = data["train"]
    assert train.purpose == "fine-tune" and train.filename == "train.jsonl"
    assert train.bytes == len(_jsonl(data["train_records"]))
    assert client.files.retrieve(train.id).id == train.id
    assert client.files.content(train.id).content == _jsonl(data["train_records"])
    assert {train.id, data["valid"].id} <= {f.id for f in client.files.list()}

    extra = client.files.create(file=("extra.jsonl", _jsonl(_records(4, 3))), purpose="fine-tune")
    assert client.files.delete(extra.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(extra.id)

    big = _jsonl(_records(1200, 4))
    assert len(big) > MAX_FILE_BYTES
    with pytest.raises(openai.APIStatusError) as too_large:
        client.files.create(file=("big.jsonl", big), purpose="fine-tune")
    assert too_large.value.status_code == 413 and "jobs.max_file_bytes" in too_large.value.message

    bad = _jsonl(_records(3, 5)) + b'{"instruction": "Count the words.", "output": 4}\n'
    with pytest.raises(openai.BadRequestError) as refused:
        client.files.create(file=("bad.jsonl", bad), purpose="fine-tune")
    assert "bad.jsonl:4: field 'output': must be a string" in refused.value.message


@pytest.mark.slow
def test_tenants_see_only_their_own_and_hit_their_limits(endpoint, data):
    acme, globex = _client(endpoint), _client(endpoint, "globex", retries=0)
    wrong = _client(endpoint, None, retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.files.list()
    with pytest.raises(openai.AuthenticationError):
        wrong.fine_tuning.jobs.list()
    for path in ("files", "fine_tuning/jobs"):  # no key at all (the client refuses to send none)
        r = httpx.get(f"{endpoint}/{path}")
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    train = data["train"].id
    with pytest.raises(openai.NotFoundError):
        globex.files.retrieve(train)
    with pytest.raises(openai.NotFoundError):
        globex.files.content(train)
    with pytest.raises(openai.NotFoundError):  # a job on another tenant's file: as if the file did not exist
        globex.fine_tuning.jobs.create(training_file=train, model="tuneline-default")
    assert train not in {f.id for f in globex.files.list()}

    own = globex.files.create(file=("g.jsonl", _jsonl(_records(40, 6))), purpose="fine-tune")
    jobs = [globex.fine_tuning.jobs.create(training_file=own.id, model="tuneline-default") for _ in range(2)]
    with pytest.raises(openai.RateLimitError) as limited:
        globex.fine_tuning.jobs.create(training_file=own.id, model="tuneline-default")
    assert "jobs.max_running_jobs" in limited.value.message
    for job in jobs:
        with pytest.raises(openai.NotFoundError):
            acme.fine_tuning.jobs.retrieve(job.id)
        with pytest.raises(openai.NotFoundError):
            acme.fine_tuning.jobs.cancel(job.id)
        globex.fine_tuning.jobs.cancel(job.id)
    for job in jobs:
        assert _poll(globex, job.id, FINAL, timeout=120).status == "cancelled"
    assert not {j.id for j in jobs} & {j.id for j in acme.fine_tuning.jobs.list()}

    initech = _client(endpoint, "initech", retries=0)
    chunk = _jsonl(_records(350, 7))
    assert MAX_TENANT_BYTES / 2 < len(chunk) <= MAX_FILE_BYTES
    initech.files.create(file=("a.jsonl", chunk), purpose="fine-tune")
    with pytest.raises(openai.RateLimitError) as full:
        initech.files.create(file=("b.jsonl", chunk), purpose="fine-tune")
    assert "jobs.max_tenant_bytes" in full.value.message


@pytest.mark.slow
def test_overlapping_validation_file_fails_at_validating_files(endpoint, data):
    client = _client(endpoint)
    overlap = data["valid_records"][:5] + [data["train_records"][7]] + data["valid_records"][5:]
    valid = client.files.create(file=("overlap.jsonl", _jsonl(overlap)), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(training_file=data["train"].id, validation_file=valid.id,
                                         model="tuneline-default")
    assert job.status == "validating_files"
    seen: list[str] = []
    job = _poll(client, job.id, FINAL, timeout=120, seen=seen)
    assert job.status == "failed" and "queued" not in seen
    assert job.error.code == "invalid_validation_file" and job.error.param == "validation_file"
    assert job.error.message.startswith(f"{valid.id}:6: field 'instruction+input': train/eval overlap rate")
    assert f"{data['train'].id} line 8" in job.error.message


def _served(client: openai.OpenAI) -> set[str]:
    try:
        return {m.id for m in client.models.list()}
    except openai.NotFoundError:  # no router on / yet: nothing serves
        return set()


def _kill_jobs_replica() -> None:
    """SIGKILL the process of the /v1/fine_tuning replica, as the OOM killer would; Serve starts another."""
    import ray

    (name,) = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if "JobsAPI" in a["name"]]
    actor = ray.get_actor(name, namespace="serve")
    os.kill(ray.get(actor.__ray_call__.remote(lambda _: os.getpid())), signal.SIGKILL)


@pytest.mark.slow
def test_job_succeeds_through_an_api_process_kill(endpoint, data, project):
    import mlflow

    _, params = project
    client = _client(endpoint)
    start = time.perf_counter()
    job = client.fine_tuning.jobs.create(
        training_file=data["train"].id, validation_file=data["valid"].id, model="tuneline-default",
        suffix="Word Games", seed=7, metadata={"team": "nlp"},
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1, "batch_size": 8}}})
    assert job.status == "validating_files" and job.seed == 7 and job.metadata == {"team": "nlp"}
    seen: list[str] = []
    _poll(client, job.id, {"running"} | FINAL, seen=seen)
    _kill_jobs_replica()
    job = _poll(client, job.id, FINAL, seen=seen)
    print(f"jobs.create -> {job.status}: {time.perf_counter() - start:.1f}s; statuses seen: {seen}")
    assert job.status == "succeeded", job.error
    assert seen == ["validating_files", "queued", "running", "succeeded"] or seen[-3:] == [
        "queued", "running", "succeeded"]

    name = job.fine_tuned_model.split(":")[0]
    assert job.fine_tuned_model == f"{name}:1" and name.startswith("ft-acme-word-games-")
    mlflow.set_tracking_uri(params.registry.tracking_uri)
    version = mlflow.MlflowClient().get_model_version(name, "1")
    assert version.status == "READY"
    assert job.trained_tokens > 0 and job.finished_at >= job.created_at

    (result,) = job.result_files
    rows = list(csv.DictReader(io.StringIO(client.files.content(result).text)))
    assert [int(r["step"]) for r in rows] == [2, 4, 6, 8, 10, 12]  # 96 records / 8, logged every 2 steps
    assert all(float(r["train_loss"]) > 0 for r in rows)

    events = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=100)]  # newest first

    def newest(prefix: str) -> int:
        return next(i for i, e in enumerate(events) if e.startswith(prefix))

    order = ["The job has successfully completed", f"New fine-tuned model created: {job.fine_tuned_model}",
             "stage merge: Completed", "stage train: Completed", "step 12: loss", "step 2: loss",
             "stage validate: Completed", "Files validated; job queued", "Validating training file"]
    assert [newest(line) for line in order] == sorted(newest(line) for line in order), events
    page = client.fine_tuning.jobs.list_events(job.id, limit=3)
    assert len(page.data) == 3 and page.has_more

    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert [c.step_number for c in checkpoints] == [12, 6]  # saved every 3 steps, logged every 2: newest first
    assert all(c.metrics.train_loss > 0 for c in checkpoints)
    everyone = [j.id for j in client.fine_tuning.jobs.list(limit=100)]
    first = client.fine_tuning.jobs.list(limit=1)
    assert everyone[0] == first.data[0].id == job.id and first.has_more == (len(everyone) > 1)

    # The model serves on the same endpoint, for its tenant only, with no champion deployed.
    deadline = time.monotonic() + 240
    while job.fine_tuned_model not in _served(client):
        assert time.monotonic() < deadline, [e.message for e in client.fine_tuning.jobs.list_events(job.id)]
        time.sleep(1)
    answer = client.chat.completions.create(model=job.fine_tuned_model, max_tokens=4, temperature=0,
                                            messages=[{"role": "user", "content": "Which word is a fruit?"}])
    assert answer.model == job.fine_tuned_model and answer.usage.completion_tokens >= 1
    globex = _client(endpoint, "globex", retries=0)
    assert job.fine_tuned_model not in {m.id for m in globex.models.list()}
    with pytest.raises(openai.NotFoundError):
        globex.chat.completions.create(model=job.fine_tuned_model, max_tokens=4,
                                       messages=[{"role": "user", "content": "Which word is a fruit?"}])


@pytest.mark.slow
def test_cancel_while_running(endpoint, data, project):
    import mlflow

    _, params = project
    client = _client(endpoint)
    job = client.fine_tuning.jobs.create(
        training_file=data["train"].id, model="tuneline-default", suffix="long",
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 200}}})
    _poll(client, job.id, {"running"} | FINAL)
    cancelled = client.fine_tuning.jobs.cancel(job.id)
    assert cancelled.id == job.id
    job = _poll(client, job.id, FINAL, timeout=180)
    assert job.status == "cancelled" and job.fine_tuned_model is None

    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as c:
        (run,) = [r for r in c.read_flow_runs() if r.idempotency_key == job.id]  # runs.submit's key
    assert run.state.type.value == "CANCELLED"
    mlflow.set_tracking_uri(params.registry.tracking_uri)
    names = {m.name for m in mlflow.MlflowClient().search_registered_models()}
    assert not any(n.startswith("ft-acme-long-") for n in names)
