"""Shared fixtures and the lanes: each test is marked unit, integration or e2e by the folder it lies in.

Real components throughout: the tiny project's bootstrap makes a small Llama and a BPE
tokenizer from config, MLflow runs on SQLite in the temp folder (tests/support/project.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
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
    if any(item.get_closest_marker("unit") is None for item in items):
        _refuse_beside_a_running_ray()


def _refuse_beside_a_running_ray() -> None:
    """Integration and end-to-end tests deploy on Ray clusters and end them with `ray stop`, which ends every
    Ray process of this user on the machine: a deployment left running here (`make run` leaves one) would take
    the tests' deploys and then be stopped by them. So they do not start beside one."""
    joined = subprocess.run([sys.executable, "-c", "import ray; ray.init(address='auto', logging_level=40)"],
                            capture_output=True, timeout=120)
    if joined.returncode == 0:
        pytest.exit("a Ray cluster runs on this machine (a deployment, from `make run`?). The tests deploy on Ray "
                    "and end with `ray stop`, which would stop it too. Stop it first (`.venv/bin/tuneline serve "
                    "stop`), then run the tests again.", returncode=2)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """bootstrap -> merge once on a tiny project; tests read what each stage left."""
    from tasks import run_stage

    root = tmp_path_factory.mktemp("tiny")
    params = tiny_params(root)
    results = {name: run_stage(name, params)
               for name in ("bootstrap", "validate", "tokenize", "train", "evaluate", "gate", "merge")}
    return params, results
