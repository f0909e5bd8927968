"""The fine-tuning API's work, apart from HTTP: files, the job lifecycle, events, checkpoints, tenants' limits.

A job's life, as the client sees it:

- `validating_files`: the API runs validate's checks (tasks.validate: each line, the format's fields, the
  Great Expectations suite, train/validation overlap) on the job's files, in a thread of its own. A bad
  file fails the job: `error.code` says which file (`invalid_training_file`, `invalid_validation_file`),
  `error.message` names the file, the line and the field;
- `queued` once the Prefect flow run is created; then `running`, `succeeded`, `failed` or `cancelled`:
  from here on the status is the flow run's state, read from Prefect whenever the job is asked for;
- on success the job's folder gives `trained_tokens`, the metrics CSV (`result_files`) and the model.

The gate rule: a job whose candidate the gate rejects still `succeeded` (training ran and its results
are there), with `fine_tuned_model` null and an event that gives the gate's reasons; only a promoted
candidate is merged and registered, as `ft-<tenant>[-<suffix>]-<job>` version 1, and its
`fine_tuned_model` is `<that name>:<version>`.

What is stored (store.py) is what the API decided; Prefect and the job's folder say what happened since.
A restarted API, even one killed with -9 mid-job, reads them again and shows the truth; a job still in
`validating_files` when the API died is validated again when it starts.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from flows.jobs import results, runs
from flows.jobs.files import FileStore
from flows.jobs.store import Store, database_url, now
from flows.parameters import resolve_params
from tuneline.config import Params
from tuneline.errors import DataError, TunelineError

log = logging.getLogger("tuneline")

UPLOAD_PURPOSES = {"fine-tune"}
RESULTS_PURPOSE = "fine-tune-results"
HYPERPARAMETERS = {"supervised": ("n_epochs", "batch_size", "learning_rate_multiplier"),
                   "dpo": ("n_epochs", "batch_size", "learning_rate_multiplier", "beta")}


class APIProblem(TunelineError):
    """A request the API refuses: an HTTP status and an OpenAI error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def not_found(what: str, id_: str, param: str | None = None) -> APIProblem:
    # The same answer whether the id does not exist or belongs to another tenant: no id leaks.
    return APIProblem(404, f"no {what} with id {id_!r}", param, f"{what.replace(' ', '_')}_not_found")


def page(items: list[dict[str, Any]], after: str | None, limit: int) -> dict[str, Any]:
    """OpenAI's cursor page: the items after the one with id `after`, at most `limit` of them."""
    if after is not None:
        ids = [item["id"] for item in items]
        items = items[ids.index(after) + 1:] if after in ids else []
    return {"object": "list", "data": items[:limit], "has_more": len(items) > limit}


class JobService:
    """One per API process, over the project at `project` (its params.yaml, data, jobs folder)."""

    def __init__(self, project: Path, params_path: Path, background: bool = True):
        self.project, self.params_path = project.resolve(), params_path
        self.params = resolve_params(self._abs(params_path))
        cfg = self.params.jobs
        self.store = Store(database_url(cfg.database_url, self.project))
        self.files = FileStore(self._abs(cfg.files_dir))
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="validate") if background else None
        if self.pool is not None:  # jobs the last process was validating when it stopped: validate them again
            for job in self.store.jobs(statuses={"validating_files"}):
                self.pool.submit(self._prepare, job["id"])

    def _abs(self, path: Path) -> Path:
        return path if path.is_absolute() else self.project / path

    # ------------------------------------------------------------ files

    def upload(self, tenant: str, filename: str, purpose: str, chunks: Iterable[bytes]) -> dict[str, Any]:
        cfg = self.params.jobs
        if purpose not in UPLOAD_PURPOSES:
            raise APIProblem(400, f"purpose {purpose!r} is not supported here; use 'fine-tune'", "purpose")
        try:
            stored = self.files.put(chunks, filename, cfg.max_file_bytes, self.params.validate_)
        except DataError as e:
            raise APIProblem(400, f"invalid file: {e}", "file", "invalid_file") from None
        used = self.store.tenant_bytes(tenant)
        if used + stored["bytes"] > cfg.max_tenant_bytes:
            if not self.store.blob_in_use(stored["blob"]):
                self.files.remove(stored["blob"])
            raise APIProblem(429, f"upload limit reached: this tenant stores {used} bytes, and {stored['bytes']} "
                                  f"more would pass its limit of {cfg.max_tenant_bytes} (jobs.max_tenant_bytes); "
                                  "delete files first", "file", "upload_limit_exceeded")
        row = {"id": f"file-{secrets.token_hex(12)}", "tenant": tenant, "filename": filename, "purpose": purpose,
               "bytes": stored["bytes"], "blob": stored["blob"], "format": stored["format"],
               "records": stored["records"], "created_at": now()}
        self.store.add_file(row)
        return file_object(row)

    def file(self, tenant: str, file_id: str, param: str | None = None) -> dict[str, Any]:
        row = self.store.file(tenant, file_id)
        if row is None:
            raise not_found("file", file_id, param)
        return row

    def list_files(self, tenant: str, purpose: str | None, after: str | None, limit: int) -> dict[str, Any]:
        return page([file_object(r) for r in self.store.files(tenant, purpose)], after, limit)

    def delete_file(self, tenant: str, file_id: str) -> dict[str, Any]:
        row = self.file(tenant, file_id)
        self.store.delete_file(file_id)
        if not self.store.blob_in_use(row["blob"]):
            self.files.remove(row["blob"])
        return {"id": file_id, "object": "file", "deleted": True}

    def content(self, tenant: str, file_id: str) -> bytes:
        return self.files.read(self.file(tenant, file_id)["blob"])

    # ------------------------------------------------------------ jobs: create, validate, submit

    def create_job(self, tenant: str, body: dict[str, Any]) -> dict[str, Any]:
        method = parse_method(body)
        training = self.file(tenant, body["training_file"], "training_file")
        if body.get("validation_file"):
            self.file(tenant, body["validation_file"], "validation_file")
        self._base_model(body["model"])
        unfinished = [j for j in self.store.jobs(tenant, {"validating_files", "queued", "running"})
                      if self._refresh(j)["status"] not in runs.FINAL]
        limit = self.params.jobs.max_running_jobs
        if len(unfinished) >= limit:
            raise APIProblem(429, f"this tenant has {len(unfinished)} jobs not finished yet, its limit "
                                  f"(jobs.max_running_jobs) is {limit}: wait for one to end or cancel one",
                             None, "rate_limit_exceeded")
        seed = body.get("seed")
        job = {"id": f"ftjob-{secrets.token_hex(12)}", "tenant": tenant, "created_at": now(),
               "status": "validating_files", "model": body["model"], "training_file": training["id"],
               "validation_file": body.get("validation_file"), "suffix": body.get("suffix"),
               "seed": seed if seed is not None else self.params.train.seed,
               "metadata": body.get("metadata"), "method": method, "cancel_requested": 0}
        self.store.add_job(job)
        self.store.add_event(job["id"], f"Validating training file: {training['id']}"
                             + (f" and validation file: {body['validation_file']}" if body.get("validation_file")
                                else ""))
        if self.pool is not None:
            self.pool.submit(self._prepare, job["id"])
        return self.job_object(self.store.job(tenant, job["id"]))

    def _base_model(self, model: str) -> str | None:
        """The model.base a job's `model` asks for: None for the project's own base, else jobs.base_models'."""
        known = {self.params.registry.model_name, str(self.params.model.base)}
        if model in known:
            return None
        if model in self.params.jobs.base_models:
            return self.params.jobs.base_models[model]
        names = ", ".join(sorted(known | set(self.params.jobs.base_models)))
        raise APIProblem(400, f"model {model!r} is not a base model this server fine-tunes; it knows: {names} "
                              "(params: model.base, registry.model_name, jobs.base_models)", "model",
                         "model_not_available")

    def _prepare(self, job_id: str) -> None:
        """validating_files -> queued (or failed, naming the file, line and field)."""
        job = self.store.job(None, job_id)
        try:
            sets = self._validate(job)
            if self.store.job(None, job_id)["cancel_requested"]:
                self._finish(job_id, "cancelled", "Job cancelled before it was queued")
                return
            self.store.update_job(job_id, status="queued", flow_run_id=runs.submit(job_id, job["tenant"], sets))
            self.store.add_event(job_id, f"Files validated; job queued as a run of {runs.FINETUNE_DEPLOYMENT}")
        except APIProblem as e:
            self.store.update_job(job_id, status="failed", finished_at=now(),
                                  error={"code": e.code, "message": e.message, "param": e.param})
            self.store.add_event(job_id, e.message, "error")
        except Exception as e:  # noqa: BLE001 - the job says what broke; the API keeps serving
            log.exception(f"job {job_id}: could not be queued")
            self.store.update_job(job_id, status="failed", finished_at=now(),
                                  error={"code": "server_error", "message": f"{type(e).__name__}: {e}",
                                         "param": None})
            self.store.add_event(job_id, f"the job could not be queued: {type(e).__name__}: {e}", "error")

    def _validate(self, job: dict[str, Any]) -> list[str]:
        """Validate's checks on the job's files (writing nothing); the job's params as `sets`."""
        from tasks.validate import validate_paths

        paths, formats = {}, {}
        for param in ("training_file", "validation_file"):
            if job[param]:
                row = self.file(job["tenant"], job[param], param)
                paths[param], formats[param] = self.files.path(row["blob"]), row["format"]
        fmt = formats["training_file"]
        if job["method"]["type"] == "dpo" and fmt != "preference":
            raise APIProblem(400, f"{job['training_file']}: method 'dpo' trains on preference pairs "
                                  f"({{prompt, chosen, rejected}}), not on {fmt} records", "training_file",
                             "invalid_training_file")
        if formats.get("validation_file", fmt) != fmt:
            raise APIProblem(400, f"{job['validation_file']}: its records are {formats['validation_file']}, the "
                                  f"training file's are {fmt}: both must have one format", "validation_file",
                             "invalid_validation_file")
        names = {str(path): job[param] for param, path in paths.items()}
        try:
            validate_paths([paths["training_file"]], fmt, self.params.validate_, paths.get("validation_file"))
        except DataError as e:
            param = "validation_file" if job["validation_file"] and e.file == str(paths["validation_file"]) \
                else "training_file"
            where = names.get(e.file, e.file) + (f":{e.line}" if e.line is not None else "")
            rule = e.rule
            for path, file_id in names.items():  # the client knows its files by id, not by where they lie
                rule = rule.replace(path, file_id)
            raise APIProblem(400, f"{where}: {'field ' + repr(e.field) + ': ' if e.field else ''}{rule}",
                             param, f"invalid_{param}") from None
        return runs.job_sets(self.params, self.project, job, paths["training_file"], paths.get("validation_file"),
                             fmt, self._base_model(job["model"]))

    # ------------------------------------------------------------ jobs: state from Prefect and the job's folder

    def job_params(self, job: dict[str, Any]) -> Params:
        """The job's params as its flow run resolves them (the project's params.yaml + the job's values)."""
        train = self.store.file(job["tenant"], job["training_file"])
        valid = self.store.file(job["tenant"], job["validation_file"]) if job["validation_file"] else None
        sets = runs.job_sets(self.params, self.project, job, self.files.path(train["blob"]) if train else Path("-"),
                             self.files.path(valid["blob"]) if valid else None,
                             train["format"] if train else "instruction", self._base_model(job["model"]))
        return resolve_params(self._abs(self.params_path), None, sets)

    def _refresh(self, job: dict[str, Any]) -> dict[str, Any]:
        """The job with its status read from Prefect; on reaching a final state, its results stored."""
        if job["status"] in runs.FINAL or not job["flow_run_id"]:
            return job
        try:
            run = runs.flow_run(job["flow_run_id"])
        except Exception as e:  # noqa: BLE001 - Prefect away: the last known status, said so in the log
            log.warning(f"job {job['id']}: Prefect did not answer ({type(e).__name__}); showing its last status")
            return job
        status = runs.status_of(run)
        if status == job["status"]:
            return job
        if status in runs.FINAL:
            self._finish(job["id"], status, run.state.message or "")
        else:
            self.store.update_job(job["id"], status=status)
            if status == "running":
                self.store.add_event(job["id"], f"Fine-tuning job started: Prefect flow run {run.name}")
        return self.store.job(None, job["id"])

    def _finish(self, job_id: str, status: str, message: str) -> None:
        job = self.store.job(None, job_id)
        values: dict[str, Any] = {"status": status, "finished_at": now()}
        if status == "succeeded":
            params = self.job_params(job)
            found = results.outcome(params)
            csv_blob = self.files.put_text(results.metrics_csv(results.train_rows(params)), ".csv")
            result_file = {"id": f"file-{secrets.token_hex(12)}", "tenant": job["tenant"],
                           "filename": f"{job_id}-metrics.csv", "purpose": RESULTS_PURPOSE,
                           "bytes": self.files.path(csv_blob).stat().st_size, "blob": csv_blob, "format": "csv",
                           "records": None, "created_at": now()}
            self.store.add_file(result_file)
            model = f"{found['model_name']}:{found['version']}" if found["version"] else None
            values["result"] = {"fine_tuned_model": model, "trained_tokens": found["trained_tokens"],
                                "result_files": [result_file["id"]], "registered_model": found["model_name"],
                                "registered_version": found["version"]}
            if model:
                self.store.add_event(job_id, f"New fine-tuned model created: {model} (registered "
                                             f"models:/{found['model_name']}/{found['version']})")
            else:
                why = "; ".join(found["reasons"]) or f"gate decision {found['decision']!r}"
                self.store.add_event(job_id, f"The gate rejected the candidate, so no model was registered: {why}",
                                     "warn")
            self.store.add_event(job_id, "The job has successfully completed")
        elif status == "failed":
            values["error"] = {"code": "training_failed", "message": message or "the flow run failed", "param": None}
            self.store.add_event(job_id, f"The job failed: {message}", "error")
        else:
            self.store.add_event(job_id, "The job was cancelled" + (f": {message}" if message else ""))
        self.store.update_job(job_id, **values)

    def job(self, tenant: str, job_id: str) -> dict[str, Any]:
        row = self.store.job(tenant, job_id)
        if row is None:
            raise not_found("fine-tuning job", job_id)
        return self._refresh(row)

    def retrieve(self, tenant: str, job_id: str) -> dict[str, Any]:
        return self.job_object(self.job(tenant, job_id))

    def list_jobs(self, tenant: str, after: str | None, limit: int, metadata: dict[str, str]) -> dict[str, Any]:
        rows = [r for r in self.store.jobs(tenant)
                if all((r["metadata"] or {}).get(k) == v for k, v in metadata.items())]
        return page([self.job_object(self._refresh(r)) for r in rows], after, limit)

    def cancel(self, tenant: str, job_id: str) -> dict[str, Any]:
        job = self.job(tenant, job_id)
        if job["status"] in runs.FINAL:
            raise APIProblem(400, f"job {job_id} is {job['status']} already: only an unfinished job can be "
                                  "cancelled", None, "job_not_cancellable")
        self.store.update_job(job_id, cancel_requested=1)
        self.store.add_event(job_id, "Cancellation requested")
        if job["flow_run_id"]:
            runs.cancel(job["flow_run_id"])
        return self.retrieve(tenant, job_id)

    def job_object(self, job: dict[str, Any]) -> dict[str, Any]:
        result = job["result"] or {}
        method = job["method"]
        hyper = method.get(method["type"], {}).get("hyperparameters", {})
        return {"id": job["id"], "object": "fine_tuning.job", "created_at": job["created_at"],
                "error": job["error"], "fine_tuned_model": result.get("fine_tuned_model"),
                "finished_at": job["finished_at"], "hyperparameters": hyper, "model": job["model"],
                "organization_id": job["tenant"], "result_files": result.get("result_files", []),
                "seed": job["seed"], "status": job["status"], "trained_tokens": result.get("trained_tokens"),
                "training_file": job["training_file"], "validation_file": job["validation_file"],
                "estimated_finish": self._estimated_finish(job), "integrations": [],
                "metadata": job["metadata"], "method": method, "user_provided_suffix": job["suffix"]}

    def _estimated_finish(self, job: dict[str, Any]) -> int | None:
        """While training runs: its start plus its elapsed time over the share of steps done."""
        if job["status"] != "running":
            return None
        train = [r for r in runs.stage_runs(job["flow_run_id"]) if r.name.rsplit("-", 1)[0] == "train"]
        params = self.job_params(job)
        done = results.fraction_done(params, results.train_rows(params))
        if not train or not train[-1].start_time or not done:
            return None
        start = train[-1].start_time.timestamp()
        return int(start + (time.time() - start) / done)

    # ------------------------------------------------------------ events and checkpoints

    def events(self, tenant: str, job_id: str, after: str | None, limit: int) -> dict[str, Any]:
        """Newest first: what the API did, each stage's state from Prefect, each logged training step."""
        job = self.job(tenant, job_id)
        timeline = [(e["created_at"], f"ftevent-{e['seq']}", e["level"], e["message"])
                    for e in self.store.events(job_id)]
        if job["flow_run_id"]:
            params = self.job_params(job)
            for task in runs.stage_runs(job["flow_run_id"]):
                stage, state = task.name.rsplit("-", 1)[0], task.state.name if task.state else "Pending"
                when = (task.end_time or task.start_time or task.created).timestamp()
                seconds = f" in {task.total_run_time.total_seconds():.1f}s" if task.end_time else ""
                level = "error" if state in ("Failed", "Crashed") else "info"
                message = f"stage {stage}: {state}{seconds}" + (f": {task.state.message}" if level == "error" else "")
                timeline.append((when, f"ftevent-{job_id[6:18]}-{stage}-{state.lower()}", level, message))
                if stage == "train" and task.start_time:  # the steps come between train's start and its end
                    rows = results.train_rows(params)
                    for i, (lvl, line) in enumerate(results.health_lines(rows, params.train.loss_spike_factor)):
                        timeline.append((task.start_time.timestamp(), f"ftevent-{job_id[6:18]}-train-{i}", lvl, line))
        timeline.sort(key=lambda e: e[0])  # stable: at one instant, the order they were added
        data = [{"id": id_, "object": "fine_tuning.job.event", "created_at": int(at), "level": level, "message": msg,
                 "type": "message", "data": {}} for at, id_, level, msg in reversed(timeline)]
        return page(data, after, limit)

    def checkpoints(self, tenant: str, job_id: str, after: str | None, limit: int) -> dict[str, Any]:
        job = self.job(tenant, job_id)
        if not job["flow_run_id"]:
            return page([], None, limit)
        params = self.job_params(job)
        model = (job["result"] or {}).get("fine_tuned_model")
        data = [{"id": f"ftckpt-{job_id[6:18]}-{c['step']}", "object": "fine_tuning.job.checkpoint",
                 "created_at": job["finished_at"] or now(), "fine_tuning_job_id": job_id,
                 "fine_tuned_model_checkpoint": f"{model}:step-{c['step']}" if model else None,
                 "metrics": c["metrics"], "step_number": c["step"]}
                for c in results.checkpoints(params, results.train_rows(params))]
        return page(data, after, limit)


def file_object(row: dict[str, Any]) -> dict[str, Any]:
    return {"id": row["id"], "object": "file", "bytes": row["bytes"], "created_at": row["created_at"],
            "filename": row["filename"], "purpose": row["purpose"], "status": "processed", "status_details": None}


def parse_method(body: dict[str, Any]) -> dict[str, Any]:
    """The job's `method`, from `method` or the older top-level `hyperparameters`; unknown keys refused."""
    method = body.get("method") or {"type": "supervised"}
    kind = method.get("type", "supervised")
    if kind not in HYPERPARAMETERS:
        raise APIProblem(400, f"method.type {kind!r} is not supported; use one of: {', '.join(HYPERPARAMETERS)}",
                         "method.type")
    hyper = dict((method.get(kind) or {}).get("hyperparameters") or body.get("hyperparameters") or {})
    for key, value in hyper.items():
        if key not in HYPERPARAMETERS[kind]:
            raise APIProblem(400, f"hyperparameter {key!r} is not one of {kind}'s: "
                                  f"{', '.join(HYPERPARAMETERS[kind])}", f"method.{kind}.hyperparameters.{key}")
        numeric = isinstance(value, int | float) and not isinstance(value, bool) and value > 0
        if value != "auto" and not numeric or key in ("n_epochs", "batch_size") and numeric and value != int(value):
            raise APIProblem(400, f"hyperparameter {key}: expected 'auto' or a positive "
                                  f"{'integer' if key in ('n_epochs', 'batch_size') else 'number'}, got {value!r}",
                             f"method.{kind}.hyperparameters.{key}")
    hyper = {k: hyper.get(k, "auto") for k in HYPERPARAMETERS[kind]}
    return {"type": kind, kind: {"hyperparameters": hyper}}
