"""Run one stage, or all of them in order: the only place that knows the stage list.

`python -m tasks.<stage>` (what dvc.yaml calls) and the `tuneline` CLI both come
here, so a stage behaves the same whichever tool starts it.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

from tasks.config import DEFAULT_PARAMS, Params, load_params
from tasks.errors import NO_SPACE, TunelineError, os_errno

# The DAG, in order. dvc.yaml and the Prefect flow must list the same stages (a test checks).
STAGES = ["validate", "tokenize", "train", "evaluate", "gate", "merge", "deploy"]
ALL_STAGES = ["bootstrap", *STAGES]

log = logging.getLogger("tuneline")


# Lines that libraries log and that say nothing about the run: the CPU build of torchao lacks its CUDA
# kernels and Triton, torchao registers enums the deprecated way, DeepSpeed finds no GPU, bitsandbytes cannot
# fetch (or, offline, check) an optional kernel from a hub, MLflow creates its SQLite tables and finds no model
# card or licence for a local model, rouge-score names its tokenizer, Ray announces its default token auth.
# Filters, not levels: DeepSpeed, torch and MLflow set their loggers' levels as they load.
LIBRARY_NOISE = {
    "mlflow.store.db.utils": ("database tables",),
    "mlflow.transformers": ("model card could not be retrieved", "Unable to find license information"),
    "torchao": ("Failed to load",),
    "torchao.kernel.intmm": ("Detected no triton",),
    "torch.utils._pytree": ("register_constant()",),
    "DeepSpeed": ("Setting accelerator to CPU",),
    "bitsandbytes.backends.cpu.ops": ("kernels-community",),
    "kernels._internals.hf_hub": ("Skipping publisher trust check",),
    "absl": ("Using default tokenizer",),
    "ray._private.authentication.authentication_token_setup": ("Token authentication is enabled",),
}
# Loggers whose INFO lines narrate a library's own steps (Ray Serve: "Started Serve", "Connecting to existing
# Serve app"); their warnings and errors stay. Ray sets this logger's level itself when Serve starts.
INFO_NOISE = ("ray.serve",)


class _Drop(logging.Filter):
    def __init__(self, texts: tuple[str, ...] = (), below: int = logging.NOTSET):
        super().__init__()
        self.texts, self.below = texts, below

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < self.below:
            return False
        message = record.getMessage()
        return not any(text in message for text in self.texts)


def quiet_libraries() -> None:
    """Keep library chatter out of the stage output; our own summaries and the progress bars of long work stay."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # A bar for each load, save and map of a few seconds; training's and evaluation's bars are their own.
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # transformers 5.x renames gradient checkpointing to activation checkpointing; the old names still work,
    # and the GPU machine's 5.17 knows only those.
    warnings.filterwarnings("ignore", r".*gradient_checkpointing.* is deprecated and will be removed in v6",
                            FutureWarning)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("mlflow", "alembic", "httpx", "urllib3", "filelock", "ray", "great_expectations"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    filters = {**{name: _Drop(texts) for name, texts in LIBRARY_NOISE.items()},
               **{name: _Drop(below=logging.WARNING) for name in INFO_NOISE}}
    for name, drop in filters.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Drop) for f in logger.filters):
            logger.addFilter(drop)


def summarize(name: str, result: dict, seconds: float) -> str:
    shown = ", ".join(f"{k}={v}" for k, v in result.items() if isinstance(v, str | int | float | bool))
    return f"[{name}] done in {seconds:.1f}s" + (f": {shown}" if shown else "")


def run_stage(name: str, params: Params) -> dict:
    if name not in ALL_STAGES:
        raise TunelineError(f"unknown stage {name!r}; stages are: {', '.join(ALL_STAGES)}")
    base = params.model.base
    if Path(base).exists() or base.startswith("s3://") or Path(base) == params.bootstrap.model_dir:
        # A local base model needs no hub; without this, MLflow and transformers still ask it
        # (model cards, metadata) and wait for the network to time out. Bootstrap's folder counts before
        # bootstrap makes it: huggingface_hub reads the variable once, when a stage first imports it.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    module = importlib.import_module(f"tasks.{name}")
    start = time.perf_counter()
    result = module.run(params) or {}
    log.info(summarize(name, result, time.perf_counter() - start))
    return result


def guarded(fn: Callable[[], object]) -> int:
    """Run fn; a TunelineError, or running out of disk space anywhere, becomes one line on stderr and exit code 1."""
    try:
        fn()
    except TunelineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Exception as e:
        if os_errno(e) not in NO_SPACE:
            raise
        print(f"error: out of disk space (or over a quota or file-size limit): {e}. Free space and run again; "
              "outputs are replaced by renames, so the previous ones are unchanged.", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: outputs of the interrupted stage were not written", file=sys.stderr)
        return 130
    return 0


def main(name: str) -> None:
    parser = argparse.ArgumentParser(prog=f"python -m tasks.{name}", description=f"Run the {name} stage.")
    parser.add_argument("--params", default=str(DEFAULT_PARAMS), help="params file (default: params.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a dotted key of params.yaml; repeatable")
    args = parser.parse_args()
    quiet_libraries()
    sys.exit(guarded(lambda: run_stage(name, load_params(args.params, args.overrides))))
