"""The Ray Serve application builders: a Router and ModelServers, bound with their options.

Every builder takes the `serving` section of params (tuneline.config.Serving): its limits, API key,
batching, autoscaling and GPU settings are the only defaults there are.

Two layouts:

- `build_app` (and `app_builder`, for `serve deploy serving/serve_config.yaml`): one application,
  the router bound to its model server.
- `build_model_app` + `build_router_app`: what the deploy stage runs for zero-downtime promotion.
  Each model version is an application of its own without a route (`tuneline-v3`); the router
  application owns the public route `/`, and its config names the version application it sends
  traffic to. Switching = redeploying the router with another name in that config: Serve starts
  the new router replicas beside the old ones (max_surge_percent=100) and moves traffic only when
  they run, the old ones drain, and the old version is removed only after that. See serving/switch.py.
"""

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from serving.model_server import REPLICA_CPUS, ModelServer
from serving.router import router_deployment
from tuneline.config import Serving


def absolute_tracking_uri(uri: str) -> str:
    """Replicas run in other folders (and on other hosts): a relative SQLite or file store must be absolute."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).resolve())
    if "://" not in uri:
        return Path(uri).resolve().as_uri()
    return uri


def replica_gpus(requested: float) -> float:
    """serving.gpus_per_replica, where 0 means: one GPU when the cluster (else this machine) has any."""
    if requested:
        return requested
    import ray

    if ray.is_initialized():
        return 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
    import torch

    return 1.0 if torch.cuda.is_available() else 0.0


def model_server(model: str, template: str, serving: Serving, tracking_uri: str | None = None,
                 server=ModelServer, **extra):
    """The bound ModelServer (or `server`, a subclass, with its `extra` arguments), with the limits, batching,
    autoscaling and GPU options of `serving`. `tracking_uri`: MLflow's, for a registry URI; None: the
    MLFLOW_TRACKING_URI of the replicas."""
    s = serving
    deployment = server.options(
        ray_actor_options={"num_cpus": REPLICA_CPUS, "num_gpus": replica_gpus(s.gpus_per_replica)},
        # A full running batch, and as many waiting to take the slots that free up.
        max_ongoing_requests=max(2 * s.max_batch_size, int(2 * s.target_ongoing_requests)),
        autoscaling_config={"min_replicas": s.min_replicas, "max_replicas": max(s.min_replicas, s.max_replicas),
                            "target_ongoing_requests": s.target_ongoing_requests},
    )
    return deployment.bind(model, template, s.max_tokens_limit, s.max_prompt_tokens, tracking_uri, s.max_batch_size,
                           s.compile_decode, **extra)


def build_app(model: str, served_name: str, template: str, serving: Serving, tracking_uri: str | None = None):
    """One application for `serve.run`: the router in front of a ModelServer of `model` (a folder or an
    MLflow URI)."""
    return router_deployment(served_name, serving).bind(model_server(model, template, serving, tracking_uri))


def build_model_app(model: str, template: str, serving: Serving, tracking_uri: str | None = None):
    """A model version as an application of its own (deploy it with route_prefix=None)."""
    return model_server(model, template, serving, tracking_uri)


def build_router_app(served_name: str, serving: Serving, active_app: str | None, version: str | None = None,
                     **beside):
    """The router alone, sending traffic to the ModelServer of application `active_app` (None: no champion
    yet), and `beside` (fine_tuned, tenant_keys) to the fine-tuned models' applications (serving/router.py)."""
    return router_deployment(served_name, serving, active_app=active_app, version=version, **beside).bind()


# What a Serve config may set of `serving`; the rest (host, port, app_name, ...) belongs to the deploy stage.
SERVING_KEYS = ("max_tokens_limit", "max_prompt_tokens", "api_key_env", "max_request_bytes", "max_batch_size",
                "compile_decode", "min_replicas", "max_replicas", "target_ongoing_requests", "gpus_per_replica")


class AppArgs(BaseModel):
    """The arguments of `app_builder`, as `args:` of a Serve config file (serving/serve_config.yaml): what to
    serve, and beside it, flat, the keys of params' `serving` section that shape the app (SERVING_KEYS)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="a folder, models:/NAME/VERSION, models:/NAME@ALIAS or another MLflow URI")
    served_name: str = "tuneline-default"
    template: str = "alpaca"
    tracking_uri: str | None = Field(None, description="MLflow; null: MLFLOW_TRACKING_URI of the replicas")
    serving: Serving = Field(default_factory=Serving)

    @model_validator(mode="before")
    @classmethod
    def _gather_serving(cls, data: Any) -> Any:
        if isinstance(data, dict) and "serving" not in data:
            data = {k: v for k, v in data.items() if k not in SERVING_KEYS} | {
                "serving": {k: v for k, v in data.items() if k in SERVING_KEYS}}
        return data


def app_builder(args: AppArgs | dict):
    """The application builder of `serve deploy` / `serve run` (import_path: serving.builders:app_builder)."""
    a = args if isinstance(args, AppArgs) else AppArgs.model_validate(args)
    return build_app(a.model, a.served_name, a.template, a.serving, a.tracking_uri)
