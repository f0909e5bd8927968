"""The MLflow model registry: register a merged model, find and fetch the champion.

Versions are logged with MLflow's transformers flavor, so `mlflow.pyfunc` and
`mlflow.transformers.load_model` load them too. Aliases: `challenger` on a new
version, `champion` on the version that serves.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from tasks import tracking
from tasks.config import Params

CHAMPION, CHALLENGER = "champion", "challenger"
# Given explicitly: MLflow's inference of them imports optional packages (torchvision).
PIP_REQUIREMENTS = ["torch", "transformers", "safetensors", "tokenizers"]


def client(params: Params):
    from mlflow import MlflowClient

    tracking.setup(params)
    return MlflowClient()


def register(params: Params, model, tokenizer, tags: dict[str, str]) -> str:
    """Log the merged model into the active run and register it; returns the new version."""
    import mlflow

    info = mlflow.transformers.log_model(
        transformers_model={"model": model, "tokenizer": tokenizer},
        task="text-generation",
        name="model",
        registered_model_name=params.registry.model_name,
        pip_requirements=PIP_REQUIREMENTS,
    )
    version = str(info.registered_model_version)
    c = client(params)
    for key, value in tags.items():
        c.set_model_version_tag(params.registry.model_name, version, key, value)
    c.set_registered_model_alias(params.registry.model_name, CHALLENGER, version)
    return version


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
