"""Many LoRA adapters over one shared base model, on one replica set (Ray Serve model multiplexing).

`AdapterServer` is a ModelServer (serving/model_server.py: the same engine, streaming and metrics) whose
replicas load the base model once and the adapters of `serving.adapters` on demand. A request names
an adapter in its `model` field; the Router sends it with `multiplexed_model_id=<name>`, so Serve
routes it to a replica that has that adapter loaded, if one has. The
replica loads an adapter it lacks (`models:/NAME/VERSION` or `models:/NAME@ALIAS` from the MLflow
registry, or a PEFT adapter folder) into its PEFT model, and `@serve.multiplexed` evicts the least
recently used one beyond `max_loaded`. A request that names the base (`base_name`) gets the base
itself, adapters off. `GET /v1/models` lists the base and every adapter, saying which are loaded.

    serve run serving.adapters:app_builder params=params.yaml --name tuneline-adapters --route-prefix /adapters

Loading and evicting change the model on the engine's decoding thread, between two steps; an evicted
adapter leaves the model only once no running or waiting request uses it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

from ray import serve

from serving.builders import absolute_tracking_uri, model_server
from serving.model_server import DRAIN_TIMEOUT_S, MODEL_CONSTRUCTOR_RETRIES, REPLICA_CPUS, ModelServer
from serving.router import router_deployment
from tuneline.config import DEFAULT_PARAMS, Params, load_params

ADAPTER_FILE = "adapter_config.json"  # what makes a folder (or a registered artifact) a PEFT adapter
UNKNOWN = object()  # which adapter is in place, after PEFT changed it


class _Resident:
    """What Serve's multiplexer keeps for a loaded adapter. Serve calls the `__del__` of what it evicts; set on
    the instance, it runs only then, never from the garbage collector (which looks at the class)."""

    def __init__(self, unload: Callable[[], None]):
        self.__del__ = unload


@serve.deployment(ray_actor_options={"num_cpus": REPLICA_CPUS}, graceful_shutdown_timeout_s=DRAIN_TIMEOUT_S,
                  max_constructor_retry_count=MODEL_CONSTRUCTOR_RETRIES)
class AdapterServer(ModelServer.func_or_class):
    """The base model once, its adapters on demand; `serve.get_multiplexed_model_id()` says which one a
    request wants, "" for the base. Rows of different adapters share the engine's batch: each step runs one
    forward per adapter among its rows (serving/decoding.py)."""

    compiles_prefill = False  # adapters change the model's modules: a compiled prefill would compile again

    def __init__(self, model: str, template: str, max_tokens_limit: int, max_prompt_tokens: int,
                 tracking_uri: str | None, max_batch_size: int, compile_decode: bool = False, *,
                 adapters: dict[str, str], max_loaded: int):
        super().__init__(model, template, max_tokens_limit, max_prompt_tokens, tracking_uri, max_batch_size,
                         compile_decode)
        self.tracking_uri, self.sources, self.max_loaded = tracking_uri, dict(adapters), max_loaded
        self.peft = None  # the PeftModel around the base while any adapter is loaded
        self.loaded: dict[str, tuple[str, int]] = {}  # adapter -> (its PEFT key, bytes of its weights)
        self.loads = 0
        self.active: object = UNKNOWN  # the PEFT key in place now, None for the base (decoding thread)
        self.engine.decoder.activate = self._activate

        async def load(name: str) -> _Resident:
            return await self._load(name)

        self.get_adapter = serve.multiplexed(max_num_models_per_replica=max_loaded)(load)

    def info(self) -> dict:
        return {**super().info(), "adapters": list(self.sources), "max_loaded_adapters": self.max_loaded}

    def loaded_adapters(self) -> dict[str, int]:
        """The adapters this replica holds now, and the bytes of each one's weights."""
        return {name: size for name, (_, size) in self.loaded.items()}

    async def _prepare(self, spec: dict):
        job = self.engine.prepare(spec)
        name = serve.get_multiplexed_model_id()
        if name:
            await self.get_adapter(name)  # a no-op when loaded; else loads it, evicting the least recently used
            job.adapter = self.loaded[name][0]
        return job

    async def _load(self, name: str) -> _Resident:
        if name not in self.sources:
            raise KeyError(f"no adapter {name!r} here; this server has {', '.join(self.sources) or 'none'}")
        from serving.model_source import resolve_model

        # PEFT names modules after adapters (no dots), and an evicted adapter's key lives on until its last row ends.
        self.loads += 1
        key = f"adapter{self.loads}"
        loop = asyncio.get_running_loop()
        try:
            folder, _ = await loop.run_in_executor(None, resolve_model, self.sources[name], self.tracking_uri,
                                                   ADAPTER_FILE)
            size = await loop.run_in_executor(None, self.engine.decoder.call, lambda: self._attach(key, folder))
        except Exception as e:
            raise RuntimeError(f"adapter {name!r} ({self.sources[name]}) did not load: {e}") from e
        self.loaded[name] = (key, size)
        return _Resident(lambda: self._detach(name, key))

    def _attach(self, key: str, folder: Path) -> int:
        """On the decoding thread: load an adapter into the PEFT model; the bytes of its weights."""
        from peft import PeftConfig, PeftModel

        try:
            if self.peft is None:  # PeftModel.from_pretrained, in two steps: a failed load can be undone
                config = PeftConfig.from_pretrained(str(folder))
                config.inference_mode = True
                self.peft = self.engine.decoder.forward.model = PeftModel(self.engine.model, config, adapter_name=key)
            self.peft.load_adapter(str(folder), adapter_name=key)
        except Exception:
            if self.peft is not None and key in self.peft.peft_config:
                self._drop(key)
            raise
        self.peft.eval()  # LoRA dropout off
        self.active = UNKNOWN  # PEFT switched adapters as it loaded this one
        return sum(p.numel() * p.element_size() for n, p in self.peft.named_parameters() if key in n.split("."))

    def _detach(self, name: str, key: str) -> None:
        """Serve evicted `name`: it is gone from this replica's list now, and from the model once its rows end."""
        if self.loaded.get(name, (None,))[0] == key:
            del self.loaded[name]
        self.engine.decoder.call(lambda: self._drop(key), unless_in_use=key, wait=False)

    def _drop(self, key: str) -> None:
        if len(self.peft.peft_config) > 1:
            self.peft.delete_adapter(key)
        else:  # a PeftModel cannot run with no adapter: back to the bare base
            self.engine.model = self.engine.decoder.forward.model = self.peft.unload()
            self.peft = None
        self.active = UNKNOWN

    def _activate(self, key: str | None) -> None:
        """On the decoding thread, before a forward: the adapter of the rows it runs (None: the base)."""
        if self.peft is None or key == self.active:
            return
        if key:
            self.peft.base_model.enable_adapter_layers()
            self.peft.set_adapter(key)
        else:
            self.peft.base_model.disable_adapter_layers()
        self.active = key


def register_adapter(folder: Path, name: str, tracking_uri: str, alias: str | None = None,
                     experiment: str = "tuneline-adapters", artifact_location: str | None = None) -> str:
    """Register a PEFT adapter folder in the MLflow registry as a new version of `name` (its files are the
    artifacts of a run of `experiment`), optionally under `alias`; returns the version. Serve it as
    `models:/NAME/VERSION` or `models:/NAME@ALIAS`."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    if not (Path(folder) / ADAPTER_FILE).exists():
        raise FileNotFoundError(f"{folder}: no PEFT adapter here (no {ADAPTER_FILE})")
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    found = client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found else client.create_experiment(experiment, artifact_location)
    run = client.create_run(experiment_id, tags={"tuneline.adapter": name})
    client.log_artifacts(run.info.run_id, str(folder), "adapter")
    client.set_terminated(run.info.run_id)
    try:
        client.create_registered_model(name)
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    version = str(client.create_model_version(name, f"{run.info.artifact_uri}/adapter", run.info.run_id).version)
    if alias:
        client.set_registered_model_alias(name, alias, version)
    return version


def _absolute(source: str) -> str:
    """Replicas run in other folders: a relative local path must be absolute."""
    return source if "://" in source or source.startswith("models:/") else str(Path(source).resolve())


def adapter_app(params: Params):
    """The application of params' `serving.adapters` (and the rest of `serving`: limits, batching, replicas): the
    router in front of an AdapterServer of the base."""
    s, a = params.serving, params.serving.adapters
    adapters = {adapter.name: _absolute(adapter.source) for adapter in a.served}
    server = model_server(_absolute(a.base or params.model.base), params.data.template, s,
                          absolute_tracking_uri(params.registry.tracking_uri), server=AdapterServer,
                          adapters=adapters, max_loaded=a.max_loaded)
    return router_deployment(a.base_name, s, adapters=list(adapters)).bind(server)


def app_builder(args: dict):
    """For `serve run serving.adapters:app_builder params=PATH` (default params.yaml)."""
    return adapter_app(load_params(args.get("params", DEFAULT_PARAMS)))
