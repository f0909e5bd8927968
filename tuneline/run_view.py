"""How a pipeline run reads in MLflow's UI: its name, its outcome (a tag and the run's description), and the
datasets it trained and was evaluated on."""

from __future__ import annotations

import warnings
from datetime import UTC, datetime
from pathlib import Path

from tuneline import s3
from tuneline.config import Params
from tuneline.tracking import file_md5

OUTCOME_TAG = "tuneline.outcome"
NOTE_TAG = "mlflow.note.content"  # the run's description in the UI (markdown)


def local_file(path: Path | str) -> Path:
    """Where a data path's content is here: itself, or an s3:// URI's cached copy (never fetched from here)."""
    return s3.cache_path(str(path)) if s3.is_remote(path) else Path(path)


def data_hash(params: Params) -> str | None:
    """DVC's md5 of the run's input data (data.train_path, then data.eval_path); None while a file is not here."""
    local = [local_file(p) for p in (params.data.train_path, params.data.eval_path) if p is not None]
    return file_md5(*local) if all(p.is_file() for p in local) else None


def run_name(params: Params, when: datetime | None = None) -> str:
    """`<model>@<data hash> <UTC time>`, e.g. `tuneline-default@3f2a9c1e 2026-12-04 20:15:07`: what the run
    makes, from which data, when (the Prefect flow run's name has the same parts)."""
    when = when or datetime.now(UTC)
    return f"{params.registry.model_name}@{(data_hash(params) or 'nodata')[:8]} {when:%Y-%m-%d %H:%M:%S}"


def log_dataset(context: str, source: Path | str) -> None:
    """The data of a run, as an MLflow dataset of the active run: named for the file, its DVC md5 the digest,
    the path or URI it came from the source (the UI's "Dataset" column and the run's "Datasets"). A stage
    that reads it in a later form (train: the tokenized data) may run where it is not: then it logs none."""
    import mlflow
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    local = local_file(source)
    if not local.is_file():
        return
    uri = str(source) if s3.is_remote(source) else str(Path(source).resolve())
    with warnings.catch_warnings():  # a local path matches several source kinds alike; MLflow warns, then picks one
        warnings.simplefilter("ignore")
        dataset = MetaDataset(resolve_dataset_source(uri), name=Path(uri).name, digest=file_md5(local))
    mlflow.log_input(dataset, context=context)


def set_outcome(outcome: str, details: list[str] = ()) -> None:
    """What the run came to (`promoted v3`, `rejected: ...`): a tag for search and the list, and the run's
    description (the reasons as a list below it)."""
    import mlflow

    note = "\n".join([outcome, *([""] if details else []), *(f"- {d}" for d in details)])
    mlflow.set_tags({OUTCOME_TAG: outcome, NOTE_TAG: note})
