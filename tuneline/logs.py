"""What a run prints: one summary line per stage, progress bars on long work, and no library chatter."""

from __future__ import annotations

import logging
import os
import warnings

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
