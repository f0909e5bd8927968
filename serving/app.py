"""The Ray Serve application: one merged model behind an OpenAI-compatible HTTP API.

`GET /v1/models`, `POST /v1/completions` and `POST /v1/chat/completions` (with
`stream`), so any OpenAI client can talk to a served Tuneline model. Every bad
request gets an OpenAI-style 4xx error body, never a 500 with a traceback.
"""

import hmac
import json
import os
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import torch
from fastapi import Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from starlette.exceptions import HTTPException
from transformers import AutoModelForCausalLM, AutoTokenizer, StoppingCriteria, StoppingCriteriaList

from tasks.formats import render_prompt, stop_strings
from tasks.models import encode_prompt

# A replica reserves one CPU and uses one thread: batch-1 generation of a small model gains little
# from more, and the threads of several replicas would fight over the same cores.
REPLICA_CPUS = 1
STREAM_CHUNK_CHARS = 8
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions

api = FastAPI(title="Tuneline", docs_url=None, redoc_url=None)


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_response(status: int, message: str, param: str | None = None, code: str | None = None):
    body = {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


@api.exception_handler(APIError)
def _api_error(request: Request, exc: APIError):
    return error_response(exc.status, exc.message, exc.param, exc.code)


@api.exception_handler(RequestValidationError)
def _invalid_request(request: Request, exc: RequestValidationError):
    errors = exc.errors()
    if errors and errors[0]["type"] == "json_invalid":
        return error_response(400, f"malformed JSON body: {errors[0].get('ctx', {}).get('error', '')}")
    fields = [[str(p) for p in e["loc"] if p != "body"] for e in errors]
    message = "; ".join(f"{'.'.join(f) or 'body'}: {e['msg']}" for f, e in zip(fields, errors, strict=True))
    return error_response(400, message, param=fields[0][0] if fields and fields[0] else None)


@api.exception_handler(HTTPException)
def _http_error(request: Request, exc: HTTPException):
    return error_response(exc.status_code, str(exc.detail))


Stop = Annotated[str, Field(min_length=1)]


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    # Clients send fields this server has no use for (user, logprobs=null, ...): ignore them.
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=1, description="one choice per request")
    stop: Stop | list[Stop] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None


class CompletionRequest(_Sampling):
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)]


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(_Sampling):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: int | None = Field(None, ge=1)


@dataclass
class Generation:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


class _StopOnText(StoppingCriteria):
    """Ends generation once the new text contains a stop string, so no tokens are wasted past it."""

    def __init__(self, tokenizer, stops: list[str], start: int):
        self.tokenizer, self.stops, self.start = tokenizer, stops, start

    def __call__(self, input_ids, scores, **kwargs):
        text = self.tokenizer.decode(input_ids[0, self.start:], skip_special_tokens=False)
        return torch.full((input_ids.shape[0],), any(s in text for s in self.stops), dtype=torch.bool)


def authorize(authorization: str | None = Header(None)) -> None:
    """A route dependency, so it runs before the body is validated: a keyless caller learns that first.
    The key lives on the replica's instance, which Serve keeps in the replica context."""
    key = serve.get_replica_context().servable_object.api_key
    if key and not hmac.compare_digest((authorization or "").encode(), f"Bearer {key}".encode()):
        raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                       code="invalid_api_key")


@serve.deployment(ray_actor_options={"num_cpus": REPLICA_CPUS})
@serve.ingress(api)
class OpenAIServer:
    def __init__(self, model_dir: str, served_name: str, template: str, max_tokens_limit: int,
                 max_prompt_tokens: int, api_key_env: str | None):
        torch.set_num_threads(REPLICA_CPUS)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, use_safetensors=True,
                                                          local_files_only=True).eval()
        eos = self.model.generation_config.eos_token_id
        eos = self.tokenizer.eos_token_id if eos is None else eos
        self.eos_ids = set(eos if isinstance(eos, list) else [eos])
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else min(self.eos_ids)
        self.served_name, self.template = served_name, template
        self.template_stops = stop_strings(template)
        self.max_tokens_limit, self.max_prompt_tokens = max_tokens_limit, max_prompt_tokens
        self.api_key = os.environ.get(api_key_env) if api_key_env else None
        self.created = int(time.time())
        # One generation at a time: a request's seed must own the global RNG, and the CPU is one core.
        self.lock = threading.Lock()
        # A template the tokenizer cannot render fails the deployment now, not every chat request later.
        render_prompt([{"role": "user", "content": "hi"}], template, self.tokenizer)

    @api.get("/v1/models", dependencies=[Depends(authorize)])
    def models(self):
        card = {"id": self.served_name, "object": "model", "created": self.created, "owned_by": "tuneline"}
        return {"object": "list", "data": [card]}

    @api.post("/v1/completions", dependencies=[Depends(authorize)])
    def completions(self, req: CompletionRequest):
        prompt = req.prompt if isinstance(req.prompt, str) else req.prompt[0]
        ids = self.tokenizer(prompt)["input_ids"]
        gen = self._generate(req, ids, "prompt", req.max_tokens or COMPLETION_DEFAULT_MAX_TOKENS)
        return self._respond(req, gen, chat=False)

    @api.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    def chat_completions(self, req: ChatRequest):
        prompt = render_prompt([m.model_dump() for m in req.messages], self.template, self.tokenizer)
        max_tokens = req.max_tokens or req.max_completion_tokens or self.max_tokens_limit
        # Encoded as in training (tasks.tokenize), so the model sees the prompts it was tuned on.
        ids = encode_prompt(self.tokenizer, prompt, self.template)
        gen = self._generate(req, ids, "messages", max_tokens)
        return self._respond(req, gen, chat=True)

    def _generate(self, req: _Sampling, prompt_ids: list[int], param: str, max_tokens: int) -> Generation:
        if req.model is not None and req.model != self.served_name:
            raise APIError(404, f"model {req.model!r} is not served here; this server serves "
                           f"{self.served_name!r}", "model", "model_not_found")
        if max_tokens > self.max_tokens_limit:
            raise APIError(400, f"max_tokens={max_tokens} is over this server's limit of "
                           f"{self.max_tokens_limit}", "max_tokens")
        n_prompt = len(prompt_ids)
        if n_prompt == 0:
            raise APIError(400, "the prompt is empty", param)
        if n_prompt > self.max_prompt_tokens:
            raise APIError(400, f"the prompt has {n_prompt} tokens, over this server's limit of "
                           f"{self.max_prompt_tokens}", param)
        stops = ([req.stop] if isinstance(req.stop, str) else req.stop or []) + self.template_stops
        sampling = ({"do_sample": True, "temperature": req.temperature, "top_p": req.top_p, "top_k": 0}
                    if req.temperature > 0 else {"do_sample": False})
        ids = torch.tensor([prompt_ids])
        criteria = StoppingCriteriaList([_StopOnText(self.tokenizer, stops, n_prompt)] if stops else [])
        with self.lock, torch.no_grad():
            if req.seed is not None:
                torch.manual_seed(req.seed)
            out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                      max_new_tokens=max_tokens, pad_token_id=self.pad_id,
                                      stopping_criteria=criteria, **sampling)
        new_ids = out[0, n_prompt:].tolist()
        text, finish = self._cut(new_ids, stops)
        return Generation(text, finish, n_prompt, len(new_ids))

    def _cut(self, new_ids: list[int], stops: list[str]) -> tuple[str, str]:
        """The answer text up to EOS or the first stop string, and why it ended."""
        at_eos = next((i for i, t in enumerate(new_ids) if t in self.eos_ids), None)
        text = self.tokenizer.decode(new_ids[:at_eos], skip_special_tokens=False)
        cut = min((text.index(s) for s in stops if s in text), default=None)
        if cut is not None:
            return text[:cut], "stop"
        return text, "length" if at_eos is None else "stop"

    def _respond(self, req: _Sampling, gen: Generation, chat: bool):
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        head = {"id": rid, "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()), "model": self.served_name}
        usage = {"prompt_tokens": gen.prompt_tokens, "completion_tokens": gen.completion_tokens,
                 "total_tokens": gen.prompt_tokens + gen.completion_tokens}
        if not req.stream:
            answer = {"message": {"role": "assistant", "content": gen.text}} if chat else {"text": gen.text}
            choice = {"index": 0, **answer, "logprobs": None, "finish_reason": gen.finish_reason}
            return {**head, "choices": [choice], "usage": usage}
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        events = self._events(head, gen, usage, chat, include_usage)
        return StreamingResponse(events, media_type="text/event-stream")

    def _events(self, head: dict, gen: Generation, usage: dict, chat: bool,
                include_usage: bool) -> Iterator[str]:
        """Server-sent events in OpenAI's chunk format; the text was generated whole, then cut in pieces."""
        if chat:
            head = {**head, "object": "chat.completion.chunk"}

        def event(text: str | None, finish: str | None, role: bool = False) -> str:
            if chat:
                delta = {"role": "assistant"} if role else {}
                if text is not None:
                    delta["content"] = text
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            return f"data: {json.dumps({**head, 'choices': [choice]})}\n\n"

        if chat:
            yield event("", None, role=True)
        for i in range(0, len(gen.text), STREAM_CHUNK_CHARS):
            yield event(gen.text[i:i + STREAM_CHUNK_CHARS], None)
        yield event(None, gen.finish_reason)
        if include_usage:
            yield f"data: {json.dumps({**head, 'choices': [], 'usage': usage})}\n\n"
        yield "data: [DONE]\n\n"


def build_app(model_dir: str, served_name: str, template: str, max_tokens_limit: int = 256,
              max_prompt_tokens: int = 1024, api_key_env: str | None = None):
    """The bound Serve application for `serve.run`: one replica serving the model in `model_dir`."""
    deployment = OpenAIServer
    key = os.environ.get(api_key_env) if api_key_env else None
    if key:
        # Replicas see the environment of the cluster, not of this process: a cluster started before
        # the key was exported (or on another host) would serve without it. Ship the key along.
        env = {"env_vars": {api_key_env: key}}
        deployment = deployment.options(ray_actor_options={"num_cpus": REPLICA_CPUS, "runtime_env": env})
    return deployment.bind(str(Path(model_dir).resolve()), served_name, template, max_tokens_limit,
                           max_prompt_tokens, api_key_env)
