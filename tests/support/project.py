"""A tiny project: params for a pipeline that trains in seconds, every path inside one folder."""

from __future__ import annotations

from pathlib import Path

from tuneline.config import Params

REPO = Path(__file__).resolve().parents[2]


def tiny_params(root: Path, **overrides) -> Params:
    """Params for a project under `root` that trains in seconds (all paths inside root)."""
    tree = {
        "reports_dir": str(root / "reports"),
        # The tiny base and the test-time knobs it was tuned with (the default is SmolLM2, lr 2e-3, ChatML).
        "bootstrap": {"base": "tiny", "general_records": 0, "train_records": 96, "eval_records": 16,
                      "pretrain_steps": 20, "data_dir": str(root / "data/raw"), "model_dir": str(root / "models/base"),
                      "model": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64,
                                "vocab_size": 400}},
        "model": {"base": str(root / "models/base")},
        "data": {"template": "alpaca", "train_path": str(root / "data/raw/train.jsonl"),
                 "eval_path": str(root / "data/raw/eval.jsonl"), "validated_dir": str(root / "data/validated"),
                 "tokenized_dir": str(root / "data/tokenized"), "root": str(root)},
        "train": {"output_dir": str(root / "models/adapter"), "checkpoint_dir": str(root / "models/ckpt"),
                  "learning_rate": 0.005, "bf16": False, "max_steps": 6, "batch_size": 8, "logging_steps": 2,
                  "save_steps": 3},
        "evaluate": {"max_new_tokens": 8, "batch_size": 16},
        "gate": {"min_exact_match": 0.0, "min_rouge_l": 0.0, "max_perplexity": 1e9, "must_beat_base": False},
        "registry": {"tracking_uri": f"sqlite:///{root / 'mlflow.db'}",
                     "artifact_location": str(root / "mlartifacts")},
        "merge": {"output_dir": str(root / "models/merged")},
    }
    for dotted, value in overrides.items():
        node = tree
        *parents, leaf = dotted.split("__")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return Params.model_validate(tree)
