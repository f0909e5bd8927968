"""`tuneline serve start`: the serving endpoint with the fine-tuning API on it, before any model is deployed.

Two Ray Serve applications beside the model's router (which deploy puts on `/`): `<app>-files` on
`/v1/files` and `<app>-fine-tuning` on `/v1/fine_tuning`. Serve sends a request to the application of
the longest prefix that matches its path, so chat and completions still reach the router, and a new
champion (serving/switch.py redeploys only the router and the version apps) leaves these two alone.
Their replicas reserve no CPU: they wait on the database and Prefect, while the model replicas compute.

Jobs run on Prefect: PREFECT_API_URL if set (a worker must serve `orchestration.work_pool` there), else
the project's own server and worker, started as `tuneline prefect up` does.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from ray import serve

from flows import local
from flows.jobs import tenants
from flows.jobs.api import bind, files_api, jobs_api
from tuneline.config import Params
from tuneline.errors import TunelineError

ROUTES = {"files": "/v1/files", "fine-tuning": "/v1/fine_tuning"}


def _bind_service(project: str, params_path: str, prefect_api_url: str, digests: dict[str, str],
                  background: bool) -> None:
    # Before Prefect is first imported in this replica: Prefect reads its settings then.
    os.environ["PREFECT_API_URL"] = prefect_api_url
    from flows.jobs.service import JobService

    bind(JobService(Path(project), Path(params_path), digests, background=background))


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=256)
@serve.ingress(files_api)
class FilesAPI:
    """/v1/files: uploads, listing, content, deletion."""

    def __init__(self, project: str, params_path: str, prefect_api_url: str, digests: dict[str, str]):
        _bind_service(project, params_path, prefect_api_url, digests, background=False)


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=256)
@serve.ingress(jobs_api)
class JobsAPI:
    """/v1/fine_tuning: jobs, their events and checkpoints; validates new jobs' files in the background."""

    def __init__(self, project: str, params_path: str, prefect_api_url: str, digests: dict[str, str]):
        _bind_service(project, params_path, prefect_api_url, digests, background=True)


def app_names(params: Params) -> dict[str, str]:
    return {part: f"{params.serving.app_name}-{part}" for part in ROUTES}


def _prefect(params: Params, project: Path) -> str:
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value() or local.up(params, project)["api_url"]


def start(params: Params, params_path: Path, project: Path | None = None, timeout: float = 180) -> dict:
    """Deploy the two API applications on the serving endpoint (starting Ray and Serve if needed)."""
    from serving import cluster

    project = (project or Path.cwd()).resolve()
    params_path = params_path if params_path.is_absolute() else project / params_path
    api_url = _prefect(params, project)
    digests = tenants.key_digests(params.jobs, project)
    cluster.connect(params)
    serve.start(http_options={"host": params.serving.host, "port": params.serving.port})
    args = (str(project), str(params_path), api_url, digests)
    names = app_names(params)
    serve.run_many([serve.RunTarget(FilesAPI.bind(*args), name=names["files"], route_prefix=ROUTES["files"]),
                    serve.RunTarget(JobsAPI.bind(*args), name=names["fine-tuning"],
                                    route_prefix=ROUTES["fine-tuning"])], wait_for_applications_running=False)
    _wait_running(list(names.values()), time.monotonic() + timeout)
    return {"endpoint": cluster.endpoint(params), "files": f"{cluster.endpoint(params)}/files",
            "fine_tuning": f"{cluster.endpoint(params)}/fine_tuning/jobs", "prefect": api_url,
            "tenants": len(set(digests.values())) or f"none configured: open, as tenant {tenants.OPEN_TENANT!r}"}


def _wait_running(apps: list[str], deadline: float) -> None:
    from ray.serve.schema import ApplicationStatus

    while True:
        states = {app: serve.status().applications.get(app) for app in apps}
        failed = {a: s for a, s in states.items() if s and s.status in (ApplicationStatus.DEPLOY_FAILED,
                                                                         ApplicationStatus.UNHEALTHY)}
        if failed:
            raise TunelineError("; ".join(f"{a} did not start: {s.message[-1500:] or s.status.value}"
                                          for a, s in failed.items()))
        if all(s and s.status == ApplicationStatus.RUNNING for s in states.values()):
            return
        if time.monotonic() > deadline:
            raise TunelineError(f"the fine-tuning API ({', '.join(apps)}) was not running in time")
        time.sleep(0.5)
