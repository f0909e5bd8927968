"""A real Prefect server for tests: `prefect server start` on a loopback port, its database in a temp folder."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from flows import local


def prefect_env(**extra: str) -> dict[str, str]:
    """This environment for Prefect subprocesses: offline, quiet, the venv's tools on PATH."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    env.update(HF_HUB_OFFLINE="1", TQDM_DISABLE="1", PREFECT_SERVER_ANALYTICS_ENABLED="false", **extra)
    return env


@contextmanager
def prefect_server(folder: Path, port: int, ui: bool = False) -> Iterator[str]:
    """A server (PREFECT_HOME and log in `folder`) that this process and its subprocesses talk to; its API URL.
    With `ui`, the UI is served too and pointed at this server's API."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    url = f"http://127.0.0.1:{port}/api"
    log = folder / "server.log"
    # PREFECT_API_URL also tells the UI where its API is (else it calls the default port, 4200).
    env = prefect_env(PREFECT_HOME=str(folder / "prefect-home"), PREFECT_UI_ENABLED=str(ui).lower(),
                      PREFECT_API_URL=url)
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                                 "--port", str(port)], env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        local.wait_healthy(url, 240, proc, log)
        with pytest.MonkeyPatch.context() as mp, temporary_settings({PREFECT_API_URL: url}):
            mp.setenv("PREFECT_API_URL", url)  # for the subprocesses: CLI, worker, flow runs
            mp.setenv("PREFECT_WORKER_QUERY_SECONDS", "1")
            yield url
    finally:
        _flush_to_server()
        local.stop_process_group(proc.pid)


def _flush_to_server(timeout_s: float = 60) -> None:
    """Send the logs and events that flows run in this process still hold, while their server answers. Left
    queued, Prefect sends them at interpreter exit to a server that is gone, and the test process then
    waits on them for half an hour after the last test."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for service in (APILogWorker, EventsWorker):
        service.drain_all(timeout=timeout_s, at_exit=False)


def tuneline_cli(*args: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """`tuneline ARGS` in `cwd` with prefect_env(), as a user's shell runs it; fails the test when it fails."""
    proc = subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=cwd, env=prefect_env(), capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"tuneline {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc
