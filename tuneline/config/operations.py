"""The params.yaml sections of what runs around the stages: serving, Prefect orchestration, the Optuna sweep."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, model_validator

from tuneline.config.sections import PathOrURI, Section


class ServedAdapter(Section):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$", description="the `model` that requests name")
    source: str = Field(min_length=1, description="models:/NAME/VERSION or models:/NAME@ALIAS (MLflow registry), "
                                                 "or a PEFT adapter folder")


class ServingAdapters(Section):
    """LoRA adapters served over one shared base on one replica set (serving/adapters.py)."""

    base: str | None = Field(None, description="the base model the adapters were trained on; null: model.base")
    base_name: str = Field("base", min_length=1, description="the `model` that asks the base itself, adapters off")
    max_loaded: int = Field(4, gt=0, description="adapters loaded at once per replica; the least recently used goes")
    served: list[ServedAdapter] = Field(default_factory=list)

    @model_validator(mode="after")
    def _distinct_names(self) -> ServingAdapters:
        names = [a.name for a in self.served]
        clash = sorted({n for n in names if names.count(n) > 1} | ({self.base_name} & set(names)))
        if clash:
            raise ValueError(f"adapter names must differ from each other and from base_name: {', '.join(clash)}")
        return self


class Serving(Section):
    host: str = "127.0.0.1"
    port: int = Field(8000, gt=0, lt=65536)
    app_name: str = "tuneline"
    ray_address: str | None = Field(None, description="null: join the local cluster or start one")
    max_tokens_limit: int = Field(256, gt=0)
    max_prompt_tokens: int = Field(1024, gt=0)
    api_key_env: str | None = Field(None, description="name of the env var holding the API key")
    max_request_bytes: int = Field(1 << 20, gt=0, description="a larger request body gets 413, unparsed")
    health_timeout_s: float = Field(180, gt=0)
    max_batch_size: int = Field(8, gt=0, description="requests one replica generates at once (its continuous "
                                                    "batch; each holds a KV cache row of max_prompt_tokens + "
                                                    "max_tokens_limit)")
    compile_decode: bool = Field(False, description="GPU: torch.compile the decode step before its CUDA graphs "
                                 "are captured (with a step compiled for one row alone), and the prefill unless "
                                 "adapters are served (about 1.6x faster steps; a replica takes minutes longer "
                                 "to start: raise health_timeout_s)")
    min_replicas: int = Field(1, ge=1, description="model replicas, autoscaled between min and max")
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(8, gt=0, description="autoscaling target per replica")
    gpus_per_replica: float = Field(0, ge=0, description="0: auto, 1 if the cluster has a GPU, else 0")
    adapters: ServingAdapters = ServingAdapters()
    deploy: bool = Field(True, description="false: the deploy stage puts nothing live (fine-tuning jobs of the "
                                           "API: their models are served beside the champion, not as it)")

    @model_validator(mode="after")
    def _replica_range(self) -> Serving:
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas ({self.max_replicas}) is below min_replicas ({self.min_replicas})")
        return self


class Orchestration(Section):
    """Prefect: the `finetune` flow's stage cache and retries, its deployments, `tuneline prefect up`."""

    work_pool: str = Field("tuneline", min_length=1, description="Prefect process work pool of the deployments")
    retrain_cron: str = Field("0 3 * * 1", pattern=r"^\s*\S+(\s+\S+){4}\s*$",
                              description="cron of finetune/finetune-scheduled-retrain (five fields)")
    timezone: str = Field("UTC", description="time zone of retrain_cron")
    results_dir: Path = Field(Path(".prefect-results"), description="persisted task results: the flow's stage cache")
    retries: int = Field(3, ge=0, description="retries of a stage that failed on a transient error")
    retry_delay_s: float = Field(10.0, ge=0, description="first retry delay; doubles with each further retry")
    server_host: str = "127.0.0.1"
    server_port: int = Field(4200, gt=0, lt=65536)
    mlflow_ui_url: str | None = Field(None, description="base of MLflow links in run reports; null: the "
                                                        "tracking URI if http(s), else mlflow ui's address")


class Jobs(Section):
    """The fine-tuning API (flows/jobs/): uploaded files, jobs, tenants and their limits."""

    database_url: str = Field("sqlite:///jobs.db", description=(
        "SQLAlchemy URL of the jobs database: SQLite in the project by default, or postgresql://... (the same "
        "kind of URL as MLflow's backend store); credentials belong in the environment, see README"))
    files_dir: PathOrURI = Field(Path("data/files"), description=(
        "uploaded files, by content hash: a folder in the DVC-tracked data, or s3://bucket/prefix"))
    jobs_dir: Path = Field(Path("jobs"), description="one folder per job: its data, models and reports")
    max_file_bytes: int = Field(64 << 20, gt=0, description="a larger upload gets 413")
    max_tenant_bytes: int = Field(1 << 30, gt=0, description="a tenant's stored uploads; beyond it, 429")
    max_running_jobs: int = Field(2, gt=0, description="a tenant's jobs not yet final; beyond it, 429")
    keys_env: str = Field("TUNELINE_API_KEYS", description="env var of `tenant:key` pairs, comma-separated")
    keys_file: Path | None = Field(None, description="a file of `tenant: key` lines, outside the repo; "
                                                     "no keys at all: one open tenant, `default`")
    base_models: dict[str, str] = Field(default_factory=dict, description=(
        "the `model` names a job may ask for beyond the default (model.base and registry.model_name): "
        "name -> local folder, s3:// prefix or Hugging Face id"))


class LogRange(Section):
    """A range sampled log-uniformly."""

    low: float = Field(gt=0)
    high: float = Field(gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> LogRange:
        if self.high <= self.low:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        return self


Choices = list[Annotated[int, Field(gt=0)]]


class Sweep(Section):
    """`tuneline sweep`: Optuna trials (TPE, median pruning on eval loss) over learning rate, LoRA r/alpha and
    batch size; the best trial's values become an overrides file for `tuneline run --overrides`."""

    n_trials: int = Field(8, gt=0)
    parallel: Annotated[int, Field(gt=0)] | Literal["auto"] = Field(
        "auto", description="trials at once, each in its own process; auto: one per visible GPU, else 1")
    seed: int = Field(0, description="seeds the TPE sampler")
    learning_rate: LogRange = LogRange(low=5e-4, high=2e-2)
    lora_r: Choices = Field(default_factory=lambda: [4, 8, 16, 32], min_length=1)
    lora_alpha: Annotated[Choices, Field(min_length=1)] | Literal["2r"] = Field(
        "2r", description="choices, or 2r: twice the trial's r")
    batch_size: Choices = Field(default_factory=lambda: [8, 16, 32], min_length=1)
    max_steps: int = Field(200, gt=0, description="training steps of one trial")
    eval_steps: int = Field(50, gt=0, description="eval loss goes to the pruner every N steps, and at the end")
    pruning_warmup_steps: int = Field(50, ge=0, description="no trial is pruned before this step")
    startup_trials: int = Field(3, ge=0, description="trials sampled at random before TPE models the results; "
                                                     "pruning starts once this many have completed")
    baseline: bool = Field(True, description="the first trial runs params.yaml's own values, when inside the ranges")
    study_dir: Path = Field(Path("reports/sweep"), description="the Optuna study (a journal file) and trial plans")
    best_path: Path = Field(Path("reports/sweep_best.yaml"), description="the best trial's values, for "
                                                                         "`tuneline run --overrides`")

    @model_validator(mode="after")
    def _eval_within_trial(self) -> Sweep:
        if self.eval_steps > self.max_steps:
            raise ValueError(f"eval_steps ({self.eval_steps}) must not exceed max_steps ({self.max_steps})")
        return self
