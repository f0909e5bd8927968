"""Zero-downtime promotion on Ray Serve: a new model version goes live beside the old one.

The layout on the cluster (serving/builders.py builds the pieces):

- one application per model version, `{serving.app_name}-v{N}` (a ModelServer; no HTTP route),
- the router application `{serving.app_name}` on the public route `/`, whose config names the
  version application that gets the traffic.

`promote` takes a version live in five steps:

1. candidate: deploy `{app}-v{N}` beside what serves, wait until Serve says RUNNING;
2. health check: one real generation through the candidate's deployment handle;
3. switch: redeploy the router with the candidate as its target. Serve starts the new router
   replicas beside the old ones (max_surge_percent=100) and sends requests to them only once they
   run; the old router replicas get no new requests and finish the ones they hold (graceful
   shutdown, streams included). Every request is served whole by one version; none is refused;
4. verify: a generation through the public route answers from the new version (response header);
5. retire: once no old router replica is left, delete the old version's application (its
   replicas finish whatever they still hold first).

A failure in 1-2 deletes the candidate: nothing else was touched. A failure in 3-4 points the
router back at the old version. Either way `PromotionFailed` says what serves now.
"""

from __future__ import annotations

import logging
import time

from serving import cluster
from serving.api import VERSION_HEADER
from tuneline.config import Params
from tuneline.errors import TunelineError

log = logging.getLogger("tuneline")

HEALTH_PROMPT = "Hello"
POLL_S = 0.5


class PromotionFailed(TunelineError):
    """The candidate did not go live; `serving_version` still serves (None: nothing did before)."""
    def __init__(self, reason: str, serving_version: str | None):
        super().__init__(reason)
        self.reason, self.serving_version = reason, serving_version


def version_apps(params: Params) -> list[str]:
    """The model-version applications of this app on the cluster."""
    from ray import serve

    prefix = f"{params.serving.app_name}-v"
    return [name for name in serve.status().applications if name.startswith(prefix)]


def router_info(params: Params) -> dict:
    """What the router holds: {"active_app", "version", "served_name", "fine_tuned", "tenant_keys"}; {} if none."""
    from ray import serve

    app = params.serving.app_name
    if app not in serve.status().applications:
        return {}
    try:
        return serve.get_app_handle(app).info.remote().result(timeout_s=30)
    except Exception as e:  # noqa: BLE001 - an app of another layout, or one that is down: no router to keep
        log.warning(f"[deploy] app {app!r} does not answer as a Tuneline router ({type(e).__name__}); replacing it")
        return {}


def live(params: Params) -> dict | None:
    """Where the router sends traffic now: {"active_app", "version", "served_name", ...}, or None."""
    info = router_info(params)
    return info if info.get("active_app") else None


def _beside(info: dict) -> dict:
    """The router config that a switch of the champion keeps: the fine-tuned models and their tenants' keys."""
    return {key: info[key] for key in ("fine_tuned", "tenant_keys") if info.get(key)}


def _app_status(app: str):
    from ray import serve

    return serve.status().applications.get(app)


def _cause(status) -> str:
    """The gist of a failed app's messages: per deployment, the last line of the traceback Serve keeps."""
    causes = []
    for name, dep in status.deployments.items():
        lines = [line.strip() for line in (dep.message or "").splitlines() if line.strip()]
        if lines:
            causes.append(f"{name}: {lines[-1][-1000:]}")
    return "; ".join(causes) or status.message[-1000:]


def _wait_running(app: str, deadline: float, what: str) -> None:
    from ray.serve.schema import ApplicationStatus

    while time.monotonic() < deadline:
        status = _app_status(app)
        if status is not None and status.status == ApplicationStatus.RUNNING:
            return
        if status is not None and status.status in (ApplicationStatus.DEPLOY_FAILED, ApplicationStatus.UNHEALTHY):
            raise TunelineError(f"{what} did not start (Serve: {status.status.value}): {_cause(status)}")
        time.sleep(POLL_S)
    raise TunelineError(f"{what} was not running within serving.health_timeout_s")


def _remaining(deadline: float) -> float:
    return max(1.0, deadline - time.monotonic())


def health_check(app: str, deadline: float) -> float:
    """One real generation through the candidate's handle, bypassing HTTP; returns its latency."""
    from ray import serve

    from serving.model_server import MODEL_DEPLOYMENT

    spec = {"kind": "completion", "prompt": HEALTH_PROMPT, "max_tokens": 4, "temperature": 0.0, "top_p": 1.0,
            "stop": [], "seed": 0, "ignore_eos": False}
    start = time.perf_counter()
    try:
        result = serve.get_deployment_handle(MODEL_DEPLOYMENT, app).generate.remote(spec).result(
            timeout_s=_remaining(deadline))
    except Exception as e:  # noqa: BLE001 - whatever broke, the candidate is not fit to serve
        raise TunelineError(f"health check of {app!r} failed: {type(e).__name__}: {str(e)[-1000:]}") from None
    if "error" in result:
        raise TunelineError(f"health check of {app!r} failed: {result['error']['message']}")
    if result.get("completion_tokens", 0) < 1:
        raise TunelineError(f"health check of {app!r} failed: no token generated")
    return time.perf_counter() - start


def _verify_public(params: Params, version: str, deadline: float) -> None:
    """A generation through the public route, answered by `version` (the router's response header)."""
    import httpx

    url, last = f"{cluster.endpoint(params)}/completions", "no answer"
    body = {"prompt": HEALTH_PROMPT, "max_tokens": 2, "temperature": 0}
    while time.monotonic() < deadline:
        try:
            r = httpx.post(url, json=body, headers=cluster.auth_headers(params), timeout=_remaining(deadline))
            answered = r.headers.get(VERSION_HEADER)
            if r.status_code == 200 and answered == version:
                return
            last = f"HTTP {r.status_code} from version {answered!r}: {r.text[:300]}"
        except httpx.HTTPError as e:
            last = f"{type(e).__name__}: {e}"
        time.sleep(POLL_S)
    raise TunelineError(f"the public route {url} did not answer from version {version} within "
                        f"serving.health_timeout_s (last: {last})")


def _settled(app: str, deployment: str) -> bool:
    """The router application runs, and every router replica of it is a RUNNING one (none draining)."""
    from ray.serve.schema import ApplicationStatus

    status = _app_status(app)
    if status is None or status.status != ApplicationStatus.RUNNING:
        return False
    dep = status.deployments.get(deployment)
    return dep is not None and all(state == "RUNNING" for state, n in dep.replica_states.items() if n)


def _deploy(app, name: str, route_prefix: str | None) -> None:
    from ray import serve

    # Not serve.run: it waits without a limit, and an app whose replica cannot be placed waits forever.
    serve.run_many([serve.RunTarget(app, name=name, route_prefix=route_prefix)], wait_for_applications_running=False)


def _delete(name: str) -> None:
    from ray import serve

    if name in serve.status().applications:
        serve.delete(name, _blocking=True)


def _router_app(params: Params, served_name: str, active_app: str | None, version: str | None, **beside):
    from serving.builders import build_router_app

    return build_router_app(served_name, params.serving, active_app, version, **beside)


def _check_key(params: Params) -> None:
    env = params.serving.api_key_env
    if env and not cluster.auth_headers(params):
        raise TunelineError(f"serving.api_key_env is {env!r}, but ${env} is not set in this shell: export it, "
                            "so that the router keeps requiring the key")


def promote(params: Params, served_name: str, version: str, model_uri: str) -> dict:
    """Take `model_uri` (registered version `version`) live on the public route without downtime.

    Returns {"app", "previous_version", "previous_app", "health_check_s", "switch_s"}; raises
    PromotionFailed when the candidate did not go live (what served before still does)."""
    # Ray Serve's app modules load here, when versions switch: `tuneline serve status` needs none of them.
    from ray import serve

    from serving.builders import absolute_tracking_uri, build_model_app
    from serving.model_server import DRAIN_TIMEOUT_S
    from serving.router import ROUTER_DEPLOYMENT

    cfg = params.serving
    _check_key(params)
    deadline = time.monotonic() + cfg.health_timeout_s
    cluster.connect(params)
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    info = router_info(params)
    current, beside = (info if info.get("active_app") else None), _beside(info)
    serving_version = current["version"] if current else None
    candidate = f"{cfg.app_name}-v{version}"
    if current and current["active_app"] == candidate:  # a re-deploy of what serves: a second slot beside it
        candidate += "-b"

    # 1-2: the candidate beside what serves, then a real generation through its handle.
    log.info(f"[deploy] starting {candidate} ({model_uri}) beside "
             f"{current['active_app'] if current else 'nothing'}")
    try:
        _deploy(build_model_app(model_uri, params.data.template, cfg,
                                absolute_tracking_uri(params.registry.tracking_uri)), candidate, None)
        _wait_running(candidate, deadline, f"model version {version} ({candidate})")
        latency = health_check(candidate, deadline)
    except TunelineError as e:
        _delete(candidate)
        raise PromotionFailed(str(e), serving_version) from None
    log.info(f"[deploy] {candidate} passed its health check in {latency:.2f}s; switching traffic")

    # 3-4: the router points at the candidate (old router replicas drain), then the public route proves it.
    switch_start = time.monotonic()
    try:
        _deploy(_router_app(params, served_name, candidate, version, **beside), cfg.app_name, "/")
        _wait_running(cfg.app_name, deadline, f"the router ({cfg.app_name})")
        _verify_public(params, version, deadline)
    except TunelineError as e:
        reason = f"switching traffic to {candidate} failed: {e}"
        try:
            if current or beside.get("fine_tuned"):  # back to what the router held: a champion, fine-tuned models
                _deploy(_router_app(params, served_name, info.get("active_app"), info.get("version"), **beside),
                        cfg.app_name, "/")
                _wait_running(cfg.app_name, time.monotonic() + cfg.health_timeout_s, "the router, switched back")
            else:
                _delete(cfg.app_name)
        except TunelineError as back:
            reason += f"; switching back failed too: {back}"
            serving_version = None
        _delete(candidate)
        raise PromotionFailed(reason, serving_version) from None
    switch_s = time.monotonic() - switch_start

    # 5: the old version goes once no old router replica can still send it a request.
    drain_deadline = time.monotonic() + DRAIN_TIMEOUT_S + 30
    while not _settled(cfg.app_name, ROUTER_DEPLOYMENT) and time.monotonic() < drain_deadline:
        time.sleep(POLL_S)
    for app in version_apps(params):
        if app != candidate:
            log.info(f"[deploy] retiring {app}")
            _delete(app)
    log.info(f"[deploy] version {version} serves on / (switch took {switch_s:.1f}s)")
    return {"app": candidate, "previous_version": serving_version,
            "previous_app": current["active_app"] if current else None,
            "health_check_s": round(latency, 3), "switch_s": round(switch_s, 2)}


def serve_beside(params: Params, name: str, version: str, model_uri: str, tenant: str,
                 tenant_keys: dict[str, str]) -> str:
    """Serve registered `model_uri` as model `name` of `tenant` beside the champion, which keeps serving.

    The version starts as an application of its own (`{app}-ft-<name>`), must answer a real generation,
    then the router is redeployed with it added (the champion's traffic moves over to the new router
    replicas as in a switch); with no champion yet, the router serves the fine-tuned models alone.
    Returns the application's name; TunelineError if it did not start (then it is removed)."""
    from serving.builders import absolute_tracking_uri, build_model_app

    cfg = params.serving
    deadline = time.monotonic() + cfg.health_timeout_s
    cluster.connect(params)
    app = f"{cfg.app_name}-ft-{name.replace(':', '-')}"
    try:
        _deploy(build_model_app(model_uri, params.data.template, cfg,
                                absolute_tracking_uri(params.registry.tracking_uri)), app, None)
        _wait_running(app, deadline, f"fine-tuned model {name} ({app})")
        health_check(app, deadline)
    except TunelineError:
        _delete(app)
        raise
    info = router_info(params)
    fine_tuned = {**info.get("fine_tuned", {}), name: {"app": app, "tenant": tenant, "version": version}}
    _deploy(_router_app(params, info.get("served_name") or params.registry.model_name, info.get("active_app"),
                        info.get("version"), fine_tuned=fine_tuned, tenant_keys=tenant_keys), cfg.app_name, "/")
    _wait_running(cfg.app_name, deadline, f"the router ({cfg.app_name}) with {name} beside")
    log.info(f"[serve] fine-tuned model {name} serves beside {info.get('active_app') or 'no champion'}")
    return app
