"""The serving cluster: join or start the local Ray cluster, report on the app, stop it.

The deploy stage and `tuneline serve ...` share these. A cluster that deploy
starts outlives the command that started it (that is the point of a
deployment); `stop` is how it ends.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile

from tasks.atomic import read_json
from tasks.config import Params
from tasks.errors import TunelineError

log = logging.getLogger("tuneline")

# One replica needs one CPU; the second lets a new version start beside the old during a rolling update.
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


def _ray_cli(*args: str) -> subprocess.CompletedProcess:
    """Run the `ray` CLI of this interpreter. Output goes to a file, not a pipe: the daemons that
    `ray start` leaves behind would otherwise hold the pipe open and hang this call."""
    cmd = [sys.executable, "-m", "ray.scripts.scripts", *args]
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                              timeout=180, check=False)
        out.seek(0)
        return subprocess.CompletedProcess(cmd, proc.returncode, out.read(), None)


def connect(params: Params, *, start: bool = True) -> bool:
    """Connect this process to the serving cluster: the configured address, else the local cluster,
    started here when none runs and `start` is set. False when there is none to connect to."""
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
    proc = _ray_cli("start", "--head", "--disable-usage-stats", "--include-dashboard=false",
                    f"--num-cpus={LOCAL_CLUSTER_CPUS}")
    if proc.returncode != 0:
        raise TunelineError(f"could not start a local Ray cluster ({' '.join(proc.args)}):\n"
                            f"{proc.stdout[-2000:]}")
    ray.init(address="auto", log_to_driver=False, logging_level=logging.WARNING)
    return True


def _report(params: Params) -> dict:
    """What deploy last put in place: deploy.json, or the deployment a skipped deploy left running."""
    path = params.report("deploy.json")
    if not path.exists():
        return {}
    report = read_json(path)
    return report.get("current", {}) if report.get("skipped") else report


def status(params: Params) -> dict:
    """Whether the app answers at its endpoint, and which model and version deploy put there."""
    import httpx

    report = _report(params)
    url = report.get("endpoint") or endpoint(params)
    served = report.get("served_model")
    try:
        r = httpx.get(f"{url}/models", headers=auth_headers(params), timeout=5)
        # 401: the app is up but this shell lacks its key.
        running = r.status_code == 401 or (
            r.status_code == 200 and any(m.get("id") == served or served is None for m in r.json()["data"]))
    except (httpx.HTTPError, ValueError, KeyError):
        running = False
    return {"running": running, "endpoint": url, "app_name": params.serving.app_name, "served_model": served,
            "model_name": report.get("model_name"), "version": report.get("version"),
            "model_uri": report.get("model_uri")}


def stop(params: Params) -> dict:
    """Stop serving. On a local cluster: shut Serve down and stop the cluster. On a cluster named by
    serving.ray_address, which is not ours to stop: delete only this app. Nothing running is fine."""
    import ray
    from ray import serve

    try:
        if not connect(params, start=False):
            return {"stopped": False, "reason": "no Ray cluster is running"}
    except TunelineError as e:
        return {"stopped": False, "reason": str(e)}
    if params.serving.ray_address:
        if params.serving.app_name in serve.status().applications:
            serve.delete(params.serving.app_name)
        return {"stopped": True, "app": params.serving.app_name, "ray_stopped": False}
    serve.shutdown()
    ray.shutdown()
    proc = _ray_cli("stop")
    if proc.returncode != 0:
        raise TunelineError(f"`ray stop` failed:\n{proc.stdout[-2000:]}")
    return {"stopped": True, "app": params.serving.app_name, "ray_stopped": True}
