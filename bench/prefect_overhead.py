"""What Prefect costs: `tuneline run` as the flow vs the same stages without Prefect, and a cached re-run.

    .venv/bin/python bench/prefect_overhead.py              # tiny project (tests/conftest.py), 6-8 minutes
    .venv/bin/python bench/prefect_overhead.py --default    # the embedded default too (3 cold runs of ~5 min more)

Every figure is the wall time of one `tuneline run` command in a fresh process, as a user
sees it, in a project of its own under a temp folder:

- plain:  `tuneline run --no-prefect`, every stage from scratch (bootstrap included);
- flow:   `tuneline run` (the Prefect flow), every stage from scratch;
- cached: `tuneline run` again, every stage cached;
each flow figure twice: with Prefect's ephemeral server (no PREFECT_API_URL: `tuneline run` starts
a temporary one) and against a running `prefect server start` (what `tuneline prefect up` gives).

The gate rejects every candidate (gate.min_rouge_l: 1.0), so merge and deploy skip in every
run: they would add the same model registration and Ray start-up to both sides.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CODE: Path | None = None  # the snapshot of the code every measured command runs


def snapshot_code(base: Path) -> Path:
    """Copy the code the commands run (and the flow's cache keys hash) to `base/code`: an edit in
    the working tree during the bench neither breaks a run nor invalidates the cache under it."""
    import shutil

    code = base / "code"
    ignore = shutil.ignore_patterns("__pycache__")
    for name in ("tasks", "flows", "serving"):
        shutil.copytree(REPO / name, code / name, ignore=ignore)
    for name in ("dvc.yaml", "prefect.yaml"):
        shutil.copy2(REPO / name, code / name)
    return code


def env(home: Path, api_url: str | None = None) -> dict[str, str]:
    e = dict(os.environ)
    e["PATH"] = f"{Path(sys.executable).parent}:{e['PATH']}"
    if CODE is not None:
        e["PYTHONPATH"] = str(CODE)  # ahead of the editable install's finder
    for key in ("PREFECT_API_URL",):
        e.pop(key, None)
    e.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", HF_HUB_OFFLINE="1", TQDM_DISABLE="1",
             MLFLOW_DISABLE_TELEMETRY="true", TOKENIZERS_PARALLELISM="false")
    if api_url:
        e["PREFECT_API_URL"] = api_url
    return e


def project(base: Path, name: str, default: bool) -> Path:
    from conftest import tiny_params

    root = base / name
    root.mkdir()
    if default:
        tree = yaml.safe_load((REPO / "params.yaml").read_text())
        tree["gate"]["min_rouge_l"] = 1.0
        tree["serving"]["port"] = free_port()
    else:
        tree = tiny_params(root, gate__min_rouge_l=1.0, serving__port=free_port()).model_dump(mode="json",
                                                                                              by_alias=True)
    (root / "params.yaml").write_text(yaml.safe_dump(tree, sort_keys=False))
    return root


def timed_run(root: Path, e: dict[str, str], *args: str) -> tuple[float, bool]:
    """(wall seconds of the command, whether every stage came from the cache)."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "run", *args], cwd=root, env=e, capture_output=True,
                          text=True, timeout=3600)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"tuneline run {' '.join(args)} failed in {root}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    done = ([ln for ln in proc.stdout.splitlines() if ln.startswith("pipeline done")] or [""])[-1]
    inner = done.split("pipeline done in ", 1)[-1].split("s", 1)[0] if done else "?"
    ran = done.split("ran: ", 1)[-1].split(";", 1)[0] if "ran: " in done else "all"
    print(f"    {seconds:6.1f}s wall, {inner:>4}s in the pipeline  tuneline run {' '.join(args):12} ran: {ran}",
          flush=True)
    return seconds, ran == "none"


def cached_runs(root: Path, e: dict[str, str], repeat: int) -> float:
    """Median wall time of `repeat` fully cached runs. A run that re-ran a stage (its code changed under
    the bench, or an output moved) does not count; up to `repeat` such runs are tolerated."""
    times: list[float] = []
    for _ in range(2 * repeat):
        seconds, all_cached = timed_run(root, e)
        if all_cached:
            times.append(seconds)
        if len(times) == repeat:
            break
    if not times:
        sys.exit("no run was fully cached: is the code changing under the bench?")
    return statistics.median(times)


def start_server(home: Path) -> tuple[subprocess.Popen, str, float]:
    from flows.local import wait_healthy

    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    log = home / "server.log"
    home.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                                 "--port", str(port)], env={**env(home), "PREFECT_UI_ENABLED": "false"},
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    wait_healthy(url, 300, proc, log)
    return proc, url, time.perf_counter() - start


def decompose(url: str, root: Path) -> dict[str, float]:
    """Where the newest flow run on `url` spent its time: the stages' own work (timed inside the task
    body, persisted in its result) vs the tasks' wall time vs the flow run's: Prefect's share, load-proof."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import FlowRunSort
    from prefect.results import ResultRecord
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: url}), get_client(sync_client=True) as c:
        (flow_run,) = c.read_flow_runs(flow_run_filter=FlowRunFilter(state={"type": {"any_": ["COMPLETED"]}}),
                                       sort=FlowRunSort.START_TIME_DESC, limit=1)
        tasks = c.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id])))
    results = root / ".prefect-results"
    work = mlflow_open = 0.0
    for t in tasks:  # a fresh project: one result per stage, the one this run wrote
        stage = t.name.rsplit("-", 1)[0]
        newest = max(results.glob(f"tuneline-{stage}-*"), key=lambda f: f.stat().st_mtime, default=None)
        if newest is not None and t.state and t.state.name == "Completed":
            result = ResultRecord.deserialize(newest.read_bytes()).result
            work += float(result["seconds"])
            mlflow_open += float(result.get("mlflow_open_s", 0.0))
    task_wall = sum((t.end_time - t.start_time).total_seconds() for t in tasks if t.start_time and t.end_time)
    flow_wall = (flow_run.end_time - flow_run.start_time).total_seconds()
    return {"stages": len(tasks), "work": work, "mlflow_open": mlflow_open,
            "task_overhead": task_wall - work - mlflow_open, "flow_overhead": flow_wall - task_wall}


def bench(base: Path, label: str, default: bool, repeat: int) -> dict[str, float]:
    from flows.local import stop_process_group

    print(f"\n== {label} ==", flush=True)
    home = base / f"prefect-home-{label}"
    plain, _ = timed_run(project(base, f"{label}-plain", default), env(home), "--no-prefect")
    flow_root = project(base, f"{label}-flow", default)
    flow, _ = timed_run(flow_root, env(home))
    cached = cached_runs(flow_root, env(home), repeat)
    proc, url, startup = start_server(base / f"server-{label}")
    try:
        print(f"    {startup:6.1f}s  prefect server start (once)", flush=True)
        served_root = project(base, f"{label}-served", default)
        served_cold, _ = timed_run(served_root, env(home, url))
        parts = decompose(url, served_root)
        print(f"    in that run: {parts['work']:.1f}s of stage work, {parts['mlflow_open']:.1f}s opening the MLflow "
              f"run; Prefect: {parts['task_overhead']:.1f}s in the {parts['stages']} tasks (cache key, result, "
              f"states), {parts['flow_overhead']:.1f}s in the flow around them", flush=True)
        served = cached_runs(served_root, env(home, url), repeat)
    finally:
        stop_process_group(proc.pid)
    return {"plain": plain, "flow": flow, "cached": cached, "served_cold": served_cold, "served": served,
            "server_start": startup, **{f"part_{k}": v for k, v in parts.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--default", action="store_true", help="also measure the embedded default params")
    parser.add_argument("--repeat", type=int, default=3, help="cached re-runs per setting (median reported)")
    args = parser.parse_args()
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start", flush=True)
    results = {}
    global CODE
    with tempfile.TemporaryDirectory(prefix="tuneline-bench-") as tmp:
        base = Path(tmp)
        CODE = snapshot_code(base)
        results["tiny"] = bench(base, "tiny", False, args.repeat)
        if args.default:
            results["default"] = bench(base, "default", True, args.repeat)
    print(f"\nload average at end {os.getloadavg()[0]:.2f}")
    print("\nwall time of one `tuneline run` (median of the fully cached re-runs):\n")
    print("| params | plain (--no-prefect) | flow, ephemeral server | flow, running server "
          "| all cached, ephemeral | all cached, running server |")
    print("|---|---|---|---|---|---|")
    for label, r in results.items():
        def over(x: float, r=r) -> str:
            return f"{x:.1f}s ({x - r['plain']:+.1f}s, {(x - r['plain']) / r['plain']:+.0%})"
        print(f"| {label} | {r['plain']:.1f}s | {over(r['flow'])} | {over(r['served_cold'])} "
              f"| {r['cached']:.1f}s | {r['served']:.1f}s |")
    print(f"\n(`prefect server start` itself took {results['tiny']['server_start']:.1f}s, once.)")
    print("\nPrefect's share of a cold run against the running server (from the server's own timestamps):\n")
    print("| params | stage work | opening the MLflow run | Prefect in the tasks | Prefect in the flow, around them |")
    print("|---|---|---|---|---|")
    for label, r in results.items():
        print(f"| {label} | {r['part_work']:.1f}s | {r['part_mlflow_open']:.1f}s | {r['part_task_overhead']:.1f}s "
              f"({r['part_task_overhead'] / r['part_stages']:.2f}s a stage) | {r['part_flow_overhead']:.1f}s |")


if __name__ == "__main__":
    main()
