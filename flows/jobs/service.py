"""The fine-tuning API's jobs, apart from HTTP: their lifecycle, results and the tenants' limits on them.

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
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from flows.jobs import results, runs, timeline
from flows.jobs.files import Files, FileStore
from flows.jobs.store import Store, database_url, now
from flows.jobs.wire import APIProblem, job_object, not_found, page, parse_method
from flows.parameters import resolve_params
from tuneline import s3
from tuneline.config import Params
from tuneline.errors import DataError

log = logging.getLogger("tuneline")


class JobService:
    """One per API process, over the project at `project` (its params.yaml, data, jobs folder)."""

    def __init__(self, project: Path, params_path: Path, tenant_keys: dict[str, str], background: bool = True):
        """`tenant_keys`: {SHA-256 of an API key: its tenant} (tenants.py); `background`: validate new jobs
        and serve finished jobs' models in a thread of this process (the jobs app's replica does)."""
        self.project, self.params_path, self.tenant_keys = project.resolve(), params_path, tenant_keys
        self.params = resolve_params(self._abs(params_path))
        cfg = self.params.jobs
        self.store = Store(database_url(cfg.database_url, self.project))
        files_dir = cfg.files_dir if s3.is_remote(cfg.files_dir) else self._abs(cfg.files_dir)
        self.files = Files(self.store, FileStore(files_dir), cfg, self.params.validate_)
        # One job validated at a time (the Great Expectations suite is not known to be thread-safe); a model
        # going live (a minute, at times) in a thread of its own, so that it holds no validation up.
        self.validating = ThreadPoolExecutor(1, thread_name_prefix="validate") if background else None
        self.serving = ThreadPoolExecutor(1, thread_name_prefix="serve") if background else None
        self.finishing = threading.Lock()
        if self.validating is not None:  # jobs the last process was validating when it stopped: validate them again
            for job in self.store.jobs(statuses={"validating_files"}):
                self.validating.submit(self._prepare, job["id"])

    def _abs(self, path: Path) -> Path:
        return path if path.is_absolute() else self.project / path

    # ------------------------------------------------------------ jobs: create, validate, submit

    def create_job(self, tenant: str, body: dict[str, Any]) -> dict[str, Any]:
        method = parse_method(body)
        training = self.files.get(tenant, body["training_file"], "training_file")
        if body.get("validation_file"):
            self.files.get(tenant, body["validation_file"], "validation_file")
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
        if self.validating is not None:
            self.validating.submit(self._prepare, job["id"])
        return self._object(self.store.job(tenant, job["id"]))

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
            self._validate(job)
            sets = self._sets(job)
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

    def _validate(self, job: dict[str, Any]) -> None:
        """Validate's checks on the job's files, writing nothing."""
        from tasks.validate import validate_paths

        paths, formats = {}, {}
        for param in ("training_file", "validation_file"):
            if job[param]:
                row = self.files.get(job["tenant"], job[param], param)
                paths[param], formats[param] = self.files.path(row), row["format"]
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

    # ------------------------------------------------------------ jobs: state from Prefect and the job's folder

    def _sets(self, job: dict[str, Any]) -> list[str]:
        """The job's values for its flow run (runs.job_sets); a file deleted since reads as a missing path."""
        train = self.store.file(job["tenant"], job["training_file"])
        valid = self.store.file(job["tenant"], job["validation_file"]) if job["validation_file"] else None
        return runs.job_sets(self.params, self.project, job, self.files.location(train) if train else Path("-"),
                             self.files.location(valid) if valid else None,
                             train["format"] if train else "instruction", self._base_model(job["model"]))

    def job_params(self, job: dict[str, Any]) -> Params:
        """The job's params as its flow run resolves them (the project's params.yaml + the job's values)."""
        return resolve_params(self._abs(self.params_path), None, self._sets(job))

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
        with self.finishing:  # two requests may see the run end at once: one of them records it
            job = self.store.job(None, job_id)
            if job["status"] not in runs.FINAL:
                self._record_end(job, status, message)

    def _record_end(self, job: dict[str, Any], status: str, message: str) -> None:
        job_id = job["id"]
        values: dict[str, Any] = {"status": status, "finished_at": now()}
        if status == "succeeded":
            params = self.job_params(job)
            found = results.outcome(params)
            result_file = self.files.add_result(job["tenant"], f"{job_id}-metrics.csv",
                                                results.metrics_csv(results.train_rows(params)))
            model = f"{found['model_name']}:{found['version']}" if found["version"] else None
            values["result"] = {"fine_tuned_model": model, "trained_tokens": found["trained_tokens"],
                                "result_files": [result_file], "registered_model": found["model_name"],
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
        if (values.get("result") or {}).get("fine_tuned_model") and self.serving is not None:
            self.serving.submit(self._serve_model, job_id)

    def _serve_model(self, job_id: str) -> None:
        """Put a succeeded job's model live beside the champion (serving/switch.py), for its tenant only."""
        from serving import switch

        job = self.store.job(None, job_id)
        result = job["result"]
        try:
            switch.serve_beside(self.job_params(job), result["fine_tuned_model"], str(result["registered_version"]),
                                f"models:/{result['registered_model']}/{result['registered_version']}",
                                job["tenant"], self.tenant_keys)
        except Exception as e:  # noqa: BLE001 - the job succeeded; serving its model is what failed
            log.exception(f"job {job_id}: its model could not be served")
            self.store.add_event(job_id, f"The model could not be served: {type(e).__name__}: {e}", "error")
            return
        self.store.add_event(job_id, f"Model {result['fine_tuned_model']} serves at /v1/chat/completions")

    def job(self, tenant: str, job_id: str) -> dict[str, Any]:
        row = self.store.job(tenant, job_id)
        if row is None:
            raise not_found("fine-tuning job", job_id)
        return self._refresh(row)

    def retrieve(self, tenant: str, job_id: str) -> dict[str, Any]:
        return self._object(self.job(tenant, job_id))

    def list_jobs(self, tenant: str, after: str | None, limit: int, metadata: dict[str, str]) -> dict[str, Any]:
        rows = [r for r in self.store.jobs(tenant)
                if all((r["metadata"] or {}).get(k) == v for k, v in metadata.items())]
        return page([self._object(self._refresh(r)) for r in rows], after, limit)

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

    def _object(self, job: dict[str, Any]) -> dict[str, Any]:
        return job_object(job, timeline.estimated_finish(job, self.job_params(job)) if job["status"] == "running"
                          else None)

    def events(self, tenant: str, job_id: str, after: str | None, limit: int) -> dict[str, Any]:
        job = self.job(tenant, job_id)
        return page(timeline.events(job, self.job_params(job), self.store.events(job_id)), after, limit)

    def checkpoints(self, tenant: str, job_id: str, after: str | None, limit: int) -> dict[str, Any]:
        job = self.job(tenant, job_id)
        return page(timeline.checkpoints(job, self.job_params(job)), after, limit)
