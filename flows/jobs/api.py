"""The HTTP routes of the fine-tuning API, as the `openai` client calls them.

Two FastAPI apps, because Ray Serve routes by path prefix and each application owns one:
`files_api` under `/v1/files` and `jobs_api` under `/v1/fine_tuning` (serve_app.py mounts them; Serve
hands each app the path below its prefix). Both find their JobService through `bind`, set once per
process. Every error is an OpenAI error body; an unknown key gets 401, another tenant's id 404.
"""

from __future__ import annotations

import email.parser
import email.policy
from typing import Annotated, Any

from fastapi import Body, Depends, FastAPI, Header, Query, Request
from fastapi.responses import Response

from flows.jobs import tenants
from flows.jobs.files import TooLarge
from flows.jobs.service import JobService
from flows.jobs.wire import APIProblem, file_object
from serving.api import openai_errors

MULTIPART_SLACK = 64 << 10  # the multipart envelope around the file: headers, boundaries, the purpose field


class _Bound:
    service: JobService | None = None


def bind(service: JobService) -> None:
    """Give this process's routes their service."""
    _Bound.service = service


def service() -> JobService:
    if _Bound.service is None:
        raise APIProblem(503, "the fine-tuning API is starting", None, "service_unavailable")
    return _Bound.service


def tenant(authorization: Annotated[str | None, Header()] = None) -> str:
    found = tenants.tenant(authorization, service().tenant_keys)
    if found is None:
        raise APIProblem(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", None,
                         "invalid_api_key")
    return found


Tenant = Annotated[str, Depends(tenant)]
After = Annotated[str | None, Query()]
Limit = Annotated[int, Query(ge=1, le=10_000)]


files_api = openai_errors(FastAPI(title="Tuneline files", docs_url=None, redoc_url=None))
jobs_api = openai_errors(FastAPI(title="Tuneline fine-tuning", docs_url=None, redoc_url=None))


# ---------------------------------------------------------------- /v1/files


async def _multipart(request: Request, limit: int) -> dict[str, Any]:
    """The form fields of a multipart body read up to `limit` bytes (413 past it): {name: (filename, bytes)}."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit + MULTIPART_SLACK:
        raise TooLarge(limit)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit + MULTIPART_SLACK:
            raise TooLarge(limit)
    head = f"Content-Type: {request.headers.get('content-type', '')}\r\n\r\n".encode()
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + bytes(body))
    if not message.is_multipart():
        raise APIProblem(400, "expected a multipart/form-data body with `file` and `purpose`", "file")
    fields = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if name:
            fields[name] = (part.get_filename(), part.get_payload(decode=True) or b"")
    return fields


@files_api.post("")
async def upload(request: Request, who: Tenant):
    svc = service()
    try:
        fields = await _multipart(request, svc.params.jobs.max_file_bytes)
    except TooLarge as e:
        raise APIProblem(413, str(e), "file", "file_too_large") from None
    if "file" not in fields or "purpose" not in fields:
        raise APIProblem(400, "missing form field: send `file` and `purpose`", "file" if "file" not in fields
                         else "purpose")
    filename, data = fields["file"]
    purpose = fields["purpose"][1].decode("utf-8", "replace").strip()
    try:
        return svc.files.upload(who, filename or "upload.jsonl", purpose, [data])
    except TooLarge as e:
        raise APIProblem(413, str(e), "file", "file_too_large") from None


@files_api.get("")
def list_files(who: Tenant, purpose: str | None = None, after: After = None, limit: Limit = 10_000):
    return service().files.list(who, purpose, after, limit)


@files_api.get("/{file_id}")
def retrieve_file(file_id: str, who: Tenant):
    return file_object(service().files.get(who, file_id))


@files_api.delete("/{file_id}")
def delete_file(file_id: str, who: Tenant):
    return service().files.delete(who, file_id)


@files_api.get("/{file_id}/content")
def file_content(file_id: str, who: Tenant):
    return Response(service().files.content(who, file_id), media_type="application/octet-stream")


# ---------------------------------------------------------------- /v1/fine_tuning


@jobs_api.post("/jobs")
def create_job(who: Tenant, body: Annotated[dict[str, Any], Body()]):
    for key in ("training_file", "model"):
        if not isinstance(body.get(key), str) or not body[key]:
            raise APIProblem(400, f"{key}: required, a string", key)
    suffix = body.get("suffix")
    if suffix is not None and (not isinstance(suffix, str) or len(suffix) > 64):
        raise APIProblem(400, "suffix: a string of at most 64 characters", "suffix")
    seed = body.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**31):
        raise APIProblem(400, f"seed: an integer from 0 to 2147483647, got {seed!r}", "seed")
    metadata = body.get("metadata")
    if metadata is not None and not (isinstance(metadata, dict) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())):
        raise APIProblem(400, "metadata: an object of string keys and string values", "metadata")
    return service().create_job(who, body)


@jobs_api.get("/jobs")
def list_jobs(request: Request, who: Tenant, after: After = None, limit: Limit = 20):
    # metadata[key]=value, as the client sends a metadata filter
    wanted = {k[len("metadata["):-1]: v for k, v in request.query_params.items() if k.startswith("metadata[")}
    return service().list_jobs(who, after, limit, wanted)


@jobs_api.get("/jobs/{job_id}")
def retrieve_job(job_id: str, who: Tenant):
    return service().retrieve(who, job_id)


@jobs_api.post("/jobs/{job_id}/cancel")
def cancel_job(job_id: str, who: Tenant):
    return service().cancel(who, job_id)


@jobs_api.get("/jobs/{job_id}/events")
def job_events(job_id: str, who: Tenant, after: After = None, limit: Limit = 20):
    return service().events(who, job_id, after, limit)


@jobs_api.get("/jobs/{job_id}/checkpoints")
def job_checkpoints(job_id: str, who: Tenant, after: After = None, limit: Limit = 10):
    return service().checkpoints(who, job_id, after, limit)
