"""Faults injected for real, and what must hold after each (issue 8, part 3; the Serve replica is tested elsewhere).

- kill -9 inside bootstrap, validate, tokenize, train, evaluate, gate and merge: the stage runs as `python -m
  tasks.<stage>` in its own process and SIGKILLs itself at the last moment before its output is renamed into
  place, the new content complete beside it (tuneline.atomic's TUNELINE_FAULT_KILL_BEFORE). Every output the stage
  declares must then be the previous one or absent, the registry unchanged; a re-run must complete with
  consistent outputs and remove the dead process's temp copies. Merge is also killed after registering its
  version, before merge.json: the re-run must not register the same weights again. (Deploy: test_serving.py.)
- the MLflow tracking server (`mlflow server` on SQLite) stopped while training logs to it;
- the S3 server (moto) killed during `tuneline data push`;
- a full disk (a small tmpfs; RLIMIT_FSIZE where mounting is not allowed) under merge's output.

Stage processes are forked from a multiprocessing forkserver that imports torch, transformers, peft, mlflow and
datasets once: a fresh interpreter spends ~18 s of CPU importing them, per stage. The child then runs the stage
module as `python -m` does.
"""

from __future__ import annotations

import csv
import math
import multiprocessing
import multiprocessing.forkserver
import os
import resource
import runpy
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import pytest
import yaml
from support.project import REPO, tiny_params
from support.services import Service, free_port, git, sha256, wait_http

from tasks import run_stage
from tuneline import dvc_data, registry, tracking
from tuneline.atomic import FAULT_KILL_ENV, read_json
from tuneline.config import Params
from tuneline.models import load_model

PIPELINE = ("bootstrap", "validate", "tokenize", "train", "evaluate", "gate", "merge")
BUCKET = "tuneline-data"


# ---------------------------------------------------------------- stage processes


def _stage_main(stage: str, argv: list[str], env: dict[str, str], log: str, fsize: int | None) -> None:
    """In the forked child: `python -m tasks STAGE ARGV` with `env` added, its output into `log`.

    `fsize`: RLIMIT_FSIZE in bytes, with SIGXFSZ ignored, so that a longer write fails with EFBIG.
    """
    os.environ.update(env)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    if fsize:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
    sys.argv = ["tasks/__main__.py", stage, *argv]
    runpy.run_module("tasks", run_name="__main__", alter_sys=True)


class Stages:
    """Starts stages in processes of their own, forked from a server that imported the heavy libraries."""

    def __init__(self, logs: Path):
        self.logs, self.started = logs, 0
        self.ctx = multiprocessing.get_context("forkserver")
        # This module too: a child then finds _stage_main without importing it again.
        self.ctx.set_forkserver_preload(["torch", "transformers", "peft", "mlflow", "datasets", __name__])
        multiprocessing.forkserver.ensure_running()  # it imports them meanwhile

    def start(self, stage: str, params_file: Path, env: dict[str, str] | None = None, sets: tuple[str, ...] = (),
              fsize: int | None = None):
        """(the started process, the file its output goes to)."""
        self.started += 1
        log = self.logs / f"{self.started:02d}-{stage}.log"
        argv = ["--params", str(params_file), *(arg for s in sets for arg in ("--set", s))]
        proc = self.ctx.Process(target=_stage_main, args=(stage, argv, env or {}, str(log), fsize))
        proc.start()
        return proc, log

    def run(self, stage: str, params_file: Path, **kwargs) -> tuple[int | None, str]:
        """(exit code, negative for a signal; the output) of one stage process."""
        proc, log = self.start(stage, params_file, **kwargs)
        return finish(proc), log.read_text(errors="replace")


def finish(proc, timeout: float = 600) -> int | None:
    """The exit code of a stage process, None when it had to be killed for running past `timeout`."""
    proc.join(timeout)
    if proc.is_alive():
        proc.kill()
        proc.join()
        return None
    return proc.exitcode


def wait_for(condition, alive, output, timeout: float = 300) -> None:
    """Poll `condition` while `alive()`; fail with `output()` when the process ends first or time runs out."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert alive() and time.monotonic() < deadline, output()
        time.sleep(0.02)


def write_params(path: Path, params: Params) -> Path:
    path.write_text(yaml.safe_dump(params.model_dump(mode="json", by_alias=True)), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # what run_stage sets for a local base; read by the imports
    runner = Stages(tmp_path_factory.mktemp("stage-logs"))
    yield runner
    # The server holds ~1 GB of imported libraries; `_stop` is the stdlib's own way to end it (its tests use it).
    multiprocessing.forkserver._forkserver._stop()
    runner.ctx.set_forkserver_preload([])


@pytest.fixture(scope="module")
def project(tmp_path_factory, stages):
    """A tiny project holding every stage's outputs (run here, while the forkserver imports), and its params file."""
    root = tmp_path_factory.mktemp("faults")
    params = tiny_params(root)
    for name in PIPELINE:
        run_stage(name, params)
    return params, write_params(root / "params.yaml", params)


# ---------------------------------------------------------------- outputs


def outputs(p: Params, stage: str) -> list[Path]:
    """What the stage writes (dvc.yaml's outs and metrics, and merge's folder); the main one, killed before, first."""
    return {
        "bootstrap": [p.bootstrap.model_dir, p.bootstrap.data_dir],
        "validate": [p.data.validated_dir, p.report("validation.json")],
        "tokenize": [p.data.tokenized_dir, p.report("tokenize.json")],
        "train": [p.train.output_dir, p.report("train.json"), p.report("train_log.csv")],
        "evaluate": [p.report("eval.json")],
        "gate": [p.report("gate.json")],
        "merge": [p.merge.output_dir, p.report("merge.json")],
    }[stage]


def snapshot(path: Path) -> dict[str, str] | str | None:
    """The content of a file or folder (sha256 per file), None when absent."""
    if path.is_dir():
        return {str(f.relative_to(path)): sha256(f) for f in sorted(path.rglob("*")) if f.is_file()}
    return sha256(path) if path.exists() else None


def leftovers(paths: list[Path]) -> list[str]:
    """Temp copies beside outputs (`.NAME.tmp-PID`, `.NAME.old-PID`, `.NAME.staging`)."""
    return sorted(str(f) for path in paths for f in path.parent.glob(f".{path.name}.*"))


def model_versions(p: Params) -> list[str]:
    found = registry.client(p).search_model_versions(f"name='{p.registry.model_name}'")
    return sorted((str(v.version) for v in found), key=int)


# ---------------------------------------------------------------- kill -9 in a stage


def rerun_validate(p: Params, before: dict, versions: list[str]) -> None:
    report = read_json(p.report("validation.json"))
    lines = (p.data.validated_dir / "train.jsonl").read_text(encoding="utf-8").splitlines()
    assert report["success"] and len(lines) == report["splits"]["train"]["records"] == p.bootstrap.train_records
    assert {out: snapshot(out) for out in before} == before  # the same inputs give the same outputs


def rerun_tokenize(p: Params, before: dict, versions: list[str]) -> None:
    from datasets import load_from_disk

    data, report = load_from_disk(str(p.data.tokenized_dir)), read_json(p.report("tokenize.json"))
    assert len(data["train"]) == report["train"]["examples"] == p.bootstrap.train_records
    assert len(data["eval"]) == report["eval"]["examples"] == p.bootstrap.eval_records


def rerun_train(p: Params, before: dict, versions: list[str]) -> None:
    from peft import PeftModel

    summary, steps = read_json(p.report("train.json")), list(range(2, p.train.max_steps + 1, 2))
    assert summary["steps"] == p.train.max_steps
    last = (p.train.max_steps - 1) // p.train.save_steps * p.train.save_steps  # none at max_steps (supervision.py)
    assert summary["resumed_from"].endswith(f"checkpoint-{last}")  # the killed run's last checkpoint
    assert [int(r["step"]) for r in csv.DictReader(p.report("train_log.csv").open())] == steps
    history = registry.client(p).get_metric_history(summary["mlflow_run_id"], "train.loss")
    assert sorted(m.step for m in history) == steps  # the resumed run's MLflow history is whole too
    assert snapshot(p.train.output_dir) == before[p.train.output_dir]  # resumed = uninterrupted, bit for bit
    PeftModel.from_pretrained(load_model(p), str(p.train.output_dir))
    assert not p.train.checkpoint_dir.exists()


def rerun_evaluate(p: Params, before: dict, versions: list[str]) -> None:
    report = read_json(p.report("eval.json"))
    assert set(report["candidate"]) >= {"perplexity", "rouge_l", "exact_match"}
    assert snapshot(p.report("eval.json")) == before[p.report("eval.json")]


def rerun_gate(p: Params, before: dict, versions: list[str]) -> None:
    assert read_json(p.report("gate.json"))["decision"] in ("promote", "reject")
    assert snapshot(p.report("gate.json")) == before[p.report("gate.json")]


def rerun_merge(p: Params, before: dict, versions: list[str]) -> None:
    report = read_json(p.report("merge.json"))
    # these weights: one version
    assert registry.versions_with_weights(p, report[registry.WEIGHTS_TAG]) == [report["version"]]
    assert model_versions(p) == versions  # the project's merge registered them already: nothing new
    assert snapshot(p.merge.output_dir) == before[p.merge.output_dir]
    load_model(p, path=p.merge.output_dir)


@pytest.mark.parametrize("check", [rerun_validate, rerun_tokenize, rerun_train, rerun_evaluate, rerun_gate,
                                   rerun_merge],
                         ids=lambda check: check.__name__.removeprefix("rerun_"))
def test_kill_9_inside_a_stage_keeps_whole_outputs_and_a_rerun_completes(project, stages, check):
    params, params_file = project
    stage = check.__name__.removeprefix("rerun_")
    outs = outputs(params, stage)
    before, versions = {out: snapshot(out) for out in outs}, model_versions(params)

    code, log = stages.run(stage, params_file, env={FAULT_KILL_ENV: outs[0].name})
    assert code == -signal.SIGKILL, log
    for out in outs:
        assert snapshot(out) in (before[out], None), f"{out}: neither the previous output nor absent"
    assert model_versions(params) == versions
    assert leftovers(outs)  # the dead process's complete temp copy, under a name nothing reads as the output

    run_stage(stage, params)
    assert not leftovers(outs)
    check(params, before, versions)


def test_kill_9_between_registration_and_merge_report_registers_once(project, stages):
    """The version is created, then merge dies before merge.json: the re-run finds it by its weights."""
    params, params_file = project
    weights = read_json(params.report("merge.json"))[registry.WEIGHTS_TAG]
    # unregister them, so that this merge registers anew
    for version in registry.versions_with_weights(params, weights):
        registry.client(params).delete_model_version(params.registry.model_name, version)
    report, versions = snapshot(params.report("merge.json")), model_versions(params)

    code, log = stages.run("merge", params_file, env={FAULT_KILL_ENV: "merge.json"})
    assert code == -signal.SIGKILL, log
    registered = registry.versions_with_weights(params, weights)
    assert len(registered) == 1 and model_versions(params) == sorted([*versions, *registered], key=int)
    assert snapshot(params.report("merge.json")) == report  # killed before its report replaced the old one

    run_stage("merge", params)
    assert registry.versions_with_weights(params, weights) == registered
    assert read_json(params.report("merge.json"))["version"] == registered[0]
    assert registry.alias_version(params, registry.CHALLENGER) == registered[0]


def test_kill_9_inside_bootstrap_leaves_no_model_and_a_rerun_builds_it(stages, tmp_path):
    params = tiny_params(tmp_path)
    model_dir, data_dir = outputs(params, "bootstrap")
    code, log = stages.run("bootstrap", write_params(tmp_path / "params.yaml", params),
                           env={FAULT_KILL_ENV: model_dir.name})
    assert code == -signal.SIGKILL, log
    assert not model_dir.exists() and leftovers([model_dir])
    data_after_kill = snapshot(data_dir)

    run_stage("bootstrap", params)
    assert not leftovers([model_dir, data_dir])
    assert data_after_kill in (None, snapshot(data_dir))  # written whole before the kill: what the re-run wrote
    from tasks.bootstrap import up_to_date

    assert up_to_date(params.bootstrap)
    load_model(params)


# ---------------------------------------------------------------- servers that go away


class Server:
    """A loopback server in its own process group that a test stops and starts again, on the same port."""

    def __init__(self, name: str, cmd: list[str], url: str, ready_path: str, logs: Path,
                 env: dict[str, str] | None = None):
        self.name, self.cmd, self.url, self.ready_path, self.logs, self.env = name, cmd, url, ready_path, logs, env
        self.service: Service | None = None
        self.starts = 0

    def start(self) -> None:
        """Start it, unless it runs; return once it answers."""
        if self.service is not None:
            return
        self.starts += 1
        log = self.logs / f"{self.name}-{self.starts}.log"
        self.service = Service(self.name, self.cmd, log, env=self.env)
        wait_http(self.url + self.ready_path, self.service.proc, log)

    def stop(self) -> None:
        if self.service is not None:
            self.service.stop()
            self.service = None


@pytest.fixture(scope="module")
def tracking_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    cmd = [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri",
           f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts"),
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    server = Server("mlflow", cmd, f"http://127.0.0.1:{port}", "/health", root,
                    env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    server.start()
    yield server
    server.stop()


def train_with_an_outage(stages, project, server, root: Path, back: bool, wait_s: float):
    """Train the project's data into `root`, tracked on `server`; the server goes away after the first logged step.

    The trainer is frozen (SIGSTOP) while the server stops, so the steps after it are logged to no server.
    `back`: the server starts again at once (the trainer goes on meanwhile). Returns (params, exit code, output).
    """
    src, _ = project
    params = tiny_params(root, model__base=str(src.model.base), data__tokenized_dir=str(src.data.tokenized_dir),
                         registry__tracking_uri=server.url, registry__tracking_wait_s=wait_s,
                         train__max_steps=20, train__save_steps=20)
    journal = params.train.checkpoint_dir / "train_log.jsonl"
    proc, log = stages.start("train", write_params(root / "params.yaml", params))
    wait_for(lambda: journal.exists() and journal.read_text().strip(), proc.is_alive, log.read_text)
    os.kill(proc.pid, signal.SIGSTOP)
    server.stop()
    os.kill(proc.pid, signal.SIGCONT)
    if back:
        server.start()
    return params, finish(proc), log.read_text()


def test_training_goes_on_while_the_tracking_server_is_down_and_its_metrics_arrive_when_it_is_back(
        project, stages, tracking_server, tmp_path):
    from mlflow import MlflowClient

    params, code, log = train_with_an_outage(stages, project, tracking_server, tmp_path, back=True, wait_s=300)
    assert code == 0, log
    assert f"MLflow tracking server {tracking_server.url} is not answering" in log  # the outage hit logging
    run_id = read_json(params.report("train.json"))["mlflow_run_id"]
    client = MlflowClient(tracking_server.url)
    steps = sorted({m.step for m in client.get_metric_history(run_id, "train.loss")})
    assert steps == list(range(2, 21, 2))
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and "train.tokens_per_s" in run.data.metrics


def test_a_tracking_server_that_never_returns_fails_training_naming_it_after_the_adapter_is_written(
        project, stages, tracking_server, tmp_path):
    from peft import PeftModel

    tracking_server.start()  # again, if the test before left it down
    params, code, log = train_with_an_outage(stages, project, tracking_server, tmp_path, back=False, wait_s=3)
    assert code == 1, log
    assert f"error: MLflow tracking server {tracking_server.url} (registry.tracking_uri) is unreachable" in log
    assert "registry.tracking_wait_s" in log and "Traceback" not in log
    PeftModel.from_pretrained(load_model(params), str(params.train.output_dir))
    assert read_json(params.report("train.json"))["steps"] == 20


def test_a_tracking_server_down_at_the_start_fails_naming_it(tmp_path):
    url = f"http://127.0.0.1:{free_port()}"
    params = tiny_params(tmp_path, registry__tracking_uri=url, registry__tracking_wait_s=1)
    with pytest.raises(tracking.TrackingUnreachable, match=rf"MLflow tracking server {url} .* unreachable after 1s"):
        tracking.setup(params)


@pytest.fixture
def s3(tmp_path, monkeypatch):
    """A moto S3 server; AWS_* point boto3 and DVC at it."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    for key, value in {"AWS_ENDPOINT_URL": endpoint, "AWS_ENDPOINT_URL_S3": endpoint, "AWS_DEFAULT_REGION": "us-east-1",
                       "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "DVC_NO_ANALYTICS": "1"}.items():
        monkeypatch.setenv(key, value)
    server = Server("moto", [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], endpoint,
                    "/moto-api/", tmp_path)
    server.start()
    yield server
    server.stop()


def test_s3_gone_during_dvc_push_fails_clearly_and_a_push_after_it_returns_restores_the_data(s3, tmp_path):
    import boto3

    bucket = boto3.client("s3")
    bucket.create_bucket(Bucket=BUCKET)
    repo, clone = tmp_path / "repo", tmp_path / "clone"
    data = repo / "data" / "own"
    data.mkdir(parents=True)
    for i in range(60):  # enough that the push is still going when the server dies
        (data / f"part-{i:03d}.bin").write_bytes(os.urandom(20_000))
    git("init", "-q", cwd=repo)
    dvc_data.dvc("init", "-q", repo=repo)
    dvc_data.dvc("remote", "add", "-d", "storage", f"s3://{BUCKET}/dvc", repo=repo)

    push = subprocess.Popen([sys.executable, "-m", "flows.cli", "data", "push", "data/own"], cwd=repo,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    wait_for(lambda: bucket.list_objects_v2(Bucket=BUCKET).get("KeyCount"),  # the upload has begun
             lambda: push.poll() is None, lambda: push.stdout.read() if push.poll() is not None else "no upload yet")
    s3.stop()
    out, _ = push.communicate(timeout=600)
    assert push.returncode == 1, out
    assert f"error: push to the DVC remote 'storage' (s3://{BUCKET}/dvc) failed" in out and "Traceback" not in out

    s3.start()
    bucket.create_bucket(Bucket=BUCKET)  # moto keeps nothing across a restart: the push must send everything again
    dvc_data.push(repo=repo)
    keys = [o["Key"] for o in bucket.list_objects_v2(Bucket=BUCKET, Prefix="dvc/")["Contents"]]
    assert len(keys) == 61  # every file and the folder's listing
    git("add", "-A", cwd=repo)
    git("commit", "-q", "-m", "data", cwd=repo)
    git("clone", "-q", str(repo), str(clone), cwd=tmp_path)
    dvc_data.pull(repo=clone)
    assert snapshot(clone / "data" / "own") == snapshot(data)


# ---------------------------------------------------------------- disk full


@contextmanager
def tmpfs_holding(mountpoint: Path, content: Path, room_kib: int):
    """A tmpfs at `mountpoint` holding a copy of the folder `content` and `room_kib` KiB more; yields the copy."""
    pages = sum(math.ceil(f.stat().st_size / 4096) for f in content.rglob("*") if f.is_file())
    mountpoint.mkdir()
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={pages * 4 + room_kib}k", "tmpfs", str(mountpoint)],
                           capture_output=True, text=True)
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mount.stderr.strip()}); the file-size-limit case still runs")
    try:
        yield Path(shutil.copytree(content, mountpoint / content.name))
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True)


@pytest.mark.parametrize("quota", ["tmpfs", "file-size limit"])
def test_disk_full_while_merge_writes_fails_clearly_and_keeps_the_previous_model(project, stages, tmp_path, quota):
    params, params_file = project
    report, versions = snapshot(params.report("merge.json")), model_versions(params)
    with (tmpfs_holding(tmp_path / "small", params.merge.output_dir, room_kib=32) if quota == "tmpfs"
          else nullcontext(params.merge.output_dir)) as out:
        before = snapshot(out)
        # 64 KiB: more than the stage's log and its small files, less than the model's 92 KB of weights
        code, log = stages.run("merge", params_file, sets=(f"merge.output_dir={out}",),
                               fsize=64 * 1024 if quota == "file-size limit" else None)
        assert code == 1, log
        reason = "No space left on device" if quota == "tmpfs" else "File too large"
        assert f"error: {out}: {reason} while writing it" in log and "Traceback" not in log
        assert snapshot(out) == before and not leftovers([out])
    assert snapshot(params.report("merge.json")) == report and model_versions(params) == versions
