"""Stage 7, deploy: serve the version that merge registered, and make it the champion.

A `reject` from the gate is an outcome, not a failure: deploy then leaves the
running deployment alone and says why. Otherwise the merged model goes live on
Ray Serve (joining or starting the cluster), must answer one real generation
over HTTP, and only then does the registry's `champion` alias move to it.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from tasks import serve_control, tracking
from tasks.atomic import read_json, write_json
from tasks.config import Params
from tasks.errors import TunelineError

log = logging.getLogger("tuneline")

CHAMPION_ALIAS = "champion"
MERGE_KEYS = ("model_name", "version", "model_dir", "model_uri")


def _read_report(params: Params, name: str, stage: str) -> dict:
    path = params.report(name)
    if not path.exists():
        raise TunelineError(f"{path}: not found; run the {stage} stage first")
    return read_json(path)


def _skip(params: Params, gate: dict) -> dict:
    reasons = "; ".join(map(str, gate.get("reasons") or []))
    reason = f"gate decision is {gate.get('decision')!r}" + (f": {reasons}" if reasons else "")
    report: dict = {"skipped": True, "reason": reason}
    previous = params.report("deploy.json")
    if previous.exists():
        # The champion keeps serving: remember what that is, so `serve status` can still tell.
        old = read_json(previous)
        current = old.get("current") if old.get("skipped") else old
        if current:
            report["current"] = current
    write_json(previous, report)
    log.info(f"[deploy] skipped: {reason}; the running deployment, if any, is unchanged")
    return {"skipped": True}


def _wait_running(app_name: str, deadline: float) -> None:
    from ray import serve
    from ray.serve.schema import ApplicationStatus

    while time.monotonic() < deadline:
        app = serve.status().applications.get(app_name)
        if app is not None and app.status == ApplicationStatus.RUNNING:
            return
        if app is not None and app.status == ApplicationStatus.DEPLOY_FAILED:
            raise TunelineError(f"Ray Serve could not deploy app {app_name!r}:\n{app.message[-3000:]}")
        time.sleep(1)
    raise TunelineError(f"app {app_name!r} was not running within serving.health_timeout_s")


def _health_check(params: Params, url: str, served: str, deadline: float) -> float:
    """One real generation over HTTP; returns its latency in seconds."""
    import httpx

    body = {"model": served, "prompt": "Hello", "max_tokens": 4, "temperature": 0}
    last = "no answer"
    while time.monotonic() < deadline:
        start = time.perf_counter()
        try:
            r = httpx.post(f"{url}/completions", json=body, headers=serve_control.auth_headers(params),
                           timeout=max(1.0, deadline - time.monotonic()))
            if r.status_code == 200 and r.json()["usage"]["completion_tokens"] > 0:
                return time.perf_counter() - start
            last = f"HTTP {r.status_code}: {r.text[:500]}"
        except (httpx.HTTPError, ValueError, KeyError) as e:
            last = f"{type(e).__name__}: {e}"
        time.sleep(1)
    raise TunelineError(f"health check failed: no completion from {url}/completions within "
                        f"{params.serving.health_timeout_s:.0f}s (last: {last}). If Serve was already running "
                        "with another serving.host/port, run `tuneline serve stop` and deploy again.")


def _serve(params: Params, model_dir: Path, served: str) -> float:
    """Run the app on the cluster and wait for a generation through its HTTP endpoint."""
    from ray import serve

    from serving.app import build_app

    cfg = params.serving
    deadline = time.monotonic() + cfg.health_timeout_s
    serve_control.connect(params)
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    app = build_app(str(model_dir), served, params.data.template, cfg.max_tokens_limit, cfg.max_prompt_tokens,
                    cfg.api_key_env)
    # Not serve.run: it waits without a limit, and an app whose replica cannot be placed waits forever.
    serve.run_many([serve.RunTarget(app, name=cfg.app_name, route_prefix="/")],
                   wait_for_applications_running=False)
    _wait_running(cfg.app_name, deadline)
    return _health_check(params, serve_control.endpoint(params), served, deadline)


def _promote(params: Params, model_name: str, version: str) -> None:
    import mlflow
    from mlflow.exceptions import MlflowException

    tracking.setup(params)
    try:
        mlflow.MlflowClient().set_registered_model_alias(model_name, CHAMPION_ALIAS, version)
    except MlflowException as e:
        raise TunelineError(f"serving {model_name} v{version}, but could not move the "
                            f"'{CHAMPION_ALIAS}' alias to it: {e}") from None


def _log_to_run(params: Params, report: dict, latency: float) -> None:
    import mlflow

    if tracking.current_run_id(params) is None:
        log.info("[deploy] no pipeline MLflow run to log to (train did not record one)")
        return
    with tracking.pipeline_run(params):
        # Tags, not params: a re-deploy in the same run may change them, and params are write-once.
        mlflow.set_tags({f"deploy.{k}": v for k, v in report.items()})
        mlflow.log_metric("deploy.health_check_s", latency)


def run(params: Params) -> dict:
    gate = _read_report(params, "gate.json", "gate")
    if gate.get("decision") != "promote":
        return _skip(params, gate)

    merge = _read_report(params, "merge.json", "merge")
    missing = [k for k in MERGE_KEYS if not merge.get(k)]
    if missing:
        raise TunelineError(f"{params.report('merge.json')}: missing {', '.join(missing)}; "
                            "re-run the merge stage")
    model_name, version = merge["model_name"], str(merge["version"])
    model_dir = Path(merge["model_dir"]).resolve()
    if not (model_dir / "config.json").exists():
        raise TunelineError(f"{model_dir}: no merged model here (no config.json); re-run the merge stage")

    served = model_name
    latency = _serve(params, model_dir, served)
    _promote(params, model_name, version)
    report = {"endpoint": serve_control.endpoint(params), "model_name": model_name, "version": version,
              "served_model": served, "model_uri": merge["model_uri"]}
    write_json(params.report("deploy.json"), report)
    _log_to_run(params, report, latency)
    return {"endpoint": report["endpoint"], "model_name": model_name, "version": version,
            "health_check_s": round(latency, 3)}


if __name__ == "__main__":
    from tasks.stage import main

    main("deploy")
