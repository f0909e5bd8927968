"""Local servers for tests: each in a session of its own on a free loopback port, stopped with its group."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

# Below the kernel's ephemeral ports (32768 and up: other processes' bind(0) and outgoing connections take
# them, so one found free there can be gone before our server binds it; a test run lost a Serve proxy's port
# so) and above Ray's worker ports (10002-19999).
PORTS = range(20000, 32768)
_given: set[int] = set()


def free_port() -> int:
    """A loopback port that no process holds now and no earlier call of this run returned."""
    for port in random.sample(PORTS, 200):
        if port in _given:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _given.add(port)
        return port
    raise RuntimeError(f"no free port in {PORTS}")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{url}: the server exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    pytest.fail(f"{url}: not up after {timeout}s:\n{log.read_text()[-3000:]}")


class Service:
    """A server process in its own session: stopping it signals its whole group and no one else."""

    def __init__(self, name: str, cmd: list[str], log: Path, env: dict[str, str] | None = None):
        self.name, self.log = name, log
        self.proc = subprocess.Popen(cmd, stdout=open(log, "wb"), stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)

    def stop(self) -> None:
        for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(wait)
                time.sleep(0.2)  # the group's children go down with their parent
            except subprocess.TimeoutExpired:
                continue
            try:
                os.killpg(self.proc.pid, 0)
            except ProcessLookupError:
                return


def git(*args: str, cwd: Path) -> None:
    subprocess.run(["git", "-c", "user.name=tuneline-test", "-c", "user.email=test@tuneline.invalid", *args],
                   cwd=cwd, check=True, capture_output=True)
