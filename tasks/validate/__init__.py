"""Stage 1, validate: strict JSON Lines checks, then a Great Expectations suite.

Two layers, each stopping at the first problem with a DataError that names the
file, the 1-based line and the field:
1. `records.check_file` reads each line strictly: encoding, JSON, the format's schema
   (`tuneline.formats.FIELDS`), chat rules, the length limit.
2. `expectations.Suite` runs GX expectations over the parsed records: no nulls, string
   lengths, duplicate rate, train/eval overlap rate.
Without an eval file, eval is a seeded hold-out of train (`split.hold_out`).

A local data file that params name must lie inside the data root (`data.root`,
default the current folder), symlinks and '..' followed: params name data, not any
file the process can read. s3:// URIs are outside this rule (their cache copies are
ours), and so are the files a person names to `tuneline validate PATH`.

Only when everything passes are `data/validated/{train,eval}.jsonl` and
`reports/validation.json` written, atomically; a failure writes nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

from tasks.validate.expectations import Suite
from tasks.validate.records import check_file
from tasks.validate.split import hold_out, prompt_lines
from tasks.validate.summary import print_summary
from tuneline import s3, tracking
from tuneline.atomic import atomic_dir, write_json
from tuneline.config import Params, Validate
from tuneline.errors import DataError


def check_root(path: Path, root: Path | None, key: str | None = None) -> None:
    """DataError unless `path`, symlinks followed, lies inside `root` (None: the current folder)."""
    base, real = (root or Path.cwd()).resolve(), path.resolve()
    if not real.is_relative_to(base):
        raise DataError(path, None, None, f"{key + ' ' if key else ''}resolves to {real}, outside the data root "
                                          f"{base} (data.root; null: the current folder)")


def validate_paths(paths: list[Path], fmt: str, cfg: Validate, eval_path: Path | None = None) -> dict[str, int]:
    """`tuneline validate PATH... [--eval EVAL]`: each file alone (line checks, lengths, duplicate rate), and
    EVAL against the one train PATH (overlap); writes nothing. Any file the user names is read: data.root
    guards what params hand a pipeline run, not what a person asks to have checked."""
    if eval_path is not None and len(paths) != 1:
        raise DataError(eval_path, None, None, "--eval: give exactly one train file to check it against")
    files = [Path(p) for p in [*paths, *([eval_path] if eval_path is not None else [])]]
    parsed = [(path, check_file(path, fmt, cfg)) for path in files]  # the cheap line checks of every file first
    suite = Suite(fmt, cfg)
    for i, (path, records) in enumerate(parsed):
        train = None
        if eval_path is not None and i == len(parsed) - 1:
            train_path, train_records = parsed[0]
            train = (train_path, prompt_lines(train_records, fmt, list(range(1, len(train_records) + 1))))
        suite.check(f"file{i}", path, records, list(range(1, len(records) + 1)), train=train)
    return {str(path): len(records) for path, records in parsed}


def _write_jsonl(path: Path, records: list[dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def run(params: Params) -> dict:
    """Validate train and eval (a seeded hold-out of train if data.eval_path is null); write both + report."""
    d, cfg = params.data, params.validate_
    for key, path in (("data.train_path", d.train_path), ("data.eval_path", d.eval_path)):
        if path is not None and not s3.is_remote(path):
            check_root(Path(path), d.root, key)
    # s3:// paths are read from their local copies (tuneline/s3.py); local paths stay as they are
    d = d.model_copy(update={"train_path": s3.local_path(d.train_path),
                             "eval_path": s3.local_path(d.eval_path)})
    train = check_file(d.train_path, d.format, cfg)
    evals = check_file(d.eval_path, d.format, cfg) if d.eval_path is not None else None
    suite = Suite(d.format, cfg)
    train_lines = list(range(1, len(train) + 1))
    train_stats = suite.check("train", d.train_path, train, train_lines)  # duplicates over the whole file
    if evals is None:  # hold out from train; the eval lines keep their train-file line numbers
        held = hold_out(train, d.format, d.eval_split, params.train.seed)
        if held is None:
            raise DataError(d.train_path, None, None, f"cannot hold out data.eval_split={d.eval_split}: "
                                                      "train needs at least two distinct prompts")
        eval_path, eval_lines, evals = d.train_path, [i + 1 for i in held], [train[i] for i in held]
        kept = sorted(set(range(len(train))) - set(held))
        train_lines, train = [i + 1 for i in kept], [train[i] for i in kept]
        source = f"hold-out of {d.eval_split} of train (seed {params.train.seed})"
    else:
        eval_path, eval_lines, source = d.eval_path, list(range(1, len(evals) + 1)), "file"
    prompts = prompt_lines(train, d.format, train_lines)
    eval_stats = suite.check("eval", eval_path, evals, eval_lines, train=(d.train_path, prompts))
    train_stats["records"] = len(train)  # the records written; duplicate_rate stays the whole file's
    expectations = train_stats.pop("expectations") + eval_stats.pop("expectations")
    report = {"format": d.format, "eval_source": source, "limits": cfg.model_dump(mode="json"),
              "splits": {"train": train_stats, "eval": eval_stats},
              "duplicate_rate": train_stats["duplicate_rate"], "overlap_rate": eval_stats["overlap_rate"],
              "expectations": expectations, "success": all(e["success"] for e in expectations)}
    with atomic_dir(d.validated_dir) as tmp:  # the report is written inside: if it fails, the old dir stays
        _write_jsonl(tmp / "train.jsonl", train)
        _write_jsonl(tmp / "eval.jsonl", evals)
        write_json(params.report("validation.json"), report)
    print_summary(report)
    summary = {"train_records": len(train), "eval_records": len(evals),
               "duplicate_rate": report["duplicate_rate"], "overlap_rate": report["overlap_rate"]}
    if params.mlflow_run_id:  # only inside a pipeline run; otherwise MLflow is not touched
        import mlflow

        with tracking.pipeline_run(params):
            tracking.log_section_params(params, "data", "validate")
            # The report's figures, named as train logs them under `dvc repro` (then it adds none again).
            mlflow.log_metrics(tracking.numeric(report, "validate."))
    return summary
