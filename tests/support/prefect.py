"""A real Prefect server for tests: `prefect server start` on a free loopback port, its home in a temp folder."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from flows import local


def service_env(**extra: str) -> dict[str, str]:
    """This interpreter's tools first on PATH, no hub, no progress bars, no telemetry."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    env.update(HF_HUB_OFFLINE="1", TQDM_DISABLE="1", PREFECT_SERVER_ANALYTICS_ENABLED="false", **extra)
    return env


@contextmanager
def prefect_server(folder: Path, port: int) -> Iterator[str]:
    """The server's API URL, also set as PREFECT_API_URL for this process and the subprocesses it starts."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    url = f"http://127.0.0.1:{port}/api"
    log = folder / "prefect-server.log"
    env = service_env(PREFECT_HOME=str(folder / "prefect-home"), PREFECT_UI_ENABLED="false")
    env.pop("PREFECT_API_URL", None)
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                                 "--port", str(port)], env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        local.wait_healthy(url, 240, proc, log)
        with pytest.MonkeyPatch.context() as mp, temporary_settings({PREFECT_API_URL: url}):
            mp.setenv("PREFECT_API_URL", url)
            mp.setenv("PREFECT_WORKER_QUERY_SECONDS", "1")
            yield url
    finally:
        local.stop_process_group(proc.pid)
