"""The router deployment: `Router`, the public face that forwards each request to the model version that serves.

`Router` is the FastAPI ingress (serving/ingress.py: body size limit, API key, error bodies) with the
OpenAI routes: validation, OpenAI formatting, metrics. It holds a handle to the ModelServer that
serves (bound to it, or the one of the version application its config names); it knows no model,
so it can point at any version. Requests that name an adapter go to an AdapterServer
(serving/adapters.py) by Serve's model multiplexing. Fine-tuned models of the fine-tuning API run beside
the champion, each a version application of its own (config `fine_tuned`: name -> app, tenant, version);
only their tenant's API keys (config `tenant_keys`: SHA-256 -> tenant) see and use them. A plain
request whose model replica dies under it (killed, its node lost) goes once more, to a replica that
lives: generation has no side effects, so the client sees a success, not a 500.

`router_deployment` gives the Router its config (`user_config`), which `Router.reconfigure` reads.
"""

import json
import logging
import os
import time

from fastapi import Depends, Header
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.handle import DeploymentHandle
from ray.serve.metrics import Counter, Histogram

from serving.api import (
    DONE,
    VERSION_HEADER,
    APIError,
    ChatRequest,
    CompletionRequest,
    Stats,
    chunk,
    completion_body,
    head,
    to_spec,
    usage_chunk,
)
from serving.ingress import api, authorize, key_digest, tenant_of
from serving.model_server import DRAIN_TIMEOUT_S, MODEL_DEPLOYMENT
from tuneline.config import Serving

ROUTER_MAX_ONGOING = 1024  # the router only awaits; the model servers' queues are the real limit
RETRIED = "a model replica died under a request; sent it once more"  # the Router's log says so at each retry
LATENCY_BUCKETS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120]

log = logging.getLogger("ray.serve")  # Serve writes it to the replica's log file


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
        api_key_sha256 (see router_deployment), adapters (names that the bound AdapterServer serves too), and
        in the deploy layout active_app (the version application to send traffic to) and version."""
        key_env = config.get("api_key_env")
        own_key = os.environ.get(key_env) if key_env else None
        self.api_key_sha256 = config.get("api_key_sha256") or (key_digest(own_key) if own_key else None)
        if key_env and not self.api_key_sha256:
            raise RuntimeError(f"serving.api_key_env is {key_env!r}, but that variable is not set for this "
                               "replica: refusing to serve without the key")
        self.served_name, self.max_tokens_limit = config["served_name"], int(config["max_tokens_limit"])
        self.max_request_bytes = int(config["max_request_bytes"])
        self.active_app = config.get("active_app")
        self.model = serve.get_deployment_handle(MODEL_DEPLOYMENT, self.active_app) if self.active_app else self.bound
        self.fine_tuned, self.tenant_keys = dict(config.get("fine_tuned") or {}), dict(config.get("tenant_keys") or {})
        self.fine_tuned_handles = {name: serve.get_deployment_handle(MODEL_DEPLOYMENT, m["app"])
                                   for name, m in self.fine_tuned.items()}
        if self.model is None and not self.fine_tuned:
            raise ValueError("Router: bind a ModelServer, name config['active_app'] or serve fine-tuned models")
        self.adapters = {name: self.model.options(multiplexed_model_id=name) for name in config.get("adapters", [])}
        if config.get("version") != self.version:
            self.stats, self.model_info = Stats(), None
        self.version = config.get("version")
        self.created = int(time.time())

    def info(self) -> dict:
        """For the deploy stage, through a handle: where traffic goes now, and the fine-tuned models beside."""
        return {"active_app": self.active_app, "version": self.version, "served_name": self.served_name,
                "fine_tuned": self.fine_tuned, "tenant_keys": self.tenant_keys}

    async def _model_info(self) -> dict:
        if self.model_info is None and self.model is not None:
            self.model_info = await self.model.info.remote()
        return self.model_info or {}

    def _visible(self, name: str, authorization: str | None) -> bool:
        """A fine-tuned model is its tenant's: with tenant keys, only a key of that tenant sees it."""
        return not self.tenant_keys or tenant_of(authorization, self.tenant_keys) == self.fine_tuned[name]["tenant"]

    async def _version(self) -> str:
        return str(self.version or (await self._model_info()).get("version") or "")

    def count_error(self, status: int) -> None:
        self.stats.error(status)
        self.requests.inc(tags={"route": "", "status": str(status), "model_version": str(self.version or "")})

    def _done(self, route: str, version: str, latency: float, ttft: float | None, gen: dict, stream: bool) -> None:
        self.stats.done(latency, ttft, gen["completion_tokens"], gen.get("batch_size"), stream)
        tags = {"route": route, "model_version": version}
        self.requests.inc(tags={**tags, "status": "200"})
        self.latency.observe(latency, tags=tags)
        if ttft is not None:
            self.ttft.observe(ttft, tags=tags)

    @api.get("/v1/models", dependencies=[Depends(authorize)])
    async def models(self, authorization: str | None = Header(None)):
        card = {"id": self.served_name, "object": "model", "created": self.created, "owned_by": "tuneline"}
        loaded = await self.model.loaded_adapters.remote() if self.adapters else {}  # of the replica that answered
        cards = [{**card, "id": name, "parent": self.served_name, "loaded": name in loaded} for name in self.adapters]
        tuned = [{**card, "id": name, "owned_by": m["tenant"]} for name, m in self.fine_tuned.items()
                 if self._visible(name, authorization)]
        return {"object": "list", "data": [*([card] if self.model is not None else []), *cards, *tuned]}

    @api.get("/v1/metrics", dependencies=[Depends(authorize)])
    async def metrics(self):
        """This router's view since its version went live (Prometheus has the same through Ray)."""
        info = await self._model_info()
        return {"served_model": self.served_name, "version": await self._version() or None, "app": self.active_app,
                "model": info, **self.stats.snapshot()}

    @api.post("/v1/completions", dependencies=[Depends(authorize)])
    async def completions(self, req: CompletionRequest, authorization: str | None = Header(None)):
        return await self._serve(req, chat=False, authorization=authorization)

    @api.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat_completions(self, req: ChatRequest, authorization: str | None = Header(None)):
        return await self._serve(req, chat=True, authorization=authorization)

    async def _serve(self, req: CompletionRequest | ChatRequest, chat: bool, authorization: str | None = None):
        start = time.perf_counter()
        tuned = req.model in self.fine_tuned and self._visible(req.model, authorization)
        champion = self.model is not None and (req.model is None or req.model == self.served_name
                                               or req.model in self.adapters)
        if not (tuned or champion):
            names = [self.served_name] * (self.model is not None) + list(self.adapters)
            names += [n for n in self.fine_tuned if self._visible(n, authorization)]
            served = ", ".join(map(repr, names)) or "nothing yet"
            raise APIError(404, f"model {req.model!r} is not served here; this server serves {served}",
                           "model", "model_not_found")
        spec = {**to_spec(req, self.max_tokens_limit), "model": req.model or self.served_name}
        version = str(self.fine_tuned[req.model]["version"]) if tuned else await self._version()
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
        return self.fine_tuned_handles.get(spec["model"]) or self.adapters.get(spec["model"], self.model)

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


ROUTER_DEPLOYMENT = Router.name  # Serve's name for the deployment, as its logs and status show it


def router_deployment(served_name: str, serving: Serving, **extra):
    """The Router with its user_config: `served_name`, the limits and API key of `serving`, and `extra`
    (adapters; active_app and version in the deploy layout)."""
    # Replicas see the environment of the cluster, not of this process: a cluster started before the key was
    # exported (or on another host) would serve without it. So the key's digest travels along in user_config:
    # never the key itself, which Ray writes into its logs (runtime_env env_vars) and its stored configs.
    key = os.environ.get(serving.api_key_env) if serving.api_key_env else None
    config = {"served_name": served_name, "max_tokens_limit": serving.max_tokens_limit,
              "api_key_env": serving.api_key_env, "api_key_sha256": key_digest(key) if key else None,
              "max_request_bytes": serving.max_request_bytes, **extra}
    return Router.options(user_config=config, ray_actor_options={"num_cpus": 0})
