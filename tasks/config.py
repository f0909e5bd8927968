"""The one typed config model behind params.yaml.

Every knob of every stage lives here. Unknown keys and bad values fail before
any work starts, with the dotted key and the rule that was broken.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tasks.errors import TunelineError

DEFAULT_PARAMS = Path("params.yaml")


class ConfigError(TunelineError):
    """A params problem a person can fix: it names the file, the key and the rule."""


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

    train_records: int = Field(2000, gt=0)
    eval_records: int = Field(200, gt=0)
    seed: int = 1234
    pretrain_steps: int = Field(1000, ge=0, description="causal-LM steps that give the base model its knowledge")
    pretrain_lr: float = Field(2e-3, gt=0)
    pretrain_batch: int = Field(32, gt=0)
    data_dir: Path = Path("data/raw")
    model_dir: Path = Path("models/base")
    model: TinyModel = TinyModel()


class ModelSpec(_Section):
    base: str = Field("models/base", min_length=1, description="Hugging Face id or local path")
    revision: str | None = None
    trust_remote_code: bool = False
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"


class Data(_Section):
    train_path: Path = Path("data/raw/train.jsonl")
    eval_path: Path | None = Path("data/raw/eval.jsonl")
    format: Literal["instruction", "chat", "completion"] = "instruction"
    template: Literal["alpaca", "chatml", "tokenizer"] = "alpaca"
    max_seq_length: int = Field(160, gt=8)
    eval_split: float = Field(0.1, gt=0, lt=1, description="held out from train when eval_path is null")
    validated_dir: Path = Path("data/validated")
    tokenized_dir: Path = Path("data/tokenized")


class Validate(_Section):
    max_chars_per_field: int = Field(20_000, gt=0)
    max_duplicate_rate: float = Field(0.05, ge=0, le=1)
    max_overlap_rate: float = Field(0.0, ge=0, le=1)


class Lora(_Section):
    method: Literal["lora", "dora", "full"] = "lora"
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
    learning_rate: float = Field(5e-3, gt=0, le=1)
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "cosine"
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    epochs: float = Field(8, gt=0)
    max_steps: int = Field(-1, ge=-1, description="-1 means: run the epochs")
    batch_size: int = Field(16, gt=0)
    grad_accum: int = Field(1, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    seed: int = 42
    logging_steps: int = Field(10, gt=0)
    save_steps: int = Field(200, gt=0)
    eval_steps: int = Field(0, ge=0, description="0 disables in-training eval loss")
    save_total_limit: int = Field(2, gt=0)


class Evaluate(_Section):
    metrics: list[Literal["perplexity", "rouge", "bleu", "exact_match"]] = Field(
        default_factory=lambda: ["perplexity", "rouge", "bleu", "exact_match"], min_length=1
    )
    max_new_tokens: int = Field(48, gt=0)
    num_samples: int = Field(200, gt=0, description="eval records used (the first N)")
    batch_size: int = Field(50, gt=0)
    compare_base: bool = True
    compare_champion: bool = True
    samples_logged: int = Field(20, ge=0)


class Gate(_Section):
    min_exact_match: float = Field(0.2, ge=0, le=1)
    min_rouge_l: float = Field(0.25, ge=0, le=1)
    max_perplexity: float = Field(20.0, gt=0)
    must_beat_base: bool = True
    champion_metric: Literal["exact_match", "rouge_l", "rouge_1", "bleu"] = "rouge_l"
    min_margin_over_champion: float = Field(0.005, ge=0)


class Registry(_Section):
    tracking_uri: str = "sqlite:///mlflow.db"
    artifact_location: Path = Path("mlartifacts")
    experiment: str = "tuneline"
    model_name: str = Field("tuneline-default", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class Merge(_Section):
    output_dir: Path = Path("models/merged")
    check_atol: float = Field(1e-3, gt=0, description="max |logit difference| merged vs adapter")
    check_inputs: int = Field(4, gt=0)


class Serving(_Section):
    host: str = "127.0.0.1"
    port: int = Field(8000, gt=0, lt=65536)
    app_name: str = "tuneline"
    ray_address: str | None = Field(None, description="null: join the local cluster or start one")
    max_tokens_limit: int = Field(256, gt=0)
    max_prompt_tokens: int = Field(1024, gt=0)
    api_key_env: str | None = Field(None, description="name of the env var holding the API key")
    health_timeout_s: float = Field(180, gt=0)


class Params(_Section):
    reports_dir: Path = Path("reports")
    bootstrap: Bootstrap = Bootstrap()
    model: ModelSpec = ModelSpec()
    data: Data = Data()
    validate_: Validate = Field(Validate(), alias="validate")
    lora: Lora = Lora()
    train: Train = Train()
    evaluate: Evaluate = Evaluate()
    gate: Gate = Gate()
    registry: Registry = Registry()
    merge: Merge = Merge()
    serving: Serving = Serving()

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

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


def load_params(path: Path | str = DEFAULT_PARAMS, overrides: list[str] | None = None) -> Params:
    """Read params.yaml, apply `KEY=VALUE` overrides, validate everything at once."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: params file not found")
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    for key, value in parse_overrides(overrides or []):
        _set_dotted(tree, key, value)
    try:
        return Params.model_validate(tree)
    except ValidationError as e:
        raise _explain(e, str(path)) from None
