"""The Ray Serve application: merged models behind an OpenAI-compatible HTTP API.

`GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions` (with `stream`), so any
OpenAI client can talk to a served Tuneline model, and `GET /v1/metrics` (JSON: requests,
latency, time to first token, tokens/s, batch sizes) for `tuneline serve status`. Every bad
request gets an OpenAI-style 4xx body, never a 500 with a traceback.

Two deployments:

- `ModelServer` loads one model (a folder or an MLflow URI such as `models:/NAME@champion`,
  fetched inside the replica), batches concurrent requests with `@serve.batch` (streams bypass
  the batcher), autoscales, and takes a GPU per replica where the cluster has one.
- `Router` is the FastAPI ingress: body size limit, API key, validation, OpenAI formatting, metrics.
  It holds a handle to the ModelServer that serves; it knows no model, so it can point at any version.
  Requests that name an adapter go to an AdapterServer (serving/adapters.py) by Serve's model multiplexing.
  A plain request whose model replica dies under it (killed, its node lost) goes once more, to a
  replica that lives: generation has no side effects, so the client sees a success, not a 500.

Two layouts of them:

- `build_app` (and `app_builder`, for `serve deploy serving/serve_config.yaml`): one application,
  the router bound to its model server.
- `build_model_app` + `build_router_app`: what the deploy stage runs for zero-downtime promotion.
  Each model version is an application of its own without a route (`tuneline-v3`); the router
  application owns the public route `/`, and its config names the version application it sends
  traffic to. Switching = redeploying the router with another name in that config: Serve starts
  the new router replicas beside the old ones (max_surge_percent=100) and moves traffic only when
  they run, the old ones drain, and the old version is removed only after that. See tasks/promotion.py.
"""

import asyncio
import hashlib
import hmac
import json
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from fastapi import Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.handle import DeploymentHandle
from ray.serve.metrics import Counter, Histogram
from starlette.exceptions import HTTPException

from serving.api import (
    DONE,
    VERSION_HEADER,
    APIError,
    ChatRequest,
    CompletionRequest,
    Stats,
    chunk,
    completion_body,
    error_response,
    head,
    to_spec,
    usage_chunk,
)

# A model replica reserves one CPU and uses one thread: the threads of several replicas would
# otherwise fight over the same cores. The router does only I/O and reserves none.
REPLICA_CPUS = 1
ROUTER_DEPLOYMENT, MODEL_DEPLOYMENT = "Router", "ModelServer"
ROUTER_MAX_ONGOING = 1024  # the router only awaits; the model servers' queues are the real limit
DRAIN_TIMEOUT_S = 120.0  # a stopping replica finishes its requests (and streams) for up to this long
# A model that fails to load (corrupt weights, wrong format) fails the same way again, so a new version's
# deployment is DEPLOY_FAILED after one failed replica start (downloads retry inside it: serving/engine.py).
MODEL_CONSTRUCTOR_RETRIES = 1
MAX_REQUEST_BYTES = 1 << 20  # serving.max_request_bytes: a body over it gets 413 before anything parses it
RETRIED = "a model replica died under a request; sent it once more"  # the Router's log says so at each retry
LATENCY_BUCKETS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120]

api = FastAPI(title="Tuneline", docs_url=None, redoc_url=None)
log = logging.getLogger("ray.serve")  # Serve writes it to the replica's log file


def _replica() -> "Router":
    return serve.get_replica_context().servable_object


def _error(status: int, message: str, param: str | None = None, code: str | None = None):
    _replica().count_error(status)
    return error_response(status, message, param, code)


@api.exception_handler(APIError)
def _api_error(request: Request, exc: APIError):
    return _error(exc.status, exc.message, exc.param, exc.code)


@api.exception_handler(RequestValidationError)
def _invalid_request(request: Request, exc: RequestValidationError):
    errors = exc.errors()
    if errors and errors[0]["type"] == "json_invalid":
        return _error(400, f"malformed JSON body: {errors[0].get('ctx', {}).get('error', '')}")
    fields = [[str(p) for p in e["loc"] if p != "body"] for e in errors]
    message = "; ".join(f"{'.'.join(f) or 'body'}: {e['msg']}" for f, e in zip(fields, errors, strict=True))
    return _error(400, message, param=fields[0][0] if fields and fields[0] else None)


@api.exception_handler(HTTPException)
def _http_error(request: Request, exc: HTTPException):
    return _error(exc.status_code, str(exc.detail))


@api.exception_handler(Exception)
def _server_error(request: Request, exc: Exception):
    return _error(500, f"the server failed: {type(exc).__name__}: {str(exc)[-500:]}")


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
        limit = _replica().max_request_bytes
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


def authorize(authorization: str | None = Header(None)) -> None:
    """A route dependency, so it runs before the body is validated: a keyless caller learns that first."""
    digest = _replica().api_key_sha256
    if not digest:
        return
    scheme, _, token = (authorization or "").partition(" ")
    if not (scheme == "Bearer" and hmac.compare_digest(key_digest(token), digest)):
        raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")


@serve.deployment(ray_actor_options={"num_cpus": REPLICA_CPUS}, graceful_shutdown_timeout_s=DRAIN_TIMEOUT_S,
                  max_constructor_retry_count=MODEL_CONSTRUCTOR_RETRIES)
class ModelServer:
    """One model: batched generation for plain requests, token streaming for `stream` requests."""

    def __init__(self, model: str, template: str, max_tokens_limit: int = 256, max_prompt_tokens: int = 1024,
                 tracking_uri: str | None = None, max_batch_size: int = 8, batch_wait_timeout_s: float = 0.02):
        from serving.inference import Engine  # torch and transformers load in the replica, not in the router

        self.engine = Engine(model, template, max_tokens_limit, max_prompt_tokens, tracking_uri,
                             threads=REPLICA_CPUS)
        self.max_batch_size, self.batch_wait_timeout_s = max_batch_size, batch_wait_timeout_s
        self._batched.set_max_batch_size(max_batch_size)
        self._batched.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self.executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="generate")  # they queue on one lock
        # Ray's batcher forms the next batch while one runs (it waits only batch_wait_timeout_s), so under
        # load it would cut a queue of small batches. Requests wait here instead until the model is free,
        # then all of them enter the batcher together and form one full batch.
        self.model_free = asyncio.Event()
        self.model_free.set()
        self.tags = {"model_version": str(self.engine.source.get("version") or "")}
        self.batch_sizes = Histogram("tuneline_batch_size", "requests per generated batch",
                                     boundaries=[1, 2, 4, 8, 16, 32, 64], tag_keys=("model_version",))
        self.tokens = Counter("tuneline_generated_tokens", "completion tokens generated", tag_keys=("model_version",))
        self.speed = Histogram("tuneline_batch_tokens_per_s", "completion tokens per second of one generate call",
                               boundaries=[1, 10, 50, 100, 250, 500, 1000, 2500, 5000, 10000],
                               tag_keys=("model_version",))

    def info(self) -> dict:
        return {**self.engine.info(), "max_batch_size": self.max_batch_size,
                "batch_wait_timeout_s": self.batch_wait_timeout_s}

    async def generate(self, spec: dict) -> dict:
        """One request (serving.api.to_spec) through the batcher; a result dict, or {"error": ...}."""
        try:
            job = self.engine.prepare(spec)
        except APIError as e:
            return {"error": e.to_dict()}
        await self.model_free.wait()
        return await self._batched(job)

    async def _run(self, work, *args):
        """An Engine call on the model's threads; AdapterServer (serving/adapters.py) puts the request's adapter
        in place first."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, work, *args)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02)  # the real values come from __init__
    async def _batched(self, jobs: list) -> list[dict]:
        self.model_free.clear()
        try:
            results = await self._run(self.engine.generate, jobs)
        except Exception as e:  # the model failed (NaN logits, out of memory): every request of the batch says so
            error = APIError(500, f"the model failed: {type(e).__name__}: {str(e)[-500:]}", code="model_error")
            return [{"error": error.to_dict()} for _ in jobs]
        finally:
            self.model_free.set()
        self._observe(results)
        return results

    def _observe(self, results: list[dict]) -> None:
        tokens = sum(r["completion_tokens"] for r in results)
        self.batch_sizes.observe(len(results), tags=self.tags)
        self.tokens.inc(tokens, tags=self.tags)
        if results[0]["generate_s"] > 0:
            self.speed.observe(tokens / results[0]["generate_s"], tags=self.tags)

    async def stream(self, spec: dict):
        """Yields {"error"} or {"prompt_tokens"} first, then {"text"} pieces, then {"final": result}."""
        try:
            job = self.engine.prepare(spec)
        except APIError as e:
            yield {"error": e.to_dict()}
            return
        yield {"prompt_tokens": len(job.ids)}
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()  # set when the client goes away: generation stops at the next token

        def emit(text: str) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, text)

        future = asyncio.ensure_future(self._run(self.engine.stream, job, emit, cancel))
        future.add_done_callback(lambda _: queue.put_nowait(None))
        try:
            while (text := await queue.get()) is not None:
                yield {"text": text}
            result = future.result()
            self._observe([result])
            yield {"final": result}
        finally:
            cancel.set()


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=ROUTER_MAX_ONGOING,
                  graceful_shutdown_timeout_s=DRAIN_TIMEOUT_S, max_surge_percent=100)
@serve.ingress(api)
class Router:
    """The public face: OpenAI endpoints, key, validation and metrics, in front of one ModelServer."""

    def __init__(self, model: DeploymentHandle | None = None):
        self.bound = model
        self.stats = Stats()
        self.model_info: dict | None = None
        self.version: str | None = None
        self.requests = Counter("tuneline_requests", "HTTP requests by route and status",
                                tag_keys=("route", "status", "model_version"))
        self.latency = Histogram("tuneline_request_latency_s", "request latency, seconds",
                                 boundaries=LATENCY_BUCKETS, tag_keys=("route", "model_version"))
        self.ttft = Histogram("tuneline_ttft_s", "time to first token, seconds",
                              boundaries=LATENCY_BUCKETS, tag_keys=("route", "model_version"))

    def reconfigure(self, config: dict) -> None:
        """Serve's user_config: served_name, max_tokens_limit, max_request_bytes, api_key_env and
        api_key_sha256 (see _router_deployment), adapters (names that the bound AdapterServer serves too), and
        in the deploy layout active_app (the version application to send traffic to) and version."""
        key_env = config.get("api_key_env")
        own_key = os.environ.get(key_env) if key_env else None
        self.api_key_sha256 = config.get("api_key_sha256") or (key_digest(own_key) if own_key else None)
        if key_env and not self.api_key_sha256:
            raise RuntimeError(f"serving.api_key_env is {key_env!r}, but that variable is not set for this "
                               "replica: refusing to serve without the key")
        self.served_name, self.max_tokens_limit = config["served_name"], int(config["max_tokens_limit"])
        self.max_request_bytes = int(config.get("max_request_bytes", MAX_REQUEST_BYTES))
        self.active_app = config.get("active_app")
        self.model = serve.get_deployment_handle(MODEL_DEPLOYMENT, self.active_app) if self.active_app else self.bound
        if self.model is None:
            raise ValueError("Router: bind a ModelServer or name config['active_app']")
        self.adapters = {name: self.model.options(multiplexed_model_id=name) for name in config.get("adapters", [])}
        if config.get("version") != self.version:
            self.stats, self.model_info = Stats(), None
        self.version = config.get("version")
        self.created = int(time.time())

    def info(self) -> dict:
        """For the deploy stage, through a handle: where traffic goes now."""
        return {"active_app": self.active_app, "version": self.version, "served_name": self.served_name}

    async def _model_info(self) -> dict:
        if self.model_info is None:
            self.model_info = await self.model.info.remote()
        return self.model_info

    async def _version(self) -> str:
        return str(self.version or (await self._model_info()).get("version") or "")

    def count_error(self, status: int) -> None:
        self.stats.error(status)
        self.requests.inc(tags={"route": "", "status": str(status), "model_version": str(self.version or "")})

    def _done(self, route: str, version: str, latency: float, ttft: float | None, gen: dict, stream: bool) -> None:
        self.stats.done(latency, ttft, gen["completion_tokens"], None if stream else gen.get("batch_size"), stream)
        tags = {"route": route, "model_version": version}
        self.requests.inc(tags={**tags, "status": "200"})
        self.latency.observe(latency, tags=tags)
        if ttft is not None:
            self.ttft.observe(ttft, tags=tags)

    @api.get("/v1/models", dependencies=[Depends(authorize)])
    async def models(self):
        card = {"id": self.served_name, "object": "model", "created": self.created, "owned_by": "tuneline"}
        loaded = await self.model.loaded_adapters.remote() if self.adapters else {}  # of the replica that answered
        cards = [{**card, "id": name, "parent": self.served_name, "loaded": name in loaded} for name in self.adapters]
        return {"object": "list", "data": [card, *cards]}

    @api.get("/v1/metrics", dependencies=[Depends(authorize)])
    async def metrics(self):
        """This router's view since its version went live (Prometheus has the same through Ray)."""
        info = await self._model_info()
        return {"served_model": self.served_name, "version": await self._version() or None, "app": self.active_app,
                "model": info, **self.stats.snapshot()}

    @api.post("/v1/completions", dependencies=[Depends(authorize)])
    async def completions(self, req: CompletionRequest):
        return await self._serve(req, chat=False)

    @api.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat_completions(self, req: ChatRequest):
        return await self._serve(req, chat=True)

    async def _serve(self, req: CompletionRequest | ChatRequest, chat: bool):
        start = time.perf_counter()
        if req.model is not None and req.model != self.served_name and req.model not in self.adapters:
            served = ", ".join(map(repr, [self.served_name, *self.adapters]))
            raise APIError(404, f"model {req.model!r} is not served here; this server serves {served}",
                           "model", "model_not_found")
        spec = {**to_spec(req, self.max_tokens_limit), "model": req.model or self.served_name}
        version = await self._version()
        headers = {VERSION_HEADER: version} if version else {}
        route = "chat" if chat else "completions"
        if req.stream:
            return await self._stream(req, spec, chat, route, version, start, headers)
        gen = await self._generate(spec)
        if "error" in gen:
            raise APIError.from_dict(gen["error"])
        latency = time.perf_counter() - start
        # As a client sees it: everything but the time spent after the first token.
        self._done(route, version, latency, latency - (gen["latency_s"] - gen["ttft_s"]), gen, stream=False)
        return JSONResponse(completion_body(head(chat, spec["model"], False), gen, chat), headers=headers)

    def _model(self, spec: dict) -> DeploymentHandle:
        return self.adapters.get(spec["model"], self.model)

    async def _generate(self, spec: dict) -> dict:
        try:
            return await self._model(spec).generate.remote(spec)
        except RayActorError as e:  # its replica died; Serve's handle has dropped it, so this goes to another
            log.warning(f"{RETRIED}: {type(e).__name__}")
            return await self._model(spec).generate.remote(spec)

    async def _stream(self, req, spec: dict, chat: bool, route: str, version: str, start: float, headers: dict):
        events = self._model(spec).options(stream=True).stream.remote(spec)
        first = await events.__anext__()  # a request the model refuses still gets its 4xx, not a broken stream
        if "error" in first:
            raise APIError.from_dict(first["error"])
        top = head(chat, spec["model"], True)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        async def sse():
            ttft, final = None, None
            try:
                if chat:
                    yield chunk(top, chat, "", role=True)
                async for item in events:
                    if "text" in item:
                        ttft = ttft if ttft is not None else time.perf_counter() - start
                        yield chunk(top, chat, item["text"])
                    elif "final" in item:
                        final = item["final"]
            except Exception as e:  # the status line is sent already: say it in the stream, then end it
                self.count_error(500)
                body = {"error": {"message": f"the model failed: {type(e).__name__}: {str(e)[-500:]}",
                                  "type": "server_error", "param": None, "code": "model_error"}}
                yield f"data: {json.dumps(body)}\n\n"
                return
            yield chunk(top, chat, None, final["finish_reason"])
            if include_usage:
                yield usage_chunk(top, final)
            yield DONE
            latency = time.perf_counter() - start
            self._done(route, version, latency, ttft if ttft is not None else latency, final, stream=True)

        return StreamingResponse(sse(), media_type="text/event-stream", headers=headers)


class AppArgs(BaseModel):
    """The arguments of `app_builder`, as `args:` of a Serve config file (serving/serve_config.yaml)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="a folder, models:/NAME/VERSION, models:/NAME@ALIAS or another MLflow URI")
    served_name: str = "tuneline-default"
    template: str = "alpaca"
    tracking_uri: str | None = Field(None, description="MLflow; null: MLFLOW_TRACKING_URI of the replicas")
    max_tokens_limit: int = Field(256, gt=0)
    max_prompt_tokens: int = Field(1024, gt=0)
    api_key_env: str | None = None
    max_request_bytes: int = Field(MAX_REQUEST_BYTES, gt=0)
    max_batch_size: int = Field(8, gt=0)
    batch_wait_timeout_s: float = Field(0.02, ge=0)
    min_replicas: int = Field(1, ge=1)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(8.0, gt=0)
    gpus_per_replica: float = Field(0, ge=0, description="0: 1 when the cluster has a GPU, else 0")


def replica_gpus(requested: float) -> float:
    """serving.gpus_per_replica, where 0 means: one GPU when the cluster (else this machine) has any."""
    if requested:
        return requested
    import ray

    if ray.is_initialized():
        return 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
    import torch

    return 1.0 if torch.cuda.is_available() else 0.0


def model_server(model: str, template: str, max_tokens_limit: int = 256, max_prompt_tokens: int = 1024, *,
                 tracking_uri: str | None = None, max_batch_size: int = 8, batch_wait_timeout_s: float = 0.02,
                 min_replicas: int = 1, max_replicas: int = 1, target_ongoing_requests: float = 8.0,
                 gpus_per_replica: float = 0, server=ModelServer, **extra):
    """The bound ModelServer (or `server`, a subclass, with its `extra` arguments), with batching, autoscaling
    and GPU options applied."""
    deployment = server.options(
        ray_actor_options={"num_cpus": REPLICA_CPUS, "num_gpus": replica_gpus(gpus_per_replica)},
        # Enough in flight to fill one batch while the one before generates.
        max_ongoing_requests=max(2 * max_batch_size, int(2 * target_ongoing_requests)),
        autoscaling_config={"min_replicas": min_replicas, "max_replicas": max(min_replicas, max_replicas),
                            "target_ongoing_requests": target_ongoing_requests},
    )
    return deployment.bind(model, template, max_tokens_limit, max_prompt_tokens, tracking_uri, max_batch_size,
                           batch_wait_timeout_s, **extra)


def _router_deployment(served_name: str, max_tokens_limit: int, api_key_env: str | None, max_request_bytes: int,
                       **extra):
    # Replicas see the environment of the cluster, not of this process: a cluster started before the key was
    # exported (or on another host) would serve without it. So the key's digest travels along in user_config:
    # never the key itself, which Ray writes into its logs (runtime_env env_vars) and its stored configs.
    key = os.environ.get(api_key_env) if api_key_env else None
    config = {"served_name": served_name, "max_tokens_limit": max_tokens_limit, "api_key_env": api_key_env,
              "api_key_sha256": key_digest(key) if key else None, "max_request_bytes": max_request_bytes, **extra}
    return Router.options(user_config=config, ray_actor_options={"num_cpus": 0})


def build_app(model: str, served_name: str, template: str, max_tokens_limit: int = 256, max_prompt_tokens: int = 1024,
              api_key_env: str | None = None, max_request_bytes: int = MAX_REQUEST_BYTES, **options):
    """One application for `serve.run`: the router in front of a ModelServer of `model` (a folder or an
    MLflow URI). `options`: the keyword arguments of `model_server` (batching, autoscaling, GPUs)."""
    server = model_server(model, template, max_tokens_limit, max_prompt_tokens, **options)
    return _router_deployment(served_name, max_tokens_limit, api_key_env, max_request_bytes).bind(server)


def build_model_app(model: str, template: str, max_tokens_limit: int = 256, max_prompt_tokens: int = 1024,
                    **options):
    """A model version as an application of its own (deploy it with route_prefix=None)."""
    return model_server(model, template, max_tokens_limit, max_prompt_tokens, **options)


def build_router_app(served_name: str, max_tokens_limit: int, api_key_env: str | None, active_app: str,
                     version: str | None = None, max_request_bytes: int = MAX_REQUEST_BYTES):
    """The router alone, sending traffic to the ModelServer of application `active_app`."""
    return _router_deployment(served_name, max_tokens_limit, api_key_env, max_request_bytes, active_app=active_app,
                              version=version).bind()


def app_builder(args: AppArgs | dict):
    """The application builder of `serve deploy` / `serve run` (import_path: serving.app:app_builder)."""
    a = args if isinstance(args, AppArgs) else AppArgs.model_validate(args)
    options = a.model_dump(exclude={"model", "served_name", "template", "max_tokens_limit", "max_prompt_tokens",
                                    "api_key_env", "max_request_bytes"})
    return build_app(a.model, a.served_name, a.template, a.max_tokens_limit, a.max_prompt_tokens, a.api_key_env,
                     a.max_request_bytes, **options)
