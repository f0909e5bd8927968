"""DPO (`train.method: dpo`) on a tiny project: SFT first, then preference tuning of its adapter.

One module fixture runs the stages as a user would: bootstrap (with preference pairs: the right answer
chosen, a wrong one rejected), validate, tokenize and train on the instruction data (SFT), then validate,
tokenize, train (DPO) and evaluate on the pairs. The tests read what it left: the MLflow run's reward
curve, the DPO adapter, the eval report's win rates. The template is chatml, whose prompts are a third of
alpaca's tokens: 150 DPO steps cost what 50 would under alpaca's header.
"""

from __future__ import annotations

import json
import random

import pytest
from support.project import tiny_params

from tasks import run_stage
from tasks.bootstrap import write_preference
from tasks.bootstrap.data import generate_records, preference_records
from tasks.validate.records import check_file
from tuneline import registry
from tuneline.atomic import read_json
from tuneline.config import ConfigError, Params, load_params
from tuneline.errors import DataError
from tuneline.models import load_model, load_tokenizer
from tuneline.scoring import preference_pairs, preference_scores

# A base that knows some of the world (300 pre-training steps, seconds), so that pairs can teach it.
PROJECT = {"bootstrap__pretrain_steps": 300, "bootstrap__preference_train_records": 256,
           "bootstrap__preference_eval_records": 128, "data__template": "chatml", "train__max_steps": 30,
           "evaluate__metrics": ["perplexity"], "evaluate__num_samples": 128}  # every eval pair
DPO = {"data__format": "preference", "train__method": "dpo", "train__max_steps": 150, "train__learning_rate": 5e-3,
       "train__dpo_beta": 0.5, "train__logging_steps": 10}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo")
    sft = tiny_params(root, **PROJECT)
    for stage in ("bootstrap", "validate", "tokenize", "train"):
        run_stage(stage, sft)
    raw = sft.bootstrap.data_dir
    dpo = tiny_params(root, **PROJECT | DPO | {
        "data__train_path": str(raw / "preference_train.jsonl"), "data__eval_path": str(raw / "preference_eval.jsonl"),
        "train__dpo_from": str(sft.train.output_dir), "train__output_dir": str(root / "models/adapter-dpo")})
    sft_weights = (sft.train.output_dir / "adapter_model.safetensors").read_bytes()
    for stage in ("validate", "tokenize", "train", "evaluate"):
        run_stage(stage, dpo)
    return sft, dpo, sft_weights


def metric_history(params: Params, key: str) -> list[float]:
    client = registry.client(params)
    run_id = read_json(params.report("train.json"))["mlflow_run_id"]
    return [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def test_reward_accuracy_rises_above_half(trained):
    _, dpo, _ = trained
    accuracy = metric_history(dpo, "dpo.rewards.accuracies")
    margins = metric_history(dpo, "dpo.rewards.margins")
    assert len(accuracy) == len(margins) == 15  # every 10 of 150 steps
    # The reference is the SFT adapter itself: at step 1 every reward is 0, so no pair counts as won yet.
    assert accuracy[0] < 0.5 < accuracy[-1] and margins[-1] > 0
    summary = read_json(dpo.report("train.json"))
    assert summary["reward_accuracy"] == round(accuracy[-1], 4) and summary["reward_margin"] > 0
    assert summary["steps"] == 150 and summary["dpo_from"] == str(dpo.train.dpo_from)
    assert metric_history(dpo, "train.loss")  # the SFT engine's health log runs under DPO too


def test_dpo_writes_its_own_safetensors_adapter(trained):
    sft, dpo, sft_weights = trained
    files = {p.name for p in dpo.train.output_dir.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json"} <= files
    assert "ref" not in files and not any(name.endswith((".bin", ".pt")) for name in files)  # the policy alone
    assert (sft.train.output_dir / "adapter_model.safetensors").read_bytes() == sft_weights  # its start, untouched
    assert not dpo.train.checkpoint_dir.exists()


def test_evaluate_reports_win_rates_and_dpo_beats_base_and_sft(trained):
    sft, dpo, _ = trained
    report = read_json(dpo.report("eval.json"))
    cand, base = report["candidate"], report["base"]
    assert 0 <= base["win_rate"] <= 1 and 0 <= cand["win_rate"] <= 1
    assert cand["win_rate"] > max(base["win_rate"], 0.5)
    assert cand["logp_margin"] > base["logp_margin"]
    from peft import PeftModel

    tokenizer = load_tokenizer(dpo)
    records = [json.loads(line) for line in (dpo.data.validated_dir / "eval.jsonl").read_text().splitlines()]
    assert len(records) == report["num_samples"] == 128
    sft_model = PeftModel.from_pretrained(load_model(dpo), str(sft.train.output_dir)).eval()
    before = preference_scores(sft_model, tokenizer, preference_pairs(records, dpo, tokenizer), 64)
    assert cand["logp_margin"] > before["logp_margin"]  # DPO moved past where SFT left the preference
    run = registry.client(dpo).get_run(read_json(dpo.report("train.json"))["mlflow_run_id"])
    assert run.data.metrics["eval.candidate.win_rate"] == cand["win_rate"]


@pytest.mark.parametrize(("record", "field", "rule"), [
    ({"prompt": "Which word is a fruit?", "chosen": "mango", "rejected": " mango "}, "rejected",
     "must differ from chosen"),
    ({"prompt": "Which word is a fruit?", "chosen": "  ", "rejected": "piano"}, "chosen", "must not be empty"),
    ({"prompt": "Which word is a fruit?", "chosen": "mango"}, "rejected", "required field is missing"),
    ({"prompt": "Which word is a fruit?", "chosen": "mango", "rejected": ["piano"]}, "rejected", "must be a string"),
])
def test_validate_names_file_line_field_and_rule_of_a_bad_pair(tmp_path, record, field, rule):
    path = tmp_path / "pairs.jsonl"
    good = {"prompt": "How many words are there?\n\ntiger mango", "chosen": "two", "rejected": "three"}
    path.write_text(json.dumps(good) + "\n" + json.dumps(record) + "\n", encoding="utf-8")
    with pytest.raises(DataError) as err:
        check_file(path, "preference", Params().validate_)
    assert str(err.value).startswith(f"{path}:2: field '{field}': {rule}")


def test_config_refuses_dpo_without_pairs_or_over_its_own_start(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("{}\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="train.method dpo trains on preference pairs"):
        load_params(params, ["train.method=dpo", "train.output_dir=models/adapter-dpo"])
    with pytest.raises(ConfigError, match="train: .*DPO would overwrite the SFT adapter it starts from"):
        load_params(params, ["train.method=dpo", "data.format=preference"])
    sft_on_pairs = load_params(params, ["data.format=preference"])  # SFT on the chosen answers is allowed
    assert sft_on_pairs.train.method == "sft"


def test_bootstrap_pairs_ask_new_questions_and_reject_a_wrong_answer():
    taken: set[str] = set()
    instructions = generate_records(200, random.Random(1), taken)
    pairs = preference_records(200, random.Random(2), taken)
    asked = {f"{r['instruction']}\n\n{r['input']}" for r in instructions}
    assert not any(p["prompt"] in asked for p in pairs) and len({p["prompt"] for p in pairs}) == 200
    for p in pairs:
        assert p["chosen"] != p["rejected"] and len(p["chosen"].split()) == len(p["rejected"].split())
    assert write_preference(Params().bootstrap) == {}  # not asked: the default writes no pairs
