"""The OpenAI wire format of the Tuneline server: requests, error bodies, responses, stream chunks, stats.

Pure data and formatting: no Ray, no torch. The router (serving/router.py) validates requests
with these models, the model replicas (serving/generation.py) return plain dicts, and the
functions here turn those into OpenAI's JSON and server-sent events.
"""

from __future__ import annotations

import json
import time
from collections import Counter, deque
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
VERSION_HEADER = "x-tuneline-version"  # which model version answered; the promotion test reads it


class APIError(Exception):
    """An error the client caused (4xx) or the server reports (5xx), in OpenAI's error shape."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def to_dict(self) -> dict:
        """Plain data, so that a model replica can return it through a Serve handle."""
        return {"status": self.status, "message": self.message, "param": self.param, "code": self.code}

    @classmethod
    def from_dict(cls, d: dict) -> APIError:
        return cls(d["status"], d["message"], d.get("param"), d.get("code"))


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def openai_errors(app: FastAPI, respond=error_response) -> FastAPI:
    """Every error of `app` as an OpenAI error body, through `respond(status, message, param, code)`: an APIError
    as raised, a body that fails validation 400 naming its fields, an HTTPException its status, anything else 500
    with the exception's text (never a traceback)."""

    @app.exception_handler(APIError)
    def _api_error(request: Request, exc: APIError):
        return respond(exc.status, exc.message, exc.param, exc.code)

    @app.exception_handler(RequestValidationError)
    def _invalid_request(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        if errors and errors[0]["type"] == "json_invalid":
            return respond(400, f"malformed JSON body: {errors[0].get('ctx', {}).get('error', '')}")
        fields = [[str(p) for p in e["loc"] if p != "body"] for e in errors]
        message = "; ".join(f"{'.'.join(f) or 'body'}: {e['msg']}" for f, e in zip(fields, errors, strict=True))
        return respond(400, message, fields[0][0] if fields and fields[0] else None)

    @app.exception_handler(HTTPException)
    def _http_error(request: Request, exc: HTTPException):
        return respond(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    def _server_error(request: Request, exc: Exception):
        return respond(500, f"the server failed: {type(exc).__name__}: {str(exc)[-500:]}")

    return app


def _encodable(text: str) -> str:
    """JSON's \\ud800 escapes decode to lone surrogates, which no tokenizer takes: refuse them here (400)."""
    try:
        text.encode()
    except UnicodeEncodeError as e:
        raise ValueError(f"not valid Unicode text: a lone surrogate at character {e.start}") from None
    return text


Text = Annotated[str, AfterValidator(_encodable)]  # what reaches the tokenizer
Stop = Annotated[str, Field(min_length=1)]


class StreamOptions(BaseModel):
    include_usage: bool = False


class Sampling(BaseModel):
    # Clients send fields this server has no use for (user, logprobs=null, ...): ignore them.
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=1, description="one choice per request")
    stop: Stop | list[Stop] | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1, description="int64, as OpenAI's (and torch's seeds)")
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = Field(False, description="vLLM's extension: generate max_tokens even past EOS (benchmarks)")


class CompletionRequest(Sampling):
    prompt: Text | Annotated[list[Text], Field(min_length=1, max_length=1)]


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: Text


class ChatRequest(Sampling):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: int | None = Field(None, ge=1)


def to_spec(req: CompletionRequest | ChatRequest, max_tokens_limit: int) -> dict:
    """What a model replica needs of a validated request: plain data, cheap to send through a handle."""
    if isinstance(req, ChatRequest):
        max_tokens = req.max_tokens or req.max_completion_tokens or max_tokens_limit
        body: dict[str, Any] = {"kind": "chat", "messages": [m.model_dump() for m in req.messages]}
    else:
        max_tokens = req.max_tokens or COMPLETION_DEFAULT_MAX_TOKENS
        body = {"kind": "completion", "prompt": req.prompt if isinstance(req.prompt, str) else req.prompt[0]}
    if max_tokens > max_tokens_limit:
        raise APIError(400, f"max_tokens={max_tokens} is over this server's limit of {max_tokens_limit}",
                       "max_tokens")
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    return {**body, "max_tokens": max_tokens, "temperature": req.temperature, "top_p": req.top_p,
            "stop": stops, "seed": req.seed, "ignore_eos": req.ignore_eos}


def head(chat: bool, served_name: str, stream: bool) -> dict:
    kind = ("chat.completion.chunk" if stream else "chat.completion") if chat else "text_completion"
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{time.time_ns():x}"
    return {"id": rid, "object": kind, "created": int(time.time()), "model": served_name}


def usage(gen: dict) -> dict:
    return {"prompt_tokens": gen["prompt_tokens"], "completion_tokens": gen["completion_tokens"],
            "total_tokens": gen["prompt_tokens"] + gen["completion_tokens"]}


def completion_body(top: dict, gen: dict, chat: bool) -> dict:
    answer = {"message": {"role": "assistant", "content": gen["text"]}} if chat else {"text": gen["text"]}
    choice = {"index": 0, **answer, "logprobs": None, "finish_reason": gen["finish_reason"]}
    return {**top, "choices": [choice], "usage": usage(gen)}


def chunk(top: dict, chat: bool, text: str | None, finish: str | None = None, role: bool = False) -> str:
    """One server-sent event in OpenAI's chunk format."""
    if chat:
        delta: dict = {"role": "assistant"} if role else {}
        if text is not None:
            delta["content"] = text
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
    return f"data: {json.dumps({**top, 'choices': [choice]})}\n\n"


def usage_chunk(top: dict, gen: dict) -> str:
    return f"data: {json.dumps({**top, 'choices': [], 'usage': usage(gen)})}\n\n"


DONE = "data: [DONE]\n\n"


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 4)


class Stats:
    """What the router saw since it started serving its version: counts, and a window of recent requests
    for latency, time to first token, tokens/s and the batches the requests rode in. Served as JSON at
    GET /v1/metrics (and so in `tuneline serve status`); Prometheus gets the same through Ray's metrics."""

    def __init__(self, window: int = 2048):
        self.since = time.time()
        self.statuses: Counter = Counter()
        self.tokens_total = 0
        self.streams = 0
        self.batch_sizes: Counter = Counter()  # batch size -> requests whose running batch was that size (mean)
        self.recent: deque = deque(maxlen=window)  # (end time, latency, ttft, completion tokens)

    def error(self, status: int) -> None:
        self.statuses[f"{status // 100}xx"] += 1

    def done(self, latency: float, ttft: float | None, tokens: int, batch_size: int | None, stream: bool) -> None:
        self.statuses["2xx"] += 1
        self.tokens_total += tokens
        self.streams += stream
        if batch_size:
            self.batch_sizes[batch_size] += 1
        self.recent.append((time.time(), latency, ttft, tokens))

    def snapshot(self) -> dict:
        recent = list(self.recent)
        latencies = [r[1] for r in recent]
        ttfts = [r[2] for r in recent if r[2] is not None]
        span = (recent[-1][0] - (recent[0][0] - recent[0][1])) if recent else 0.0
        batched = sum(self.batch_sizes.values())
        batches = sum(n / size for size, n in self.batch_sizes.items())  # a batch of k: k requests, 1/k each
        return {
            "since": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(self.since)),
            "requests": sum(self.statuses.values()),
            "requests_by_status": dict(sorted(self.statuses.items())),
            "streams": self.streams,
            "completion_tokens": self.tokens_total,
            "latency_s": {"p50": _pct(latencies, 0.5), "p95": _pct(latencies, 0.95)},
            "ttft_s": {"p50": _pct(ttfts, 0.5), "p95": _pct(ttfts, 0.95)},
            "tokens_per_s": round(sum(r[3] for r in recent) / span, 2) if span > 0 else None,
            "window_requests": len(recent),
            "batches": round(batches, 2),
            "batch_size": {"mean": round(batched / batches, 2) if batches else None,
                           "max": max(self.batch_sizes, default=None),
                           "requests_by_size": {str(k): v for k, v in sorted(self.batch_sizes.items())}},
        }
