"""The embedded Prefect: a local server, a process worker and the deployments of prefect.yaml.

`tuneline prefect up` starts both in the background (state, logs and the server's SQLite
database in `.prefect/` of the project) and registers the deployments; `tuneline prefect
down` stops them. While they run, `tuneline run` reports to that server too (unless
PREFECT_API_URL names another one); otherwise it uses Prefect's ephemeral server.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from flows.deployments import DEPLOYMENTS
from tuneline.config import Params
from tuneline.errors import TunelineError

REPO = Path(__file__).resolve().parent.parent
STATE_DIR = Path(".prefect")


def _prefect_cli() -> list[str]:
    return [sys.executable, "-m", "prefect"]


def prefect_file() -> Path:
    """The project's prefect.yaml: the working directory's, else the one beside this package."""
    here = Path("prefect.yaml")
    return here.resolve() if here.exists() else REPO / "prefect.yaml"


def state_dir(project: Path | None = None) -> Path:
    return (project or Path.cwd()).resolve() / STATE_DIR


def server_url(params: Params) -> str:
    o = params.orchestration
    return f"http://{o.server_host}:{o.server_port}/api"


def healthy(api_url: str, timeout: float = 2.0) -> bool:
    import httpx

    try:
        return httpx.get(f"{api_url}/health", timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


def wait_healthy(api_url: str, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if healthy(api_url):
            return
        if proc is not None and proc.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
            raise TunelineError(f"the Prefect server exited with code {proc.returncode}:\n{tail}")
        time.sleep(0.5)
    raise TunelineError(f"the Prefect server did not answer at {api_url}/health within {timeout:.0f}s")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_state(project: Path | None = None) -> dict:
    path = state_dir(project) / "state.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _write_state(state: dict, project: Path | None = None) -> None:
    path = state_dir(project) / "state.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")


def local_api_url(project: Path | None = None) -> str | None:
    """The URL of the server `tuneline prefect up` started for this project, if it still answers."""
    url = _read_state(project).get("api_url")
    return url if url and healthy(url, timeout=1.0) else None


@contextmanager
def prefect_api(project: Path | None = None) -> Iterator[str]:
    """For `tuneline run`: a configured PREFECT_API_URL, else this project's `up` server, else ephemeral.

    Prefect reads its settings once, at import: the local server is set as a temporary setting."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    configured = PREFECT_API_URL.value()
    if configured:
        yield configured
        return
    url = local_api_url(project)
    if url is None:
        # The ephemeral server is a subprocess that takes this environment: no telemetry calls home.
        os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        yield "ephemeral"
        return
    with temporary_settings({PREFECT_API_URL: url}):
        yield url


def prefect_env(api_url: str, project: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(PREFECT_API_URL=api_url, PREFECT_HOME=str(state_dir(project)))
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    return env


def _spawn(cmd: list[str], env: dict[str, str], log: Path, cwd: Path) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        # A session of its own: it outlives this command, and `down` stops its whole process group.
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def start_server(params: Params, project: Path, timeout: float = 180) -> tuple[str, int | None]:
    """Start `prefect server start` in the background unless one answers already; (api url, pid)."""
    url = server_url(params)
    if healthy(url):
        return url, None
    state = state_dir(project)
    log = state / "server.log"
    o = params.orchestration
    proc = _spawn([*_prefect_cli(), "server", "start", "--host", o.server_host, "--port", str(o.server_port)],
                  prefect_env(url, project), log, project)
    wait_healthy(url, timeout, proc, log)
    return url, proc.pid


def start_worker(params: Params, api_url: str, project: Path, extra_env: dict[str, str] | None = None,
                 run_once: bool = False) -> subprocess.Popen:
    """A process worker on orchestration.work_pool; its flow runs start in the project folder."""
    env = {**prefect_env(api_url, project), **(extra_env or {})}
    cmd = [*_prefect_cli(), "worker", "start", "--pool", params.orchestration.work_pool, "--type", "process"]
    if run_once:
        cmd.append("--run-once")
    return _spawn(cmd, env, state_dir(project) / "worker.log", project)


def ensure_work_pool(params: Params, api_url: str) -> None:
    """The process work pool, one flow run at a time (runs share the project's files)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.workers.process import ProcessWorker

    with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        try:
            client.create_work_pool(WorkPoolCreate(
                name=params.orchestration.work_pool, type="process", concurrency_limit=1,
                base_job_template=ProcessWorker.get_default_base_job_template(),
                description="Tuneline: runs the finetune flow in the project folder, one run at a time."))
        except ObjectAlreadyExists:
            pass


def deploy(params: Params, api_url: str, project: Path) -> str:
    """Register the deployments of prefect.yaml (`prefect deploy --all`), values from params."""
    ensure_work_pool(params, api_url)
    o = params.orchestration
    env = prefect_env(api_url, project)
    env.update(TUNELINE_PROJECT_DIR=str(project.resolve()), TUNELINE_WORK_POOL=o.work_pool,
               TUNELINE_RETRAIN_CRON=o.retrain_cron.strip(), TUNELINE_TIMEZONE=o.timezone)
    proc = subprocess.run([*_prefect_cli(), "--no-prompt", "deploy", "--all", "--prefect-file", str(prefect_file())],
                          cwd=project, env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise TunelineError(f"`prefect deploy --all` failed:\n{(proc.stdout + proc.stderr)[-4000:]}")
    return proc.stdout


def up(params: Params, project: Path | None = None) -> dict:
    """Server (unless one answers at orchestration.server_host:port), work pool, deployments, worker."""
    project = (project or Path.cwd()).resolve()
    state = _read_state(project)
    url, server_pid = start_server(params, project)
    if server_pid is None and state.get("api_url") == url:
        server_pid = state.get("server_pid")
    deploy(params, url, project)
    worker_pid = state.get("worker_pid")
    if not (worker_pid and _alive(worker_pid)):
        worker_pid = start_worker(params, url, project).pid
    _write_state({"api_url": url, "server_pid": server_pid, "worker_pid": worker_pid,
                  "work_pool": params.orchestration.work_pool}, project)
    return {"api_url": url, "ui": url.removesuffix("/api"), "server_pid": server_pid, "worker_pid": worker_pid,
            "work_pool": params.orchestration.work_pool, "deployments": ", ".join(DEPLOYMENTS)}


def _group_gone(pgid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        try:  # reap the leader if it is our child (tests); otherwise init does
            os.waitpid(pgid, os.WNOHANG)
        except ChildProcessError:
            pass
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.2)


def stop_process_group(pid: int, timeout: float = 15) -> bool:
    """Stop the process group that `_spawn` started (pid = its group id): SIGINT (what a Prefect
    worker shuts down on cleanly), then SIGTERM, then SIGKILL. False if it was not running."""
    if not _alive(pid):
        return False
    for sig, wait in ((signal.SIGINT, timeout), (signal.SIGTERM, timeout), (signal.SIGKILL, 5)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return True
        if _group_gone(pid, wait):
            return True
    return True


def down(project: Path | None = None) -> dict:
    """Stop the worker, then the server, that `up` started for this project."""
    state = _read_state(project)
    stopped = {}
    for key in ("worker_pid", "server_pid"):
        pid = state.get(key)
        stopped[key.removesuffix("_pid")] = bool(pid) and stop_process_group(pid)
    path = state_dir(project) / "state.json"
    path.unlink(missing_ok=True)
    return stopped


def status(params: Params, project: Path | None = None) -> dict:
    state = _read_state(project)
    url = state.get("api_url") or server_url(params)
    return {"api_url": url, "server": "up" if healthy(url) else "down",
            "worker": "running" if state.get("worker_pid") and _alive(state["worker_pid"]) else "not running",
            "work_pool": params.orchestration.work_pool, "state": str(state_dir(project) / "state.json")}
