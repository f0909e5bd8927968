"""Where a served model's files come from: a local folder, or an MLflow URI downloaded into a node-wide cache.

No Ray and no torch here: the model replicas (serving/generation.py) and the adapter replicas
(serving/adapters.py) both call `resolve_model` to get a local Hugging Face folder.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
import threading
import time
from pathlib import Path

REGISTRY_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[\w.-]+))$")
CACHE_ENV = "TUNELINE_MODEL_CACHE"


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path(tempfile.gettempdir()) / "tuneline-models")


def _hf_folder(root: Path, must_hold: str = "config.json") -> Path:
    """The Hugging Face folder in a downloaded artifact: the root itself (a registered folder), or
    `model/` of MLflow's transformers flavor, whose tokenizer files sit in components/tokenizer."""
    if (root / must_hold).exists():
        return root
    model_dir = root / "model"
    if (model_dir / must_hold).exists():
        tokenizer_dir = root / "components" / "tokenizer"
        if tokenizer_dir.is_dir():
            for f in tokenizer_dir.iterdir():
                if not (model_dir / f.name).exists():
                    shutil.copy2(f, model_dir / f.name)
        return model_dir
    raise FileNotFoundError(f"{root}: no Hugging Face model in this artifact (no {must_hold}, no model/{must_hold})")


def resolve_model(model: str, tracking_uri: str | None = None, must_hold: str = "config.json") -> tuple[Path, dict]:
    """A local Hugging Face folder for `model`, and where it came from.

    `model` is a folder, a registry URI (`models:/NAME/VERSION`, `models:/NAME@ALIAS`: the alias is
    resolved to its version now, so the version that serves is known) or any other MLflow artifact
    URI. Downloads go to a cache keyed by registry, version and source (TUNELINE_MODEL_CACHE, else
    the temp dir), so the replicas of one node fetch a version once. `must_hold` is the file that makes
    the folder what is wanted: adapter_config.json for a PEFT adapter (serving/adapters.py).
    """
    if "://" not in model and not model.startswith("models:/"):
        path = Path(model).expanduser().resolve()
        if not (path / must_hold).exists():
            raise FileNotFoundError(f"{path}: no Hugging Face model here (no {must_hold})")
        return path, {"model_uri": str(path), "name": None, "version": None}

    import mlflow
    from mlflow import MlflowClient

    uri = tracking_uri or mlflow.get_tracking_uri()
    source: dict = {"model_uri": model, "name": None, "version": None}
    fetch, key = model, [uri, model]
    if model.startswith("models:/"):
        m = REGISTRY_URI.match(model)
        if m is None:
            raise ValueError(f"{model!r}: expected models:/NAME/VERSION or models:/NAME@ALIAS")
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        name = m["name"]
        mv = (client.get_model_version_by_alias(name, m["alias"]) if m["alias"]
              else client.get_model_version(name, m["version"]))
        source.update(name=name, version=str(mv.version))
        fetch = client.get_model_version_download_uri(name, str(mv.version))  # where its files are
        key = [uri, name, str(mv.version), str(mv.source), str(mv.creation_timestamp)]
    dest = cache_root() / hashlib.sha256("|".join(key).encode()).hexdigest()[:20]
    marker = dest / ".tuneline-complete"
    if not marker.exists():
        tmp = dest.with_name(f"{dest.name}.tmp-{os.getpid()}-{threading.get_ident()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            root = _download(fetch, tmp, uri)
            (tmp / ".tuneline-complete").write_text(str(_hf_folder(root, must_hold).relative_to(tmp)))
            try:
                os.replace(tmp, dest)
            except OSError:  # another replica of this node finished first: use its copy
                pass
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return dest / marker.read_text(), source


def _download(artifact_uri: str, dest: Path, tracking_uri: str, tries: int = 3) -> Path:
    """Download with a few retries: a registry or object store hiccup should not fail a replica (Serve
    itself tries a failing replica constructor only once more, as a broken model fails the same way)."""
    import mlflow

    for attempt in range(tries):
        try:
            return Path(mlflow.artifacts.download_artifacts(artifact_uri=artifact_uri, dst_path=str(dest),
                                                            tracking_uri=tracking_uri, registry_uri=tracking_uri))
        except Exception:
            if attempt == tries - 1:
                raise
            time.sleep(2 ** attempt)
    raise AssertionError("unreachable")
