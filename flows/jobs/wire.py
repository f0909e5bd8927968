"""The OpenAI wire format of the fine-tuning API: errors, pages, file and job objects, the job's `method`."""

from __future__ import annotations

from typing import Any

from serving.api import APIError
from tuneline.errors import TunelineError

HYPERPARAMETERS = {"supervised": ("n_epochs", "batch_size", "learning_rate_multiplier"),
                   "dpo": ("n_epochs", "batch_size", "learning_rate_multiplier", "beta")}
INTEGERS = ("n_epochs", "batch_size")


class APIProblem(TunelineError, APIError):
    """A request the API refuses: an HTTP status and an OpenAI error body (serving.api.APIError's), and a
    TunelineError, so that the same checks can refuse a job's files outside a request."""


def not_found(what: str, id_: str, param: str | None = None) -> APIProblem:
    # The same answer whether the id does not exist or belongs to another tenant: no id leaks.
    return APIProblem(404, f"no {what} with id {id_!r}", param, f"{what.replace(' ', '_').replace('-', '_')}_not_found")


def page(items: list[dict[str, Any]], after: str | None, limit: int) -> dict[str, Any]:
    """OpenAI's cursor page: the items after the one with id `after`, at most `limit` of them."""
    if after is not None:
        ids = [item["id"] for item in items]
        items = items[ids.index(after) + 1:] if after in ids else []
    return {"object": "list", "data": items[:limit], "has_more": len(items) > limit}


def file_object(row: dict[str, Any]) -> dict[str, Any]:
    return {"id": row["id"], "object": "file", "bytes": row["bytes"], "created_at": row["created_at"],
            "filename": row["filename"], "purpose": row["purpose"], "status": "processed", "status_details": None}


def job_object(job: dict[str, Any], estimated_finish: int | None) -> dict[str, Any]:
    result = job["result"] or {}
    method = job["method"]
    return {"id": job["id"], "object": "fine_tuning.job", "created_at": job["created_at"],
            "error": job["error"], "fine_tuned_model": result.get("fine_tuned_model"),
            "finished_at": job["finished_at"], "hyperparameters": method[method["type"]]["hyperparameters"],
            "model": job["model"], "organization_id": job["tenant"], "result_files": result.get("result_files", []),
            "seed": job["seed"], "status": job["status"], "trained_tokens": result.get("trained_tokens"),
            "training_file": job["training_file"], "validation_file": job["validation_file"],
            "estimated_finish": estimated_finish, "integrations": [], "metadata": job["metadata"],
            "method": method, "user_provided_suffix": job["suffix"]}


def parse_method(body: dict[str, Any]) -> dict[str, Any]:
    """The job's `method`, from `method` or the older top-level `hyperparameters`; unknown keys refused."""
    method = body.get("method") or {"type": "supervised"}
    kind = method.get("type", "supervised")
    if kind not in HYPERPARAMETERS:
        raise APIProblem(400, f"method.type {kind!r} is not supported; use one of: {', '.join(HYPERPARAMETERS)}",
                         "method.type")
    hyper = dict((method.get(kind) or {}).get("hyperparameters") or body.get("hyperparameters") or {})
    for key, value in hyper.items():
        param = f"method.{kind}.hyperparameters.{key}"
        if key not in HYPERPARAMETERS[kind]:
            raise APIProblem(400, f"hyperparameter {key!r} is not one of {kind}'s: "
                                  f"{', '.join(HYPERPARAMETERS[kind])}", param)
        numeric = isinstance(value, int | float) and not isinstance(value, bool) and value > 0
        if value != "auto" and (not numeric or key in INTEGERS and value != int(value)):
            raise APIProblem(400, f"hyperparameter {key}: expected 'auto' or a positive "
                                  f"{'integer' if key in INTEGERS else 'number'}, got {value!r}", param)
    hyper = {k: hyper.get(k, "auto") for k in HYPERPARAMETERS[kind]}
    return {"type": kind, kind: {"hyperparameters": hyper}}
