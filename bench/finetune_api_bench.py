"""The fine-tuning API's cost and behaviour under load, on the tiny project (tests/support/project.py).

    .venv/bin/python bench/finetune_api_bench.py                 # overhead + 20 concurrent jobs (~15 min)
    .venv/bin/python bench/finetune_api_bench.py --concurrent 0  # the overhead only

In a project of its own under a temp folder, with a Prefect server, `tuneline prefect up`'s worker and
the API of `tuneline serve start` (this process's own Ray):

1. overhead: bootstrap once, then `tuneline run --set serving.deploy=false` (validate..merge, as a job
   runs them), then a job through the `openai` client on the same data and params: the wall time from
   `jobs.create` to `succeeded`, against the `tuneline run` command's; the statuses the client saw;
2. load: N clients at once, from several tenants, each uploading its file and creating a job; every
   error counted; then every job followed to a final state.

One JSON line per measurement goes to bench/results/finetune_api_cpu.jsonl (appended).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from support.prefect_server import prefect_env, prefect_server  # noqa: E402
from support.project import tiny_params  # noqa: E402
from support.services import free_port  # noqa: E402

RESULTS = REPO / "bench" / "results" / "finetune_api_cpu.jsonl"
FINAL = {"succeeded", "failed", "cancelled"}
KEYS_ENV = "TUNELINE_BENCH_API_KEYS"


def record(**fields) -> None:
    line = {"bench": "finetune_api", "at": datetime.now(UTC).isoformat(timespec="seconds"), **fields}
    print(json.dumps(line))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with open(RESULTS, "a", encoding="utf-8") as f:
        f.write(json.dumps(line) + "\n")


def cli(*args: str, cwd: Path) -> float:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=cwd, env=prefect_env(),
                          capture_output=True, text=True, timeout=1800)
    if proc.returncode:
        raise SystemExit(f"tuneline {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start


def follow(client, job_id: str, timeout: float = 3600) -> tuple[object, list[str]]:
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if not seen or seen[-1] != job.status:
            seen.append(job.status)
        if job.status in FINAL:
            return job, seen
        time.sleep(0.5)
    raise SystemExit(f"{job_id}: not final after {timeout}s; seen {seen}")


def overhead(root: Path, client) -> None:
    run_s = cli("run", "--set", "serving.deploy=false", cwd=root)
    train = client.files.create(file=open(root / "data/raw/train.jsonl", "rb"), purpose="fine-tune")
    valid = client.files.create(file=open(root / "data/raw/eval.jsonl", "rb"), purpose="fine-tune")
    start = time.perf_counter()
    job = client.fine_tuning.jobs.create(training_file=train.id, validation_file=valid.id, model="tuneline-default")
    job, seen = follow(client, job.id)
    record(measure="overhead", tuneline_run_s=round(run_s, 1), job_s=round(time.perf_counter() - start, 1),
           job_status=job.status, statuses_seen=seen, fine_tuned_model=job.fine_tuned_model,
           note="tuneline run: validate..merge in-process against the up server; job: the same stages as a "
                "worker flow run of finetune/finetune-on-demand, plus file validation and polling every 0.5s")


def load(root: Path, endpoint: str, keys: dict[str, str], n: int) -> None:
    import openai

    tenants = list(keys)
    data = (root / "data/raw/train.jsonl").read_bytes()
    errors: list[str] = []

    def one(i: int):
        client = openai.OpenAI(base_url=endpoint, api_key=keys[tenants[i % len(tenants)]], max_retries=0)
        try:
            f = client.files.create(file=(f"train-{i}.jsonl", data), purpose="fine-tune")
            job = client.fine_tuning.jobs.create(training_file=f.id, model="tuneline-default", suffix=f"load-{i}")
            return client, job.id
        except openai.OpenAIError as e:
            errors.append(f"{i}: {type(e).__name__}: {e}")
            return None

    start = time.perf_counter()
    with ThreadPoolExecutor(n) as pool:
        created = [c for c in pool.map(one, range(n)) if c]
    create_s = time.perf_counter() - start
    finals = {}
    for client, job_id in created:
        job, _ = follow(client, job_id)
        finals[job.status] = finals.get(job.status, 0) + 1
    record(measure="concurrent", clients=n, tenants=len(tenants), errors=len(errors), error_samples=errors[:5],
           created=len(created), create_s=round(create_s, 1), final_states=finals,
           all_final_s=round(time.perf_counter() - start, 1))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--concurrent", type=int, default=20)
    ap.add_argument("--tenants", type=int, default=4)
    args = ap.parse_args()

    import openai
    from ray import serve

    from flows.jobs import serve_app

    root = Path(tempfile.mkdtemp(prefix="ftapi-bench-")) / "project"
    root.mkdir()
    keys = {f"tenant{i}": f"sk-{uuid.uuid4().hex}" for i in range(args.tenants)}
    per_tenant = max(2, -(-args.concurrent // args.tenants))
    params = tiny_params(root, serving__ray_address="local", serving__port=free_port(),
                         orchestration__results_dir=str(root / ".prefect-results"),
                         orchestration__work_pool=f"tuneline-bench-{uuid.uuid4().hex[:6]}",
                         orchestration__server_port=free_port(), jobs__keys_env=KEYS_ENV,
                         jobs__max_running_jobs=per_tenant, jobs__database_url=f"sqlite:///{root / 'jobs.db'}",
                         jobs__files_dir=str(root / "data/files"), jobs__jobs_dir=str(root / "jobs"))
    (root / "params.yaml").write_text(yaml.safe_dump(params.model_dump(mode="json", by_alias=True), sort_keys=False))
    os.environ[KEYS_ENV] = ",".join(f"{t}:{k}" for t, k in keys.items())
    with prefect_server(root.parent, params.orchestration.server_port):
        cli("prefect", "up", cwd=root)
        try:
            endpoint = serve_app.start(params, root / "params.yaml", root)["endpoint"]
            cli("stage", "bootstrap", cwd=root)
            overhead(root, openai.OpenAI(base_url=endpoint, api_key=keys["tenant0"]))
            if args.concurrent:
                load(root, endpoint, keys, args.concurrent)
        finally:
            serve.shutdown()
            cli("prefect", "down", cwd=root)


if __name__ == "__main__":
    main()
