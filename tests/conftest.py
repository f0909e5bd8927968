"""Shared fixtures and the lanes: each test is marked unit, integration or e2e by the folder it lies in.

Real components throughout: the tiny project's bootstrap makes a small Llama and a BPE
tokenizer from config, MLflow runs on SQLite in the temp folder (tests/support/project.py).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from support.project import tiny_params

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

LANES = ("unit", "integration", "e2e")


def pytest_collection_modifyitems(items):
    for item in items:
        lane = next((part for part in Path(item.path).parts[::-1] if part in LANES), None)
        if lane:
            item.add_marker(getattr(pytest.mark, lane))


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """bootstrap -> merge once on a tiny project; tests read what each stage left."""
    from tasks import run_stage

    root = tmp_path_factory.mktemp("tiny")
    params = tiny_params(root)
    results = {name: run_stage(name, params)
               for name in ("bootstrap", "validate", "tokenize", "train", "evaluate", "gate", "merge")}
    return params, results
