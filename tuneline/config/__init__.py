"""The one typed config model behind params.yaml, and how it is read.

Every knob of every stage lives here: `Params` gathers the section models of sections.py (the
stages') and operations.py (serving, orchestration, sweep); `load_params` reads params.yaml with
`--set KEY=VALUE` overrides. Unknown keys and bad values fail before any work starts, with the
dotted key and the rule that was broken.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from tuneline.config.operations import Jobs, LogRange, Orchestration, ServedAdapter, Serving, ServingAdapters, Sweep
from tuneline.config.sections import (
    Bootstrap,
    Cost,
    Data,
    DeepSpeed,
    Distributed,
    Evaluate,
    Gate,
    Lora,
    Merge,
    ModelSpec,
    PathOrURI,
    Registry,
    Section,
    TinyModel,
    Train,
    Validate,
)
from tuneline.errors import TunelineError

__all__ = ["DEFAULT_PARAMS", "Bootstrap", "ConfigError", "Cost", "Data", "DeepSpeed", "Distributed", "Evaluate",
           "Gate", "Jobs", "LogRange", "Lora", "Merge", "ModelSpec", "Orchestration", "Params", "PathOrURI", "Registry",
           "Section", "ServedAdapter", "Serving", "ServingAdapters", "Sweep", "TinyModel", "Train", "Validate",
           "file_overrides", "load_params", "parse_overrides"]

DEFAULT_PARAMS = Path("params.yaml")


class ConfigError(TunelineError):
    """A params problem a person can fix: it names the file, the key and the rule."""


class Params(Section):
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
    jobs: Jobs = Jobs()

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    # Not a key of params.yaml: the MLflow run of the pipeline run these params belong to, set by whoever opened
    # it (`tuneline run`, the Prefect flow, `python -m tasks --mlflow-run-id`). Never dumped, never hashed.
    _mlflow_run_id: str | None = PrivateAttr(default=None)

    @property
    def mlflow_run_id(self) -> str | None:
        return self._mlflow_run_id

    def in_mlflow_run(self, run_id: str | None) -> Params:
        """The same params, logging into MLflow run `run_id` (None: the run train opened, as under dvc repro)."""
        params = self.model_copy()
        params._mlflow_run_id = run_id
        return params

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

    @model_validator(mode="after")
    def _fused_lora_where_it_applies(self) -> Params:
        # Only an explicit true is refused: auto turns itself off where it does not apply (lora_matmul.wanted).
        misfit = self.fused_lora_misfit()
        if self.train.fused_lora is True and misfit:
            raise ValueError(f"{misfit} (set train.fused_lora: false)")
        return self

    def fused_lora_misfit(self) -> str | None:
        """Why train.fused_lora cannot apply to this run, or None where it can."""
        if self.lora.method != "lora":
            return f"train.fused_lora rewrites plain LoRA layers only; lora.method {self.lora.method} keeps PEFT's own"
        if self.distributed.strategy in ("fsdp", "deepspeed"):
            return (f"train.fused_lora reads LoRA's weights outside their modules, which distributed.strategy "
                    f"{self.distributed.strategy} may hold sharded there; it runs with strategy none or ddp")
        return None

    def report(self, name: str) -> Path:
        return self.reports_dir / name

    def section(self, name: str) -> dict[str, Any]:
        """One section as plain JSON-able values (for cache keys and MLflow params)."""
        key = "validate_" if name == "validate" else name
        return getattr(self, key).model_dump(mode="json")


def _section(tree: dict, parts: list[str], where: str) -> dict:
    """The section of the tree at `parts`, made where missing; a value in its way is an error naming `where`."""
    node = tree
    for part in parts:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{where}: '{part}' is a value, not a section")
    return node


def _set_dotted(tree: dict, dotted: str, raw: str) -> None:
    """Apply KEY=VALUE with VALUE parsed as YAML, so numbers, lists and null work."""
    *parents, leaf = dotted.split(".")
    _section(tree, parents, f"--set {dotted}")[leaf] = yaml.safe_load(raw) if raw != "" else ""


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


def file_overrides(path: Path | str | None) -> dict:
    """A YAML file of params keys, nested as in params.yaml or dotted (e.g. the best trial that `tuneline sweep`
    wrote), to lay over params.yaml; empty without a file."""
    return {} if path is None else _read_mapping(Path(path), "overrides file")


def _merge(tree: dict, layer: dict, prefix: str = "") -> None:
    """Lay a mapping of params keys (nested, or dotted as `train.epochs`) over the tree, key by key."""
    for key, value in layer.items():
        if value == {}:  # a section with nothing in it changes nothing (the flow's form sends every section)
            continue
        *parents, leaf = str(key).split(".")
        node = _section(tree, parents, f"overrides: {prefix}{key}")
        if isinstance(value, dict) and isinstance(node.get(leaf, {}), dict):
            _merge(node.setdefault(leaf, {}), value, f"{prefix}{key}.")
        else:
            node[leaf] = value


def load_params(path: Path | str = DEFAULT_PARAMS, sets: list[str] | None = None, *,
                layer: dict | None = None) -> Params:
    """Read params.yaml, lay `layer` over it (a mapping of params keys: an overrides file, the flow's form), then
    the `KEY=VALUE` sets; validate everything at once."""
    path = Path(path)
    tree = _read_mapping(path, "params file")
    _merge(tree, layer or {})
    for key, value in parse_overrides(sets or []):
        _set_dotted(tree, key, value)
    try:
        return Params.model_validate(tree)
    except ValidationError as e:
        raise _explain(e, str(path)) from None
