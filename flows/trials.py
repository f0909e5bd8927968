"""Hyperparameter sweep: Optuna trials over learning rate, LoRA r/alpha and batch size; the best becomes overrides.

1. prepare: validate and tokenize once; every trial trains on the same tokenized data.
2. open_sweep: an Optuna study (minimize eval loss) in a journal file under `sweep.study_dir`, which
   processes can share, and one MLflow parent run, both named after the sweep. With `sweep.baseline`
   the first trial runs params.yaml's own values, so the sweep shows what it gained over them.
3. run_trials: `sweep.parallel` worker processes (each its own GPU on a GPU host, a share of the
   cores on a CPU one), or this process alone, take trials from the study. The TPE sampler (seeded)
   picks a trial's values; the trial trains them for `sweep.max_steps` (flows/trial_train.py, on the
   Trainer of tuneline/training/trainer.py) and scores the eval split every `sweep.eval_steps` steps
   and at the end: each eval loss goes to the median pruner, which may stop the trial, and to the
   trial's MLflow child run. Trials keep no checkpoints or adapters: a sweep keeps scores.
4. finish: the best completed trial's values go to `sweep.best_path`, a YAML overrides file for
   `tuneline run --overrides`; its figures go to the parent run; the caller gets a one-line summary.

`python -m flows.trials PLAN N INDEX` is one worker process taking N trials (run_trials starts them).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import yaml
from pydantic import BaseModel

from flows.trial_train import suggest, train_trial, trial_params
from tuneline import tracking
from tuneline.atomic import read_json, write_text
from tuneline.config import Params, Sweep
from tuneline.errors import TunelineError
from tuneline.models import load_tokenizer


class Plan(BaseModel):
    """What every worker needs: the sweep's params, its study and its MLflow parent run."""

    params: Params
    study: str
    parent_run_id: str
    started: float


# ---------------------------------------------------------------- 1. data, once


def prepare(params: Params) -> None:
    """Validate and tokenize once: every trial trains on the same tokenized data."""
    from tasks import run_stage

    if params.train.method != "sft":
        raise TunelineError(f"sweep: train.method is {params.train.method}, but trials train supervised "
                            "(tasks/train/); sweep the SFT run with train.method=sft")
    for name in ("validate", "tokenize"):
        run_stage(name, params)


# ---------------------------------------------------------------- 2. the study and the parent run


def _storage(sweep: Sweep):
    """The journal file: an append-only log, safe for several processes on one machine."""
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    sweep.study_dir.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(str(sweep.study_dir / "study.journal")))


def _study(plan: Plan, worker: int = 0):
    import optuna

    s = plan.params.sweep
    # Each worker its own seed: the same one would make them propose the same random start.
    sampler = optuna.samplers.TPESampler(seed=s.seed + worker, n_startup_trials=s.startup_trials)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=s.startup_trials, n_warmup_steps=s.pruning_warmup_steps)
    return optuna.load_study(study_name=plan.study, storage=_storage(s), sampler=sampler, pruner=pruner)


def _baseline(params: Params) -> dict | None:
    """params.yaml's own values as a trial's, if they lie inside the search space."""
    s = params.sweep
    lr, r, alpha, batch = (params.train.learning_rate, params.lora.r, params.lora.alpha, params.train.batch_size)
    alpha_ok = alpha == 2 * r if s.lora_alpha == "2r" else alpha in s.lora_alpha
    if not (s.learning_rate.low <= lr <= s.learning_rate.high and r in s.lora_r and batch in s.batch_size
            and alpha_ok):
        return None
    values = {"train.learning_rate": lr, "lora.r": r, "train.batch_size": batch}
    return values if s.lora_alpha == "2r" else {**values, "lora.alpha": alpha}


def open_sweep(params: Params) -> Plan:
    """Create the study (the baseline trial queued first) and the MLflow parent run, both named after the sweep."""
    import optuna
    from mlflow import MlflowClient
    from mlflow.entities import Param

    s = params.sweep
    name = f"sweep-{params.registry.model_name}-{datetime.now(UTC):%Y%m%d-%H%M%S}"
    study = optuna.create_study(study_name=name, storage=_storage(s), direction="minimize")
    baseline = _baseline(params) if s.baseline else None
    if baseline:
        study.enqueue_trial(baseline, user_attrs={"baseline": True})
    elif s.baseline:
        print("sweep: params.yaml's learning rate, LoRA r/alpha or batch size lie outside the sweep's ranges: "
              "no baseline trial")
    run_id = tracking.open_pipeline_run(params, name, {"tuneline.entry": "tuneline sweep", "optuna.study": name,
                                                       "optuna.storage": str(s.study_dir / "study.journal")})
    MlflowClient().log_batch(run_id, params=[
        Param(f"sweep.{key}", json.dumps(value) if isinstance(value, list | dict) else str(value))
        for key, value in params.section("sweep").items()])
    return Plan(params=params, study=name, parent_run_id=run_id, started=time.time())


# ---------------------------------------------------------------- 3. the trials


def _worker_envs(sweep: Sweep) -> list[dict[str, str]]:
    """One environment per worker process: its own GPU on a GPU host, a share of the cores on a CPU one."""
    import torch

    count = torch.cuda.device_count()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    gpus = [g for g in visible.split(",") if g][:count] if visible else [str(i) for i in range(count)]
    n = min(max(1, len(gpus)) if sweep.parallel == "auto" else sweep.parallel, sweep.n_trials)
    envs = []
    for i in range(n):
        env = dict(os.environ)
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = gpus[i % len(gpus)]
        else:  # torch takes every core by default: n workers would fight over them
            env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // n)))
        envs.append(env)
    return envs


def run_trials(plan: Plan) -> None:
    """`sweep.n_trials` trials: here when one at a time, else split over worker processes sharing the study."""
    s = plan.params.sweep
    try:
        envs = _worker_envs(s)
        if len(envs) == 1:
            work(plan, s.n_trials, 0)
            return
        plan_file = write_text(s.study_dir / f"{plan.study}.json", plan.model_dump_json(by_alias=True))
        shares = [s.n_trials // len(envs) + (i < s.n_trials % len(envs)) for i in range(len(envs))]
        print(f"sweep: {s.n_trials} trials over {len(envs)} worker processes ({', '.join(map(str, shares))})")
        procs = [subprocess.Popen([sys.executable, "-m", "flows.trials", str(plan_file), str(share), str(i)], env=env)
                 for i, (env, share) in enumerate(zip(envs, shares, strict=True))]
        try:
            codes = [p.wait() for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.terminate()
        if any(codes):
            raise TunelineError(f"sweep {plan.study}: worker exit codes {codes}; their output is above")
    except BaseException:
        tracking.close_pipeline_run(plan.params, plan.parent_run_id, ok=False)
        raise


def work(plan: Plan, n_trials: int, worker: int) -> None:
    """One worker: `n_trials` trials from the study, one after another, on the tokenized data."""
    from datasets import load_from_disk

    from tuneline.training.supervision import NonFiniteLoss

    params = plan.params
    experiment_id = tracking.setup(params)
    data = load_from_disk(str(params.data.tokenized_dir))
    tokenizer = load_tokenizer(params)
    # A diverging learning rate is an outcome of the search, not a crash: the trial fails, the sweep goes on.
    _study(plan, worker).optimize(lambda trial: _objective(trial, plan, experiment_id, data, tokenizer),
                                  n_trials=n_trials, catch=(NonFiniteLoss,))


def _objective(trial, plan: Plan, experiment_id: str, data, tokenizer) -> float:
    """The trial's final eval loss, trained in an MLflow child run of the sweep's; TrialPruned if stopped early."""
    import mlflow
    import optuna

    values = suggest(trial, plan.params.sweep)
    trial.set_user_attr("overrides", values)
    tags = {"tuneline.entry": "tuneline sweep", "optuna.study": plan.study, "optuna.trial": str(trial.number),
            "tuneline.sweep.baseline": str(bool(trial.user_attrs.get("baseline"))).lower()}
    with (tempfile.TemporaryDirectory(prefix="tuneline-trial-") as scratch,
          mlflow.start_run(run_name=f"trial-{trial.number}", experiment_id=experiment_id,
                           parent_run_id=plan.parent_run_id, tags=tags) as run):
        trial.set_user_attr("mlflow_run_id", run.info.run_id)
        mlflow.log_params({**values, "train.max_steps": plan.params.sweep.max_steps})
        reporter = train_trial(trial, trial_params(plan.params, values, Path(scratch)), data, tokenizer)
        mlflow.set_tag("optuna.state", "PRUNED" if reporter.pruned_at is not None else "COMPLETE")
    if reporter.pruned_at is not None:
        raise optuna.TrialPruned(f"eval loss {reporter.eval_loss:.4f} at step {reporter.pruned_at}: "
                                 "worse than the median of earlier trials there")
    return reporter.eval_loss


# ---------------------------------------------------------------- 4. the best trial


def _best_yaml(plan: Plan, best, n_trials: int) -> str:
    s = plan.params.sweep
    tree: dict[str, dict] = {}
    for dotted, value in best.user_attrs["overrides"].items():
        section, key = dotted.split(".")
        tree.setdefault(section, {})[key] = value
    return (f"# {plan.study}: trial {best.number} of {n_trials}, eval loss {best.value:.4f} after "
            f"{s.max_steps} steps (MLflow run {best.user_attrs['mlflow_run_id']}).\n"
            f"# Train with it: tuneline run --overrides {s.best_path}\n" + yaml.safe_dump(tree, sort_keys=False))


def finish(plan: Plan) -> dict:
    """Write the best completed trial's values, log the sweep's figures to the parent run, close it."""
    from mlflow import MlflowClient
    from optuna.trial import TrialState

    s = plan.params.sweep
    trials = _study(plan).get_trials(deepcopy=False)
    states = Counter(t.state for t in trials)
    complete, pruned, failed = (states[TrialState.COMPLETE], states[TrialState.PRUNED], states[TrialState.FAIL])
    if not complete:
        tracking.close_pipeline_run(plan.params, plan.parent_run_id, ok=False)
        raise TunelineError(f"sweep {plan.study}: no trial completed ({pruned} pruned, {failed} failed); see the "
                            "trials' MLflow runs, and narrow sweep.learning_rate or raise sweep.pruning_warmup_steps")
    best = min((t for t in trials if t.state == TrialState.COMPLETE), key=lambda t: t.value)
    baseline = next((t for t in trials if t.user_attrs.get("baseline")), None)
    write_text(s.best_path, _best_yaml(plan, best, len(trials)))
    summary = {"study": plan.study, "mlflow_run_id": plan.parent_run_id, "trials": len(trials),
               "complete": complete, "pruned": pruned, "failed": failed,
               "seconds": round(time.time() - plan.started, 1), "best_trial": best.number,
               "best_eval_loss": best.value, "best": best.user_attrs["overrides"],
               "baseline_eval_loss": baseline.value if baseline and baseline.state == TrialState.COMPLETE else None,
               "best_path": str(s.best_path)}
    tracking.setup(plan.params)
    client = MlflowClient()
    for key in ("trials", "complete", "pruned", "failed", "seconds", "best_eval_loss", "baseline_eval_loss"):
        if summary[key] is not None:
            client.log_metric(plan.parent_run_id, f"sweep.{key}", summary[key])
    client.set_tag(plan.parent_run_id, "tuneline.sweep.best_run_id", best.user_attrs["mlflow_run_id"])
    client.log_artifact(plan.parent_run_id, str(s.best_path))
    tracking.close_pipeline_run(plan.params, plan.parent_run_id, ok=True)
    if baseline is None:
        versus = "no baseline trial"
    else:
        versus = (f"baseline {baseline.value:.4f}" if baseline.state == TrialState.COMPLETE
                  else f"baseline trial {baseline.state.name.lower()}")
    summary["line"] = (
        f"sweep {plan.study}: {len(trials)} trials ({complete} complete, {pruned} pruned, {failed} failed) in "
        f"{summary['seconds']:.0f}s; best trial {best.number}: eval loss {best.value:.4f} ({versus}) with "
        + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in summary["best"].items())
        + f"; wrote {s.best_path} (tuneline run --overrides {s.best_path}); MLflow run {plan.parent_run_id}")
    return summary


def run(params: Params) -> dict:
    """The whole sweep: `tuneline sweep` (the Prefect flow `sweep` runs the same steps as tasks)."""
    prepare(params)
    plan = open_sweep(params)
    run_trials(plan)
    return finish(plan)


if __name__ == "__main__":
    from tuneline.errors import guarded
    from tuneline.logs import quiet_libraries

    plan_path, n, index = sys.argv[1:4]
    quiet_libraries()
    # Python-mode validation: params' path-or-URI fields take the str that JSON holds.
    sys.exit(guarded(lambda: work(Plan.model_validate(read_json(plan_path)), int(n), int(index))))
