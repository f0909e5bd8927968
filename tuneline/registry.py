"""The MLflow model registry: register a merged model, find and fetch the champion.

Versions are logged with MLflow's transformers flavor, so `mlflow.pyfunc` and
`mlflow.transformers.load_model` load them too. Aliases: `challenger` on a new
version, `champion` on the version that serves.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from tuneline import tracking
from tuneline.config import Params
from tuneline.errors import TunelineError

log = logging.getLogger("tuneline")

CHAMPION, CHALLENGER = "champion", "challenger"
# The content hash of a version's safetensors files (as DVC hashes data): one registered version per weights.
WEIGHTS_TAG = "tuneline.weights_md5"
# Given explicitly: MLflow's inference of them imports optional packages (torchvision).
PIP_REQUIREMENTS = ["torch", "transformers", "safetensors", "tokenizers"]


def client(params: Params):
    from mlflow import MlflowClient

    tracking.setup(params)
    return MlflowClient()


def versions_with_weights(params: Params, weights_md5: str, c=None) -> list[str]:
    """The versions registered with these weights (tag WEIGHTS_TAG), oldest first; `c` an MlflowClient to reuse."""
    found = (c or client(params)).search_model_versions(
        f"name='{params.registry.model_name}' and tag.`{WEIGHTS_TAG}`='{weights_md5}'")
    return sorted((str(v.version) for v in found), key=int)


def register(params: Params, model, tokenizer, tags: dict[str, str]) -> str:
    """Log the merged model into the active run and register it with `tags`; returns its version.

    The tags are set as the version is created, so no version lacks them. Weights that are already
    registered (the same `WEIGHTS_TAG` in `tags`: a merge re-run after a kill between registration and
    merge.json, or a re-trained identical model) are not registered again; their version is returned."""
    import mlflow

    name, c = params.registry.model_name, client(params)
    existing = versions_with_weights(params, tags[WEIGHTS_TAG], c) if WEIGHTS_TAG in tags else []
    if existing:
        version = existing[0]
        log.info(f"merge: these weights are already registered as {name} version {version}; not registered again")
    else:
        info = mlflow.transformers.log_model(
            transformers_model={"model": model, "tokenizer": tokenizer},
            task="text-generation",
            name="model",
            pip_requirements=PIP_REQUIREMENTS,
        )
        version = str(mlflow.register_model(info.model_uri, name, tags=tags).version)
    c.set_registered_model_alias(name, CHALLENGER, version)
    return version


def make_champion(params: Params, name: str, version: str) -> None:
    """Move the `champion` alias to `version` of model `name`: the version that serves."""
    from mlflow.exceptions import MlflowException

    try:
        client(params).set_registered_model_alias(name, CHAMPION, version)
    except MlflowException as e:
        raise TunelineError(f"serving {name} v{version}, but could not move the '{CHAMPION}' alias to it: "
                            f"{e}") from None


def alias_version(params: Params, alias: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(client(params).get_model_version_by_alias(params.registry.model_name, alias).version)
    except MlflowException:
        return None


def set_alias(params: Params, alias: str, version: str) -> None:
    client(params).set_registered_model_alias(params.registry.model_name, alias, version)


def fetch(params: Params, version: str, dest: Path) -> Path:
    """Download a version into one Hugging Face folder (weights, config and tokenizer together)."""
    import mlflow

    tracking.setup(params)
    shutil.rmtree(dest, ignore_errors=True)
    root = Path(mlflow.artifacts.download_artifacts(
        artifact_uri=f"models:/{params.registry.model_name}/{version}", dst_path=str(dest)))
    model_dir = root / "model"
    for f in (root / "components" / "tokenizer").iterdir():
        shutil.copy2(f, model_dir / f.name)
    return model_dir
