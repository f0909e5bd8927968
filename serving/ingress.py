"""The HTTP ingress of the Router: the FastAPI app, OpenAI-style errors, the request size limit and the API key.

`api` is what `serve.ingress` mounts on the Router (serving/router.py), whose methods are its routes.
Every bad request gets an OpenAI-style 4xx body, never a 500 with a traceback. The handlers here run
in a Router replica and reach it through Serve's replica context: its error counts, its
max_request_bytes and its API key's digest.
"""

import hashlib
import hmac

from fastapi import FastAPI, Header, Request
from ray import serve
from starlette.exceptions import HTTPException

from serving.api import APIError, error_response, openai_errors


def _router():
    """The Router replica that serves this request."""
    return serve.get_replica_context().servable_object


def _error(status: int, message: str, param: str | None = None, code: str | None = None):
    _router().count_error(status)
    return error_response(status, message, param, code)


api = openai_errors(FastAPI(title="Tuneline", docs_url=None, redoc_url=None), _error)


class BodyTooLarge(HTTPException):
    """An HTTPException, as FastAPI lets only those out of its body read (others become a plain 400)."""

    def __init__(self, size: str, limit: int):
        super().__init__(413, f"the request body is {size} bytes, over this server's limit of {limit} "
                              "(serving.max_request_bytes)")


@api.exception_handler(BodyTooLarge)
def _body_too_large(request: Request | None, exc: BodyTooLarge):
    return _error(413, str(exc.detail), code="request_too_large")


class BodyLimit:
    """ASGI middleware: a request body over the router's max_request_bytes gets 413 before FastAPI reads
    it whole or parses it. A declared Content-Length is refused at once; a chunked body is counted as
    it arrives, and the read stops at the first chunk past the limit."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = _router().max_request_bytes
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            return await _body_too_large(None, BodyTooLarge(declared.decode(), limit))(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > limit:
                raise BodyTooLarge(f"over {seen}", limit)
            return message

        return await self.app(scope, counted, send)


api.add_middleware(BodyLimit)


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def tenant_of(authorization: str | None, tenant_keys: dict[str, str]) -> str | None:
    """The tenant whose key (its SHA-256 in `tenant_keys`) a `Bearer <key>` header carries, else None."""
    scheme, _, token = (authorization or "").partition(" ")
    if scheme != "Bearer" or not token:
        return None
    wanted = key_digest(token.strip())
    return next((t for known, t in tenant_keys.items() if hmac.compare_digest(known, wanted)), None)


def authorize(authorization: str | None = Header(None)) -> None:
    """A route dependency, so it runs before the body is validated: a keyless caller learns that first.
    The serving key passes, and so does a tenant's key of the fine-tuning API."""
    router = _router()
    digest = router.api_key_sha256
    if not digest:
        return
    scheme, _, token = (authorization or "").partition(" ")
    if scheme == "Bearer" and hmac.compare_digest(key_digest(token), digest):
        return
    if tenant_of(authorization, router.tenant_keys) is None:
        raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")
