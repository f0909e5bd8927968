"""How a fine-tuning job's fields become params (flows/jobs/runs.py), read back the way its flow run reads them."""

from __future__ import annotations

import pytest
from support.project import REPO

from flows.jobs import runs
from flows.jobs.wire import APIProblem, parse_method
from flows.parameters import resolve_params
from tuneline.config import load_params


def _job(method: dict, **extra) -> dict:
    return {"id": "ftjob-0123456789abcdef01234567", "tenant": "Acme Corp", "suffix": "Word Games!", "seed": 7,
            "method": parse_method({"method": method}), **extra}


def _resolved(tmp_path, method: dict, fmt: str = "instruction"):
    params = load_params(REPO / "params.yaml")
    sets = runs.job_sets(params, tmp_path, _job(method), tmp_path / "data/files/a.jsonl", None, fmt, None)
    return params, resolve_params(REPO / "params.yaml", None, sets)


def test_supervised_hyperparameters_map_onto_params(tmp_path):
    params, job = _resolved(tmp_path, {"type": "supervised", "supervised": {"hyperparameters": {
        "n_epochs": 3, "batch_size": 4, "learning_rate_multiplier": 0.5}}})
    folder = tmp_path / "jobs" / "ftjob-0123456789abcdef01234567"
    assert (job.train.epochs, job.train.max_steps, job.train.batch_size) == (3, -1, 4)
    assert job.train.learning_rate == pytest.approx(params.train.learning_rate * 0.5)
    assert job.train.seed == 7 and job.data.eval_path is None and job.data.format == "instruction"
    assert job.registry.model_name == "ft-acme-corp-word-games-0123456789ab"
    assert job.serving.deploy is False and job.model.base == params.model.base
    assert job.reports_dir == folder / "reports" and job.train.output_dir == folder / "models/adapter"
    assert job.merge.output_dir == folder / "models/merged" and job.data.tokenized_dir == folder / "data/tokenized"


def test_auto_keeps_params_values_and_dpo_maps_beta(tmp_path):
    params, job = _resolved(tmp_path, {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.3}}}, "preference")
    assert (job.train.epochs, job.train.max_steps, job.train.batch_size) == (
        params.train.epochs, params.train.max_steps, params.train.batch_size)
    assert job.train.method == "dpo" and job.train.dpo_beta == 0.3 and job.data.format == "preference"
    assert job.train.dpo_from == tmp_path / params.train.dpo_from


@pytest.mark.parametrize(("method", "param"), [
    ({"type": "reinforcement"}, "method.type"),
    ({"type": "supervised", "supervised": {"hyperparameters": {"beta": 0.1}}},
     "method.supervised.hyperparameters.beta"),
    ({"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1.5}}},
     "method.supervised.hyperparameters.n_epochs"),
    ({"type": "dpo", "dpo": {"hyperparameters": {"learning_rate_multiplier": -1}}},
     "method.dpo.hyperparameters.learning_rate_multiplier"),
])
def test_bad_methods_are_refused_naming_the_field(method, param):
    with pytest.raises(APIProblem) as refused:
        parse_method({"method": method})
    assert refused.value.status == 400 and refused.value.param == param
