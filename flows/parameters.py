"""What the `finetune` and `sweep` flows' run forms (Prefect UI: *Run > Custom run*) offer, and how it lands on
params.yaml.

The form, top to bottom:
- the knobs people tune (FINETUNE_KNOBS, SWEEP_KNOBS): plain typed fields, each with a description and, as its
  default, params.yaml's value when the flow module is imported, that is when `tuneline prefect deploy` registers
  the deployments (the form shows that) and when a run starts (the run compares against that);
- `sets`: dotted KEY=VALUE for any other key, as `tuneline run --set`;
- `overrides`: any keys of params.yaml, nested as there (`{"train": {"warmup_ratio": 0.1}}`), one JSON field in
  the form, checked against params.yaml's types (ParamsOverrides) as the run starts; what
  `run_deployment(..., parameters={"overrides": {...}})` sends.

A knob overrides params.yaml only when its value differs from params.yaml's value at the start of the run. So a
run that passes no knobs (a schedule, an event, `run_deployment` with only `overrides`) runs params.yaml as it is
then, and a form left untouched changes nothing while params.yaml is what the form showed. After params.yaml
changes, a form submitted untouched still sends the values it shows, and they apply: re-deploy
(`tuneline prefect deploy`) to refresh the form's defaults.

Order, later wins: params.yaml, the knobs that differ from it, `overrides`, `sets`; validated once, naming the
keys at fault."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, create_model, model_serializer

from tuneline.config import DEFAULT_PARAMS, Params, load_params
from tuneline.errors import TunelineError

# The knobs people tune: form field -> (params.yaml key, what it does), in the form's order.
KNOBS: dict[str, tuple[str, str]] = {
    "train_path": ("data.train_path", "training data, JSON Lines: a path in the project or s3://bucket/key"),
    "eval_path": ("data.eval_path", "eval data, as train_path; empty: hold out data.eval_split of train"),
    "data_format": ("data.format", "what a record holds: instruction, chat, completion or preference (DPO pairs)"),
    "base_model": ("model.base", "the model to fine-tune: a Hugging Face id, a local folder or s3://bucket/prefix"),
    "lora_method": ("lora.method", "lora, qlora (4-bit base, CUDA), dora, or full fine-tuning without adapter"),
    "lora_r": ("lora.r", "rank of the LoRA matrices"),
    "lora_alpha": ("lora.alpha", "LoRA scaling: the update is scaled by alpha / r"),
    "learning_rate": ("train.learning_rate", "peak learning rate of the schedule"),
    "epochs": ("train.epochs", "passes over the training data, unless max_steps is above 0"),
    "max_steps": ("train.max_steps", "optimizer steps; above 0 they replace epochs"),
    "batch_size": ("train.batch_size", "examples per device per step"),
    "seed": ("train.seed", "seed of initialization and data order"),
    "min_exact_match": ("gate.min_exact_match", "gate: the candidate needs at least this exact match"),
    "min_rouge_l": ("gate.min_rouge_l", "gate: the candidate needs at least this ROUGE-L"),
    "max_perplexity": ("gate.max_perplexity", "gate: the candidate's perplexity must not exceed this"),
    "must_beat_base": ("gate.must_beat_base", "gate: the candidate must score better than the base model"),
    "n_trials": ("sweep.n_trials", "trials of the study; learning rate, LoRA r/alpha and batch size are searched"),
    "trial_steps": ("sweep.max_steps", "training steps of one trial"),
}
FINETUNE_KNOBS = [name for name in KNOBS if not KNOBS[name][0].startswith("sweep.")]
SWEEP_KNOBS = ["train_path", "eval_path", "data_format", "base_model", "lora_method", "n_trials", "trial_steps"]

# Knobs whose params.yaml key may be null: the form's empty string stands for it (a plain text field, no toggle).
NULL_AS_EMPTY = {"data.eval_path"}


def _current_params(path: Path = DEFAULT_PARAMS) -> Params:
    """params.yaml of the folder the flow runs in; the built-in defaults when it is missing or invalid (the run
    itself then stops on it, naming the file and the key)."""
    try:
        return load_params(path)
    except TunelineError:
        return Params()


CURRENT = _current_params()


def current(key: str, params: Params = CURRENT) -> Any:
    """The form's value of a params key: JSON as in params.yaml (paths as text), null as ''."""
    value: Any = params.model_dump(mode="json", by_alias=True)
    for part in key.split("."):
        value = value[part]
    return "" if value is None and key in NULL_AS_EMPTY else value


def _annotation(key: str) -> Any:
    """The type of a params key, constraints (Literal choices, bounds) included."""
    model: Any = Params
    *sections, leaf = key.split(".")
    for part in sections:
        model = next(f for n, f in model.model_fields.items() if (f.alias or n) == part).annotation
    return next(f for n, f in model.model_fields.items() if (f.alias or n) == leaf).annotation


DataFormat = _annotation("data.format")
LoraMethod = _annotation("lora.method")


# The flows' signatures take their knobs' defaults from here: params.yaml's value as this module is imported,
# with a description (Prefect shows both in the form).
FORM = {name: Field(current(key), description=f"{what} (params.yaml: {key})") for name, (key, what) in KNOBS.items()}


def knob_layer(knobs: dict[str, Any]) -> dict[str, Any]:
    """The knobs that differ from params.yaml's current value, as dotted params keys."""
    layer = {}
    for name, value in knobs.items():
        key = KNOBS[name][0]
        if value != current(key):
            layer[key] = None if value == "" and key in NULL_AS_EMPTY else value
    return layer


def _optional(model: type[BaseModel]) -> type[BaseModel]:
    """The same model with every field optional and None by default, sections included."""
    fields: dict[str, Any] = {}
    for name, info in model.model_fields.items():
        ann = info.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):  # a section: always there, its keys optional
            section = _optional(ann)
            fields[name] = (section, Field(default_factory=section, alias=info.alias))
            continue
        if info.metadata:
            ann = Annotated[(ann, *info.metadata)]
        fields[name] = (Optional[ann], Field(None, alias=info.alias, description=info.description))  # noqa: UP045
    doc = (model.__doc__ or f"{model.__name__} section of params.yaml.").strip()
    return create_model(f"{model.__name__}Overrides",
                        __config__=ConfigDict(extra="forbid", populate_by_name=True, title=model.__name__),
                        __doc__=doc + " Empty keys keep their value from params.yaml.", **fields)


def _filled(tree: Any) -> Any:
    """The keys of the form that were filled in: empty (None) keys keep params.yaml's value."""
    if isinstance(tree, BaseModel):
        tree = tree.model_dump(mode="json", by_alias=True)
    if isinstance(tree, dict):
        kept = {key: _filled(value) for key, value in tree.items() if value is not None}
        return {key: value for key, value in kept.items() if value != {}}
    return tree


class ParamsOverrides(_optional(Params)):  # type: ignore[misc]
    @model_serializer(mode="wrap")
    def _only_filled(self, handler: Any) -> dict[str, Any]:
        """Only the keys filled in: the form's default and a run's Parameters read `{}`, not a tree of nulls."""
        return _filled(handler(self))


NO_OVERRIDES = ParamsOverrides()

# The form shows `overrides` as one JSON field (nested as params.yaml), not a tree of some 150 typed fields; the run
# still checks it against ParamsOverrides: an unknown key or a bad value stops it, naming the key.
Overrides = Annotated[ParamsOverrides, WithJsonSchema({
    "type": "object", "title": "overrides", "additionalProperties": True,
    "examples": [{"train": {"warmup_ratio": 0.1}, "evaluate": {"num_samples": 50}}]})]


def resolve_params(params_path: str | Path = DEFAULT_PARAMS, overrides: Any = None, sets: list[str] | None = None,
                   knobs: dict[str, Any] | None = None) -> Params:
    """params.yaml, then the knob values (dotted keys) that differ from it, then the typed overrides, then the
    dotted `sets`; validated once, naming the keys at fault."""
    return load_params(params_path, list(sets or []), layer={**(knobs or {}), **_filled(overrides or {})})
