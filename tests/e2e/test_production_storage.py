"""Production storage, for real: PostgreSQL, S3 (a moto server) and mlflow/server.sh on them.

Every server listens on loopback on a free port, keeps its files in a temp folder and is
stopped by this module (its own process group, or `pg_ctl stop`), and nothing else is.
The pipeline (bootstrap..merge, no deploy: Ray stays out) logs to the MLflow server, whose
runs and registry live in PostgreSQL and whose artifacts live in S3; the registered model
loads back and generates. DVC pushes data to an S3 remote and a fresh clone pulls it back
bit for bit. Params read their data and base model from s3:// URIs.
"""

from __future__ import annotations

import glob
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from support.project import REPO, tiny_params
from support.services import Service, free_port, git, sha256, wait_http

PIPELINE = ("bootstrap", "validate", "tokenize", "train", "evaluate", "gate", "merge")
ARTIFACTS, DATA = "tuneline-artifacts", "tuneline-data"


def pg_bin(name: str) -> str | None:
    found = shutil.which(name) or sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found if isinstance(found, str) else (found[-1] if found else None)


@pytest.fixture(scope="module")
def aws(tmp_path_factory):
    """A moto S3 server; AWS_* in the environment point boto3, DVC and MLflow at it."""
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    port = free_port()
    moto = Service("moto", [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], log)
    endpoint = f"http://127.0.0.1:{port}"
    with pytest.MonkeyPatch.context() as mp:
        for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "MLFLOW_S3_ENDPOINT_URL"):
            mp.delenv(key, raising=False)
        mp.setenv("AWS_ENDPOINT_URL", endpoint)
        mp.setenv("AWS_ENDPOINT_URL_S3", endpoint)
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("TUNELINE_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        mp.setenv("DVC_NO_ANALYTICS", "1")
        try:
            wait_http(f"{endpoint}/moto-api/", moto.proc, log, timeout=60)
            import boto3

            s3 = boto3.client("s3")
            for bucket in (ARTIFACTS, DATA):
                s3.create_bucket(Bucket=bucket)
            yield s3
        finally:
            moto.stop()


@pytest.fixture(scope="module")
def postgres():
    """A PostgreSQL cluster in a temp folder (as the `postgres` user when we are root: it refuses root)."""
    initdb, pg_ctl = pg_bin("initdb"), pg_bin("pg_ctl")
    if not (initdb and pg_ctl):
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found: apt-get install postgresql")
    prefix: list[str] = []
    base = Path(tempfile.mkdtemp(prefix="tuneline-pg-"))  # not under pytest's 0700 root-only folder
    if os.geteuid() == 0:
        import pwd

        user = next((u for u in ("postgres", "nobody") if _has_user(u)), None)
        if user is None:
            pytest.skip("running as root and no unprivileged user (postgres, nobody) to run PostgreSQL as")
        pw = pwd.getpwnam(user)
        os.chown(base, pw.pw_uid, pw.pw_gid)
        prefix = ["runuser", "-u", user, "--"]
    data, log, port = base / "data", base / "server.log", free_port()

    def run(*cmd: str) -> None:
        proc = subprocess.run([*prefix, *cmd], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, f"{' '.join(cmd)}:\n{proc.stdout}\n{proc.stderr}"

    run(initdb, "-D", str(data), "-U", "mlflow", "--auth=trust", "-E", "UTF8", "--no-sync")
    opts = f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories='' -c fsync=off"
    try:
        run(pg_ctl, "-D", str(data), "-l", str(log), "-o", opts, "-w", "-t", "60", "start")
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=port, user="mlflow", dbname="postgres", autocommit=True) as c:
            c.execute("CREATE DATABASE mlflow")
        yield {"PGHOST": "127.0.0.1", "PGPORT": str(port), "PGUSER": "mlflow", "PGDATABASE": "mlflow"}
    finally:
        subprocess.run([*prefix, pg_ctl, "-D", str(data), "-m", "fast", "-w", "stop"], capture_output=True,
                       timeout=60)
        shutil.rmtree(base, ignore_errors=True)


def _has_user(name: str) -> bool:
    import pwd

    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


@pytest.fixture(scope="module")
def mlflow_server(aws, postgres, tmp_path_factory):
    """mlflow/server.sh: backend store in PostgreSQL, artifacts proxied to s3://tuneline-artifacts/mlflow."""
    log = tmp_path_factory.mktemp("mlflow-server") / "server.log"
    port = free_port()
    env = {**os.environ, **postgres, "MLFLOW_ARTIFACTS_DESTINATION": f"s3://{ARTIFACTS}/mlflow",
           "MLFLOW_PORT": str(port), "MLFLOW_WORKERS": "1", "MLFLOW_BIN": str(Path(sys.executable).parent / "mlflow"),
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no background job workers: 2 cores here
    env.pop("MLFLOW_TRACKING_URI", None)
    server = Service("mlflow", ["bash", str(REPO / "mlflow" / "server.sh")], log, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/health", server.proc, log)
        yield url
    finally:
        server.stop()


@pytest.fixture(scope="module")
def pipeline(mlflow_server, tmp_path_factory):
    """bootstrap..merge of the tiny project, tracked and registered on the MLflow server."""
    from tasks import run_stage

    root = tmp_path_factory.mktemp("prod")
    params = tiny_params(root, registry__tracking_uri=mlflow_server)
    results, times = {}, {}
    for name in PIPELINE:
        start = time.perf_counter()
        results[name] = run_stage(name, params)
        times[name] = round(time.perf_counter() - start, 2)
    seconds = sum(times.values())
    print(f"\npipeline bootstrap..merge on PostgreSQL + S3: {seconds:.1f}s {times}")
    return params, results, seconds


@pytest.mark.slow
def test_pipeline_tracks_in_postgres_and_stores_artifacts_in_s3(pipeline, postgres, aws):
    import psycopg

    params, results, _ = pipeline
    assert results["merge"]["version"] == "1"
    with psycopg.connect(host=postgres["PGHOST"], port=int(postgres["PGPORT"]), user="mlflow", dbname="mlflow") as c:
        versions = c.execute("SELECT name, version FROM model_versions").fetchall()
        runs = c.execute("SELECT count(*) FROM runs").fetchone()[0]
        metrics = c.execute("SELECT count(*) FROM metrics").fetchone()[0]
    assert versions == [(params.registry.model_name, 1)] and runs >= 1 and metrics > 0
    keys = [o["Key"] for o in aws.list_objects_v2(Bucket=ARTIFACTS, Prefix="mlflow/").get("Contents", [])]
    assert any(k.endswith("/artifacts/model/model.safetensors") for k in keys), keys
    assert any(k.endswith("/artifacts/MLmodel") for k in keys), keys
    assert not (Path(str(params.registry.artifact_location))).exists()  # nothing went to a local folder


@pytest.mark.slow
def test_registered_version_loads_back_from_s3_and_generates(pipeline, aws, tmp_path):
    import mlflow

    params, results, _ = pipeline
    mlflow.set_tracking_uri(params.registry.tracking_uri)
    uri = f"models:/{params.registry.model_name}/{results['merge']['version']}"
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(tmp_path / "dl")))
    weights = local / "model" / "model.safetensors"
    key = next(o["Key"] for o in aws.list_objects_v2(Bucket=ARTIFACTS, Prefix="mlflow/")["Contents"]
               if o["Key"].endswith("/artifacts/model/model.safetensors"))
    body = aws.get_object(Bucket=ARTIFACTS, Key=key)["Body"].read()
    assert hashlib.sha256(body).hexdigest() == sha256(weights)  # what the server serves is what S3 holds

    generator = mlflow.transformers.load_model(uri)
    prompt = "Which word is a fruit?"
    out = generator(prompt, max_new_tokens=6, do_sample=False)[0]["generated_text"]
    assert out.startswith(prompt) and len(out) > len(prompt)


@pytest.mark.slow
def test_data_and_base_model_read_from_s3_uris(pipeline, aws, tmp_path):
    """data.train_path, data.eval_path and model.base as s3:// URIs: validate and tokenize read local copies."""
    from tasks import run_stage
    from tuneline import s3
    from tuneline.atomic import read_json
    from tuneline.errors import TunelineError

    src, _, _ = pipeline
    raw, base = Path(src.data.train_path).parent, Path(src.model.base)
    for f in raw.glob("*.jsonl"):
        aws.upload_file(str(f), DATA, f"raw/{f.name}")
    for f in base.rglob("*"):
        if f.is_file():
            aws.upload_file(str(f), DATA, f"models/base/{f.relative_to(base)}")
    params = tiny_params(tmp_path, data__train_path=f"s3://{DATA}/raw/train.jsonl",
                         data__eval_path=f"s3://{DATA}/raw/eval.jsonl", model__base=f"s3://{DATA}/models/base")
    assert params.data.train_path == f"s3://{DATA}/raw/train.jsonl"  # a URI stays a URI (not a Path)

    validated = run_stage("validate", params)
    tokenized = run_stage("tokenize", params)
    assert validated["train_records"] == src.bootstrap.train_records
    assert validated["eval_records"] == src.bootstrap.eval_records
    assert tokenized["train_examples"] == src.bootstrap.train_records
    assert read_json(params.report("validation.json"))["success"]
    cached = s3.cache_path(f"s3://{DATA}/raw/train.jsonl")
    assert sha256(cached) == sha256(raw / "train.jsonl")
    assert sha256(s3.cache_path(f"s3://{DATA}/models/base") / "model.safetensors") == sha256(
        base / "model.safetensors")

    # A changed object is downloaded again; an unchanged one is not.
    aws.put_object(Bucket=DATA, Key="raw/eval.jsonl", Body=(raw / "eval.jsonl").read_bytes()[:200])
    before = cached.stat().st_mtime_ns
    assert s3.local_path(f"s3://{DATA}/raw/eval.jsonl").read_bytes() == (raw / "eval.jsonl").read_bytes()[:200]
    assert s3.local_path(f"s3://{DATA}/raw/train.jsonl").stat().st_mtime_ns == before
    with pytest.raises(TunelineError, match=f"s3://{DATA}/raw/missing.jsonl: no such object"):
        s3.local_path(f"s3://{DATA}/raw/missing.jsonl")


def test_registry_artifact_location_on_s3_is_a_direct_store(aws, tmp_path):
    """registry.artifact_location: s3://... with a local tracking store: the client writes to S3 itself."""
    import mlflow

    from tuneline import tracking

    params = tiny_params(tmp_path, registry__artifact_location=f"s3://{ARTIFACTS}/direct")
    exp_id = tracking.setup(params)
    assert mlflow.get_experiment(exp_id).artifact_location == f"s3://{ARTIFACTS}/direct"
    (tmp_path / "note.txt").write_text("stored on S3\n")
    with mlflow.start_run(experiment_id=exp_id) as run:
        mlflow.log_artifact(str(tmp_path / "note.txt"))
    key = f"direct/{run.info.run_id}/artifacts/note.txt"
    assert aws.get_object(Bucket=ARTIFACTS, Key=key)["Body"].read() == b"stored on S3\n"


def test_dvc_push_to_s3_then_pull_in_a_fresh_clone_restores_the_data(aws, tmp_path, monkeypatch):
    import yaml
    from typer.testing import CliRunner

    from flows.cli import app
    from tuneline.dvc_data import dvc

    repo, clone = tmp_path / "repo", tmp_path / "clone"
    data = repo / "data" / "own"
    data.mkdir(parents=True)
    (data / "train.jsonl").write_text("".join(f'{{"prompt": "q{i}", "completion": "a{i}"}}\n' for i in range(500)))
    (data / "blob.bin").write_bytes(os.urandom(300_000))
    git("init", "-q", cwd=repo)
    dvc("init", "-q", repo=repo)
    dvc("remote", "add", "-d", "storage", f"s3://{DATA}/dvc", repo=repo)  # the endpoint: AWS_ENDPOINT_URL
    monkeypatch.chdir(repo)
    runner = CliRunner()
    pushed = runner.invoke(app, ["data", "push", "data/own"])
    assert pushed.exit_code == 0, pushed.output
    digest = yaml.safe_load((repo / "data" / "own.dvc").read_text())["outs"][0]["md5"]
    assert digest.endswith(".dir") and digest in pushed.output
    keys = [o["Key"] for o in aws.list_objects_v2(Bucket=DATA, Prefix="dvc/")["Contents"]]
    assert len(keys) == 3  # the two files and the folder's listing
    git("add", "-A", cwd=repo)
    git("commit", "-q", "-m", "data", cwd=repo)

    git("clone", "-q", str(repo), str(clone), cwd=tmp_path)
    assert not (clone / "data" / "own").exists()
    monkeypatch.chdir(clone)
    pulled = runner.invoke(app, ["data", "pull"])
    assert pulled.exit_code == 0, pulled.output
    for name in ("train.jsonl", "blob.bin"):
        assert sha256(clone / "data" / "own" / name) == sha256(data / name)

    from tuneline.dvc_data import push

    assert len(push(repo=clone)) == 32  # nothing new: pushes nothing, still names the data


def test_data_push_without_a_remote_says_so(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from flows.cli import app
    from tuneline.dvc_data import dvc

    git("init", "-q", cwd=tmp_path)
    dvc("init", "-q", repo=tmp_path)
    (tmp_path / "d.txt").write_text("x\n")
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["data", "push", "d.txt"])
    assert result.exit_code == 1 and "dvc push" in result.output and "remote" in result.output.lower()


def test_server_script_builds_the_command_from_the_environment():
    script = str(REPO / "mlflow" / "server.sh")
    base = {"PATH": os.environ["PATH"], "MLFLOW_SERVER_DRY_RUN": "1"}
    env = {**base, "PGHOST": "db.internal", "PGPASSWORD": "not-in-the-uri",
           "MLFLOW_ARTIFACTS_DESTINATION": "s3://bucket/mlflow"}
    out = subprocess.run(["bash", script], env=env, capture_output=True, text=True, check=True).stdout
    assert "--backend-store-uri postgresql+psycopg://mlflow@db.internal:5432/mlflow" in out
    assert "--artifacts-destination s3://bucket/mlflow --serve-artifacts" in out
    assert "not-in-the-uri" not in out and "--app-name" not in out
    auth = subprocess.run(["bash", script], env={**env, "MLFLOW_AUTH": "basic-auth",
                                                "MLFLOW_FLASK_SERVER_SECRET_KEY": "k"},
                          capture_output=True, text=True, check=True).stdout
    assert "--app-name basic-auth" in auth
    for missing, message in (({**base, "MLFLOW_ARTIFACTS_DESTINATION": "s3://b/m"}, "PGHOST"),
                             ({**base, "PGHOST": "db"}, "MLFLOW_ARTIFACTS_DESTINATION"),
                             ({**env, "MLFLOW_BACKEND_STORE_URI": "sqlite:///x.db"}, "postgresql")):
        proc = subprocess.run(["bash", script], env=missing, capture_output=True, text=True)
        assert proc.returncode != 0 and message in proc.stderr


def test_basic_auth_ini_holds_no_secret():
    import configparser

    config = configparser.ConfigParser()  # what mlflow.server.auth.config.read_auth_config reads
    assert config.read(REPO / "mlflow" / "basic_auth.ini")
    auth = config["mlflow"]
    assert "admin_password" not in auth and auth["admin_username"] == "admin"  # it comes from the env
    assert auth["database_uri"].startswith("postgresql") and auth["default_permission"] == "READ"
    assert auth["authorization_function"] == "mlflow.server.auth:authenticate_request_basic_auth"
    assert not (REPO / "mlflow" / "__init__.py").exists()  # never shadow the mlflow package


def test_jobs_database_on_postgresql_survives_a_new_connection(postgres):
    """The fine-tuning API's store (flows/jobs/store.py) on PostgreSQL: tables made, rows back in a new engine."""
    from flows.jobs.store import Store, now

    url = f"postgresql+psycopg://mlflow@{postgres['PGHOST']}:{postgres['PGPORT']}/mlflow"
    first = Store(url)
    first.add_file({"id": "file-1", "tenant": "acme", "filename": "t.jsonl", "purpose": "fine-tune", "bytes": 10,
                    "blob": "ab.jsonl", "format": "chat", "records": 1, "created_at": now()})
    first.add_job({"id": "ftjob-1", "tenant": "acme", "created_at": now(), "status": "queued", "model": "m",
                   "training_file": "file-1", "seed": 3, "metadata": {"team": "nlp"},
                   "method": {"type": "supervised"}, "cancel_requested": 0})
    first.add_event("ftjob-1", "queued")
    first.engine.dispose()
    again = Store(url)  # what a restarted API process opens
    assert again.job("acme", "ftjob-1")["metadata"] == {"team": "nlp"} and again.job("globex", "ftjob-1") is None
    assert again.tenant_bytes("acme") == 10 and [e["message"] for e in again.events("ftjob-1")] == ["queued"]


def test_api_uploads_go_to_s3_once_checked(aws):
    """jobs.files_dir on S3 (flows/jobs/files.py): an upload is checked, then one object per content hash; a
    process without the local copy fetches it; deleting removes the object."""
    from flows.jobs.files import FileStore
    from tuneline.config import Validate
    from tuneline.errors import DataError

    uri = f"s3://{DATA}/api-files"
    data = b'{"instruction": "Which word is a fruit?", "input": "pear dog", "output": "pear"}\n'
    store = FileStore(uri)
    with pytest.raises(DataError):
        store.put([data + b"{not json\n"], "bad.jsonl", 10_000, Validate())
    assert aws.list_objects_v2(Bucket=DATA, Prefix="api-files/")["KeyCount"] == 0  # a bad file never lands
    blob = store.put([data], "t.jsonl", 10_000, Validate())["blob"]
    assert store.location(blob) == f"{uri}/{blob}"
    assert aws.get_object(Bucket=DATA, Key=f"api-files/{blob}")["Body"].read() == data
    shutil.rmtree(store.root)  # another machine: no local copy
    assert FileStore(uri).path(blob).read_bytes() == data
    store.remove(blob)
    assert aws.list_objects_v2(Bucket=DATA, Prefix="api-files/")["KeyCount"] == 0
