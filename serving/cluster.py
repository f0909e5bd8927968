"""The Ray cluster that serves: join the one configured or running here, or start a local one.

A cluster started here outlives the command that started it (that is the point of a
deployment); `tuneline serve stop` (control.py) is how it ends.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile

from tuneline.config import Params
from tuneline.errors import TunelineError

log = logging.getLogger("tuneline")

# A model replica needs one CPU; the second lets a new version start beside the old during a promotion
# (switch.py). The router reserves none.
LOCAL_CLUSTER_CPUS = 2


def endpoint(params: Params) -> str:
    """The OpenAI base URL of the served app, as a client on this machine reaches it."""
    host = params.serving.host
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    return f"http://{host}:{params.serving.port}/v1"


def auth_headers(params: Params) -> dict[str, str]:
    key = os.environ.get(params.serving.api_key_env) if params.serving.api_key_env else None
    return {"Authorization": f"Bearer {key}"} if key else {}


def ray_cli(*args: str) -> subprocess.CompletedProcess:
    """Run the `ray` CLI of this interpreter. Output goes to a file, not a pipe: the daemons that
    `ray start` leaves behind would otherwise hold the pipe open and hang this call."""
    cmd = [sys.executable, "-m", "ray.scripts.scripts", *args]
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                              timeout=180, check=False)
        out.seek(0)
        return subprocess.CompletedProcess(cmd, proc.returncode, out.read(), None)


def connect(params: Params, *, start: bool = True) -> bool:
    """Connect this process to the serving cluster: serving.ray_address, else the Ray that runs on this
    machine (Ray's "auto": the one `ray start` recorded, else any it finds), else one started here when
    `start` is set. False when there is none to connect to."""
    import ray

    if ray.is_initialized():
        return True
    address = params.serving.ray_address
    try:
        ray.init(address=address or "auto", log_to_driver=False, logging_level=logging.WARNING)
        return True
    except ConnectionError:
        if address:
            raise TunelineError(f"serving.ray_address: no Ray cluster answers at {address}") from None
        if not start:
            return False
    log.info(f"starting a local Ray cluster ({LOCAL_CLUSTER_CPUS} CPUs); `tuneline serve stop` ends it")
    proc = ray_cli("start", "--head", "--disable-usage-stats", "--include-dashboard=false",
                    f"--num-cpus={LOCAL_CLUSTER_CPUS}")
    if proc.returncode != 0:
        raise TunelineError(f"could not start a local Ray cluster ({' '.join(proc.args)}):\n"
                            f"{proc.stdout[-2000:]}")
    ray.init(address="auto", log_to_driver=False, logging_level=logging.WARNING)
    return True
