"""The Prefect flow `sweep`: the steps of flows/trials.py as Prefect tasks (the work is done there).

Parameters as the `finetune` flow's: `overrides`, a typed form of every key of params.yaml (e.g.
`{"sweep": {"n_trials": 20}}`), and `sets`, dotted `KEY=VALUE` as `tuneline sweep --set`. Nothing
is cached: every run is a new study and a new MLflow parent run.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from flows import trials
from flows.parameters import NO_OVERRIDES, ParamsOverrides, resolve_params
from tuneline.config import DEFAULT_PARAMS, Params


@task(name="validate-and-tokenize", cache_policy=NO_CACHE)
def prepare(params: Params) -> None:
    trials.prepare(params)


@task(name="open-study", cache_policy=NO_CACHE)
def open_sweep(params: Params) -> trials.Plan:
    return trials.open_sweep(params)


@task(name="trials", cache_policy=NO_CACHE)
def run_trials(plan: trials.Plan) -> None:
    trials.run_trials(plan)


@task(name="best-trial", cache_policy=NO_CACHE)
def finish(plan: trials.Plan) -> dict[str, Any]:
    return trials.finish(plan)


@flow(name="sweep", log_prints=True, validate_parameters=True,
      description="Optuna sweep over learning rate, LoRA r/alpha and batch size (params `sweep`); the best "
                  "trial's values go to an overrides file for `tuneline run --overrides`.")
def sweep(
    overrides: ParamsOverrides = NO_OVERRIDES,  # type: ignore[valid-type]
    sets: list[str] | None = None,
    params_path: str = str(DEFAULT_PARAMS),
) -> dict[str, Any]:
    """Validate and tokenize, run the trials, write the best trial's values; returns the sweep's summary."""
    params = resolve_params(params_path, overrides, sets)
    prepare(params)
    plan = open_sweep(params)
    run_trials(plan)
    summary = finish(plan)
    print(summary["line"])
    return summary
