"""Sweeps (flows/trials.py): Optuna trials, MLflow child runs, the best trial's overrides file.

A tiny project (tests/conftest.py tiny_params) whose sweep ranges hold its own values, so
trial 0 is the baseline. `tuneline sweep` runs 4 trials in 2 worker processes sharing the
study; the Prefect flow `sweep` runs 2 in-process against a temporary Prefect server.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from support.project import REPO, tiny_params

from tuneline.config import ConfigError, file_overrides, load_params
from tuneline.errors import TunelineError

SWEPT = ("train.learning_rate", "lora.r", "lora.alpha", "train.batch_size")


def _sweep_section(root: Path, **extra) -> dict:
    return {"n_trials": 4, "parallel": 2, "seed": 3, "max_steps": 6, "eval_steps": 2, "pruning_warmup_steps": 2,
            "startup_trials": 2, "learning_rate": {"low": 1e-3, "high": 5e-2}, "lora_r": [4, 16],
            "batch_size": [4, 8], "study_dir": str(root / "reports/sweep"),
            "best_path": str(root / "reports/sweep_best.yaml"), **extra}


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A bootstrapped tiny project with a params.yaml; lr 5e-3, r 16, alpha 32, batch 8 lie inside the ranges."""
    from tasks import run_stage

    root = tmp_path_factory.mktemp("sweep")
    params = tiny_params(root, sweep=_sweep_section(root))
    (root / "params.yaml").write_text(yaml.safe_dump(params.model_dump(mode="json", by_alias=True), sort_keys=False))
    run_stage("bootstrap", params)
    return root, params


def _cli(*args: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _children(params, parent_id: str) -> list:
    import mlflow

    client = mlflow.MlflowClient(params.registry.tracking_uri)
    exp = client.get_experiment_by_name(params.registry.experiment)
    return client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")


def _study(params, name: str):
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    storage = JournalStorage(JournalFileBackend(str(params.sweep.study_dir / "study.journal")))
    return optuna.load_study(study_name=name, storage=storage)


def test_bad_sweep_params_name_the_key_and_rule(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"sweep": {"learning_rate": {"low": 0.1, "high": 0.01}, "lora_r": [],
                                              "lora_alpha": "3r"}}))
    with pytest.raises(ConfigError) as err:
        load_params(path)
    message = str(err.value)
    assert f"{path}: sweep.learning_rate: Value error, low (0.1) must be below high (0.01)" in message
    assert f"{path}: sweep.lora_r: List should have at least 1 item" in message
    assert f"{path}: sweep.lora_alpha" in message and "'2r'" in message
    with pytest.raises(ConfigError, match=r"sweep: Value error, eval_steps \(20\) must not exceed max_steps \(10\)"):
        load_params(path, ["sweep.learning_rate.high=0.2", "sweep.lora_r=[8]", "sweep.lora_alpha=2r",
                           "sweep.max_steps=10", "sweep.eval_steps=20"])

    proc = _cli("sweep", "--params", str(REPO / "params.yaml"), "--set", "sweep.n_trials=0", cwd=tmp_path)
    assert proc.returncode == 1
    assert "sweep.n_trials: Input should be greater than 0 (got 0)" in proc.stderr
    assert not (tmp_path / "reports").exists()  # refused before any work

    from flows.trials import prepare

    with pytest.raises(TunelineError, match="train.method is dpo, but trials train supervised"):
        prepare(load_params(REPO / "params.yaml", ["train.method=dpo", "data.format=preference",
                                                    "train.output_dir=models/adapter-dpo"]))

    bad = tmp_path / "bad_overrides.yaml"
    bad.write_text("lora:\n  rr: 8\n")
    proc = _cli("run", "--params", str(REPO / "params.yaml"), "--overrides", str(bad), cwd=tmp_path)
    assert proc.returncode == 1 and "lora.rr: unknown key" in proc.stderr


def test_sweep_cli_writes_the_best_completed_trial(project):
    import mlflow

    root, params = project
    proc = _cli("sweep", "--params", str(root / "params.yaml"), cwd=root)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "4 trials over 2 worker processes" in proc.stdout
    (line,) = [x for x in proc.stdout.splitlines() if x.startswith("sweep sweep-")]
    study_name = line.split()[1].rstrip(":")

    # Optuna: all four trials ran, none crashed; pruned ones stopped before the last step.
    from optuna.trial import TrialState

    trials = _study(params, study_name).get_trials()
    assert len(trials) == 4 and {t.state for t in trials} <= {TrialState.COMPLETE, TrialState.PRUNED}
    assert all(max(t.intermediate_values) < 6 for t in trials if t.state == TrialState.PRUNED)
    assert trials[0].user_attrs["baseline"] is True  # params.yaml's own values ran first
    assert trials[0].user_attrs["overrides"] == {"train.learning_rate": 5e-3, "lora.r": 16, "lora.alpha": 32,
                                                 "train.batch_size": 8}

    # MLflow: one finished parent named after the sweep, a child run per trial with its values and eval loss.
    client = mlflow.MlflowClient(params.registry.tracking_uri)
    parents = client.search_runs([client.get_experiment_by_name(params.registry.experiment).experiment_id],
                                 f"tags.`optuna.study` = '{study_name}' and tags.`tuneline.entry` = 'tuneline sweep'"
                                 " and attributes.run_name = '" + study_name + "'")
    (parent,) = parents
    assert parent.info.status == "FINISHED" and parent.data.params["sweep.n_trials"] == "4"
    children = _children(params, parent.info.run_id)
    assert len(children) == 4
    by_trial = {int(c.data.tags["optuna.trial"]): c for c in children}
    for t in trials:
        child = by_trial[t.number]
        assert {k: child.data.params[k] for k in SWEPT} == {k: str(v) for k, v in t.user_attrs["overrides"].items()}
        assert child.data.tags["optuna.state"] == t.state.name
        assert child.data.metrics["eval_loss"] == pytest.approx(t.intermediate_values[max(t.intermediate_values)])

    # The chosen trial is the completed one with the lowest eval loss, read from MLflow.
    complete = [c for c in children if c.data.tags["optuna.state"] == "COMPLETE"]
    lowest = min(complete, key=lambda c: c.data.metrics["eval_loss"])
    best_file = params.sweep.best_path
    best = yaml.safe_load(best_file.read_text())
    flat = {f"{section}.{key}": value for section, keys in best.items() for key, value in keys.items()}
    assert {k: str(v) for k, v in flat.items()} == {k: lowest.data.params[k] for k in SWEPT}
    assert parent.data.tags["tuneline.sweep.best_run_id"] == lowest.info.run_id
    assert parent.data.metrics["sweep.best_eval_loss"] == pytest.approx(lowest.data.metrics["eval_loss"])

    # `tuneline run --overrides` takes the file: it is params keys that load_params validates and applies.
    tuned = load_params(root / "params.yaml", layer=file_overrides(best_file))
    assert (tuned.train.learning_rate, tuned.lora.r, tuned.lora.alpha, tuned.train.batch_size) == tuple(
        flat[k] for k in SWEPT)
    assert not params.train.checkpoint_dir.exists()  # trials kept no checkpoints, least of all the pipeline's
