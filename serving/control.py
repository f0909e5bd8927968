"""What `tuneline serve ...` and `tuneline promote` do: report on the served app, roll back, promote, stop.

The deploy stage reads `current_report` too. Switching versions is switch.py's; the cluster is cluster.py's.
"""

from __future__ import annotations

import logging

from serving import cluster, switch
from tuneline import registry
from tuneline.atomic import read_json, write_json
from tuneline.config import Params
from tuneline.errors import TunelineError

log = logging.getLogger("tuneline")


def current_report(params: Params) -> dict:
    """What serves, as deploy recorded it: deploy.json, or what a skipped or rolled-back deploy left serving."""
    path = params.report("deploy.json")
    if not path.exists():
        return {}
    report = read_json(path)
    return report.get("current", {}) if report.get("skipped") or report.get("rolled_back") else report


def status(params: Params) -> dict:
    """Whether the app answers at its endpoint, which version deploy put there and which one answers,
    and the serving metrics (GET /v1/metrics: requests, latency, time to first token, tokens/s, batches)."""
    import httpx

    report = current_report(params)
    url = report.get("endpoint") or cluster.endpoint(params)
    served = report.get("served_model")
    metrics: dict = {}
    try:
        r = httpx.get(f"{url}/models", headers=cluster.auth_headers(params), timeout=5)
        # 401: the app is up but this shell lacks its key.
        ids = [m.get("id") for m in r.json()["data"]] if r.status_code == 200 else []
        running = r.status_code == 401 or (r.status_code == 200 and (served is None or served in ids))
        if r.status_code == 200:
            m = httpx.get(f"{url}/metrics", headers=cluster.auth_headers(params), timeout=10)
            metrics = m.json() if m.status_code == 200 else {}
    except (httpx.HTTPError, ValueError, KeyError):
        running = False
    out = {"running": running, "endpoint": url, "app_name": params.serving.app_name, "served_model": served,
           "model_name": report.get("model_name"), "version": report.get("version"),
           "model_uri": report.get("model_uri"), "previous_version": report.get("previous_version"),
           "serving_version": metrics.get("version")}
    if metrics:
        keep = ("requests", "requests_by_status", "streams", "completion_tokens", "latency_s", "ttft_s",
                "tokens_per_s", "batches", "batch_size", "since")
        out["metrics"] = {k: metrics[k] for k in keep if k in metrics}
    return out


def _serve_version(params: Params, report: dict, name: str, version: str, action: str) -> dict:
    """Serve registered `version` the zero-downtime way deploy does (serving/switch.py): it starts beside
    what serves, loaded from the registry, is health-checked, takes the traffic; then deploy.json records
    it and the `champion` alias moves to it. If it fails, what served keeps serving and the alias stays."""

    uri = f"models:/{name}/{version}"
    served = report.get("served_model") or name
    try:
        outcome = switch.promote(params, served, version, uri)
    except switch.PromotionFailed as e:
        still = f"version {e.serving_version} keeps serving" if e.serving_version else "nothing serves now"
        raise TunelineError(f"{action} to version {version} failed: {e.reason}\n{still}; the champion alias "
                            "is unchanged") from None
    new = {**report, "endpoint": cluster.endpoint(params), "model_name": name, "served_model": served,
           "version": version,
           "model_uri": uri, "app": outcome["app"], "previous_version": outcome["previous_version"]}
    write_json(params.report("deploy.json"), new)
    registry.make_champion(params, name, version)
    log.info(f"{action}: version {version} serves (was {outcome['previous_version'] or 'nothing'}); "
             f"alias champion -> {version}")
    return new


def rollback(params: Params) -> dict:
    """Put the previous champion back (see _serve_version); deploy.json remembers which version it replaced."""
    report = current_report(params)
    current, previous = report.get("version"), report.get("previous_version")
    if not report or not previous:
        raise TunelineError(f"{params.report('deploy.json')}: no previous champion recorded (deploy has promoted "
                            "at most one version here): nothing to roll back to")
    new = _serve_version(params, {**report, "rolled_back_from": current},
                         report.get("model_name") or params.registry.model_name, str(previous), "rollback")
    return {"version": new["version"], "rolled_back_from": current, "endpoint": new["endpoint"]}


def promote(params: Params, version: str) -> dict:
    """Serve a registered version chosen by a person, a number or an alias (e.g. `challenger`, the last
    one merge registered), and make it the champion (see _serve_version). The gate is not asked: this is
    the manual override; deploy is the gated way."""
    from mlflow.exceptions import MlflowException


    report = current_report(params)
    report.pop("rolled_back_from", None)
    name = report.get("model_name") or params.registry.model_name
    c = registry.client(params)
    try:
        found = (c.get_model_version(name, version) if version.isdigit()
                 else c.get_model_version_by_alias(name, version))
    except MlflowException as e:
        raise TunelineError(f"promote {version}: the registry ({params.registry.tracking_uri}) has no version or "
                            f"alias {version!r} of {name}: {e.message}") from None
    number = str(found.version)
    if str(report.get("version")) == number:
        return {"version": number, "unchanged": "already serving", "endpoint": report.get("endpoint")}
    new = _serve_version(params, report, name, number, "promote")
    return {"version": number, "previous_version": new["previous_version"], "endpoint": new["endpoint"]}


def stop(params: Params) -> dict:
    """Stop serving. On a local cluster: shut Serve down and `ray stop`, which ends every Ray process of
    this user on this machine. On a cluster named by serving.ray_address, which is not ours to stop:
    delete only this app (the router and its model versions). Nothing running is fine."""
    import ray
    from ray import serve

    app = params.serving.app_name
    try:
        running = cluster.connect(params, start=False)
    except TunelineError as e:
        running, reason = False, str(e)
    else:
        reason = "no Ray cluster is running"
    if not running:
        log.info(f"nothing to stop: {reason}")
        return {"stopped": False, "reason": reason}
    if params.serving.ray_address:
        apps = serve.status().applications
        for name in [app] + [n for n in apps if n.startswith(f"{app}-v")]:
            if name in apps:
                serve.delete(name)
        log.info(f"deleted app {app!r} and its model versions; the Ray cluster at {params.serving.ray_address} "
                 "keeps running")
        return {"stopped": True, "app": app, "ray_stopped": False}
    serve.shutdown()
    ray.shutdown()
    proc = cluster.ray_cli("stop")
    if proc.returncode != 0:
        raise TunelineError(f"`ray stop` failed:\n{proc.stdout[-2000:]}")
    log.info("stopped Ray Serve and the local Ray cluster")
    return {"stopped": True, "app": app, "ray_stopped": True}
