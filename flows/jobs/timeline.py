"""A job's events, checkpoints and estimated finish, gathered from where they are true: the API's own events
(the database), each stage's state (Prefect's task runs) and each logged training step (the job's folder)."""

from __future__ import annotations

import time
from typing import Any

from flows.jobs import results, runs
from tuneline.config import Params


def events(job: dict[str, Any], params: Params, stored: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Newest first. Stage lines (`stage train: Completed in 12.3s`) sit at the stage's end, the training
    steps between train's start and its end."""
    short = job["id"][6:18]
    timeline = [(e["created_at"], f"ftevent-{e['seq']}", e["level"], e["message"]) for e in stored]
    for task in runs.stage_runs(job["flow_run_id"]) if job["flow_run_id"] else []:
        stage, state = task.name.rsplit("-", 1)[0], task.state.name if task.state else "Pending"
        seconds = f" in {task.total_run_time.total_seconds():.1f}s" if task.end_time else ""
        level = "error" if state in ("Failed", "Crashed") else "info"
        message = f"stage {stage}: {state}{seconds}" + (f": {task.state.message}" if level == "error" else "")
        when = (task.end_time or task.start_time or task.created).timestamp()
        timeline.append((when, f"ftevent-{short}-{stage}-{state.lower()}", level, message))
        if stage == "train" and task.start_time:
            lines = results.health_lines(results.train_rows(params), params.train.loss_spike_factor)
            timeline += [(task.start_time.timestamp(), f"ftevent-{short}-train-{i}", lvl, line)
                         for i, (lvl, line) in enumerate(lines)]
    timeline.sort(key=lambda e: e[0])  # stable: at one instant, the order they were added
    return [{"id": id_, "object": "fine_tuning.job.event", "created_at": int(at), "level": level, "message": msg,
             "type": "message", "data": {}} for at, id_, level, msg in reversed(timeline)]


def checkpoints(job: dict[str, Any], params: Params) -> list[dict[str, Any]]:
    """Newest first: the steps training saved at, with their metrics."""
    if not job["flow_run_id"]:
        return []
    model = (job["result"] or {}).get("fine_tuned_model")
    return [{"id": f"ftckpt-{job['id'][6:18]}-{c['step']}", "object": "fine_tuning.job.checkpoint",
             "created_at": job["finished_at"] or int(time.time()), "fine_tuning_job_id": job["id"],
             "fine_tuned_model_checkpoint": f"{model}:step-{c['step']}" if model else None,
             "metrics": c["metrics"], "step_number": c["step"]}
            for c in results.checkpoints(params, results.train_rows(params))]


def estimated_finish(job: dict[str, Any], params: Params) -> int | None:
    """While training runs: its start plus its elapsed time over the share of steps done."""
    if job["status"] != "running":
        return None
    train = [r for r in runs.stage_runs(job["flow_run_id"]) if r.name.rsplit("-", 1)[0] == "train"]
    done = results.fraction_done(params, results.train_rows(params))
    if not train or not train[-1].start_time or not done:
        return None
    start = train[-1].start_time.timestamp()
    return int(start + (time.time() - start) / done)
