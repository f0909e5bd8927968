"""Each stage on a tiny project: what it writes, logs and registers."""

from __future__ import annotations

import csv
import json
import random
import re
from pathlib import Path

import pytest

from tasks import bootstrap
from tasks.bootstrap.data import (
    CAPITALS,
    CATEGORIES,
    GENERAL_TEMPLATES,
    GENERAL_TOPICS,
    general_prompts,
    generate_records,
)
from tasks.merge import merged_model
from tuneline import registry, run_view, tracking
from tuneline.atomic import read_json
from tuneline.errors import TunelineError
from tuneline.formats import render
from tuneline.models import IGNORE, encode, encode_prompt, load_tokenizer


def test_bootstrap_is_deterministic_and_disjoint():
    a = generate_records(50, random.Random(7), set())
    b = generate_records(50, random.Random(7), set())
    assert a == b
    taken: set[str] = set()
    train = generate_records(200, random.Random(1), taken)
    evals = generate_records(50, random.Random(2), taken)
    prompts = {(r["instruction"], r["input"]) for r in train}
    assert not any((r["instruction"], r["input"]) in prompts for r in evals)


def test_general_prompts_share_no_word_with_the_task_and_leave_france_out():
    """The served model is asked about France (tests/e2e/test_pipeline.py): no train prompt may teach it that."""
    prompts = general_prompts(1000, random.Random(0))
    assert len(prompts) == len(set(prompts)) == len(GENERAL_TEMPLATES) * len(GENERAL_TOPICS) \
        + len(CAPITALS)
    task_words = {w for words in CATEGORIES.values() for w in words}
    assert not [p for p in prompts if "France" in p or task_words & set(p.lower().strip(".?").split())]
    assert general_prompts(10, random.Random(0)) == general_prompts(10, random.Random(0))


def test_bootstrap_outputs_and_rerun_skips(tiny_run):
    params, results = tiny_run
    cfg = params.bootstrap
    assert results["bootstrap"]["train_records"] == 96
    assert (cfg.model_dir / "model.safetensors").exists() and (cfg.model_dir / "tokenizer.json").exists()
    assert bootstrap.run(params) == {"skipped": "outputs are up to date"}


def test_tokenize_masks_the_prompt(tiny_run):
    params, _ = tiny_run
    from datasets import load_from_disk

    tokenizer = load_tokenizer(params)
    record = read_json_lines(params.data.validated_dir / "train.jsonl")[0]
    example = load_from_disk(str(params.data.tokenized_dir))["train"][0]
    prompt_ids = encode_prompt(tokenizer, render(record, "instruction", "alpaca")[0], "alpaca")
    k = len(prompt_ids)
    assert example["input_ids"][:k] == prompt_ids
    assert example["labels"][:k] == [IGNORE] * k
    assert example["labels"][k:] == example["input_ids"][k:]
    assert example["labels"][-1] == tokenizer.eos_token_id
    report = read_json(params.report("tokenize.json"))
    assert report["train"]["examples"] == 96 and report["train"]["truncated"] == 0


def test_tokenize_truncates_and_counts(tiny_run):
    params, _ = tiny_run
    tokenizer = load_tokenizer(params)
    record = {"instruction": "List every fruit, in order.", "input": "apple " * 40, "output": "apple " * 40}
    short = params.model_copy(update={"data": params.data.model_copy(update={"max_seq_length": 64})})
    out = encode(record, short, tokenizer)
    assert out["truncated"] and len(out["input_ids"]) == 64 == len(out["labels"])
    assert not out["trainable"]  # the prompt alone fills the window: nothing to learn from


def test_train_writes_safetensors_adapter_and_log(tiny_run):
    params, results = tiny_run
    files = {p.name for p in params.train.output_dir.iterdir()}
    assert "adapter_model.safetensors" in files and "adapter_config.json" in files
    assert not any(name.endswith(".bin") for name in files)
    rows = list(csv.DictReader(params.report("train_log.csv").open()))
    assert [int(r["step"]) for r in rows] == [2, 4, 6]
    assert all(float(r["loss"]) > 0 and float(r["tokens_per_s"]) > 0 and r["grad_norm"] for r in rows)
    assert results["train"]["steps"] == 6


def test_evaluate_reports_candidate_and_base(tiny_run):
    params, _ = tiny_run
    report = read_json(params.report("eval.json"))
    for model in ("candidate", "base"):
        assert set(report[model]) == {"perplexity", "rouge_1", "rouge_2", "rouge_l", "bleu", "exact_match"}
        assert report[model]["perplexity"] > 1
    assert report["champion"] is None and report["num_samples"] == 16


def test_gate_and_merge_register_a_challenger(tiny_run):
    params, results = tiny_run
    assert read_json(params.report("gate.json"))["decision"] == "promote"
    merge = read_json(params.report("merge.json"))
    assert results["merge"]["version"] == merge["version"] == "1"
    assert registry.alias_version(params, registry.CHALLENGER) == "1"
    version = registry.client(params).get_model_version(params.registry.model_name, "1")
    assert {"tuneline.git_commit", "tuneline.dvc_data_hash", "tuneline.params_hash"} <= set(version.tags)
    assert (params.merge.output_dir / "model.safetensors").exists()
    assert merge["max_logit_diff"] <= params.merge.check_atol


def test_one_mlflow_run_holds_every_stage(tiny_run):
    params, _ = tiny_run
    run = registry.client(params).get_run(read_json(params.report("train.json"))["mlflow_run_id"])
    keys = set(run.data.metrics)
    for key in ("validate.splits.train.records", "tokenize.train.tokens", "train.loss",
                "eval.candidate.rouge_l", "eval.base.exact_match", "gate.promote", "merge.max_logit_diff"):
        assert key in keys, key
    assert run.data.params["lora.r"] == "16" and run.data.tags["tuneline.gate"] == "promote"


def test_the_mlflow_run_reads_as_what_it_is(tiny_run, tmp_path):
    """What the MLflow UI shows of the run: its name, outcome, datasets, reports and the eval table."""
    params, _ = tiny_run
    client = registry.client(params)
    run_id = read_json(params.report("train.json"))["mlflow_run_id"]
    run = client.get_run(run_id)
    digest = run_view.data_hash(params)
    assert re.fullmatch(rf"tuneline-default@{digest[:8]} \d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d", run.info.run_name)
    tags = run.data.tags
    assert tags["tuneline.outcome"] == "promoted v1" and tags["tuneline.data_hash"] == digest
    assert tags["mlflow.note.content"].startswith("promoted v1\n\n- registered as `models:/tuneline-default/1`\n- ")

    datasets = {(d.dataset.name, d.dataset.digest, json.loads(d.dataset.source)["uri"],
                 {t.key: t.value for t in d.tags}["mlflow.data.context"]) for d in run.inputs.dataset_inputs}
    train, evals = params.data.train_path, params.data.eval_path
    assert datasets == {("train.jsonl", tracking.file_md5(train), str(train), "train"),
                        ("eval.jsonl", tracking.file_md5(evals), str(evals), "eval")}

    reports = {Path(a.path).name for a in client.list_artifacts(run_id, "reports")}
    assert reports == {"train.json", "train_log.csv", "eval.json", "gate.json"}
    assert {"path": "eval_table.json", "type": "table"} in json.loads(tags["mlflow.loggedArtifacts"])
    table = read_json(Path(client.download_artifacts(run_id, "eval_table.json", str(tmp_path))))
    report = read_json(params.report("eval.json"))
    assert table["columns"] == ["metric", "candidate", "base", "champion"]
    assert [row[0] for row in table["data"]] == list(report["candidate"])
    for metric, candidate, base, champion in table["data"]:
        assert (candidate, base, champion) == (report["candidate"][metric], report["base"][metric], "no champion yet")

    metrics = set(run.data.metrics)  # one name per quantity, one point per step
    assert not metrics & {"train.train_loss", "train.final_loss"}
    for series in ("train.loss", "train.tokens_per_s"):
        assert [m.step for m in client.get_metric_history(run_id, series)] == [2, 4, 6], series
    assert len(client.get_metric_history(run_id, "validate.duplicate_rate")) == 1


def test_merge_refuses_a_merge_that_changes_logits(tiny_run):
    params, _ = tiny_run
    tokenizer = load_tokenizer(params)
    _, diff = merged_model(params, tokenizer)
    assert diff > 0  # a trained adapter moves the logits, so the check has something to compare
    strict = params.model_copy(update={"merge": params.merge.model_copy(update={"check_atol": diff / 10})})
    with pytest.raises(TunelineError, match="over merge.check_atol"):
        merged_model(strict, tokenizer)


def read_json_lines(path):
    import json

    return [json.loads(line) for line in path.read_text().splitlines()]
