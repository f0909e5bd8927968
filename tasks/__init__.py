"""The stages of the pipeline, one module (or sub-package) each, each with `run(params) -> dict`.

This is the only place that knows the stage list. `python -m tasks <stage>` (what dvc.yaml calls),
the `tuneline` command and the Prefect flow all come through `run_stage`, so a stage behaves the same
whichever tool starts it. Stages never import each other; what they share is the `tuneline` package.
"""

from __future__ import annotations

import importlib
import logging
import os
import time
from pathlib import Path

from tuneline.config import Params
from tuneline.errors import TunelineError
from tuneline.logs import summarize

# The DAG, in order. dvc.yaml and the Prefect flow must list the same stages (a test checks).
STAGES = ["validate", "tokenize", "train", "evaluate", "gate", "merge", "deploy"]
ALL_STAGES = ["bootstrap", *STAGES]

log = logging.getLogger("tuneline")


def run_stage(name: str, params: Params) -> dict:
    """Run one stage on params; log its one-line summary; return what it returned."""
    if name not in ALL_STAGES:
        raise TunelineError(f"unknown stage {name!r}; stages are: {', '.join(ALL_STAGES)}")
    base = params.model.base
    if Path(base).exists() or base.startswith("s3://") or Path(base) == params.bootstrap.model_dir:
        # A local base model needs no hub; without this, MLflow and transformers still ask it
        # (model cards, metadata) and wait for the network to time out. Bootstrap's folder counts before
        # bootstrap makes it: huggingface_hub reads the variable once, when a stage first imports it.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # Imported by name when it runs: each stage loads only its own heavy libraries.
    module = importlib.import_module(f"tasks.{name}")
    start = time.perf_counter()
    result = module.run(params) or {}
    log.info(summarize(name, result, time.perf_counter() - start))
    return result
