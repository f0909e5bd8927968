"""The Prefect flow `sweep`: the steps of flows/trials.py as Prefect tasks (the work is done there).

Its run form is built as the `finetune` flow's (flows/parameters.py): the data and model knobs and the
sweep's size, with params.yaml's values as defaults, then `sets`, dotted `KEY=VALUE` as `tuneline sweep
--set`, and `overrides`, a typed form of every key of params.yaml (e.g. `{"sweep": {"n_trials": 20}}`).
Nothing is cached: every run is a new study and a new MLflow parent run.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from flows import trials
from flows.parameters import (
    FORM,
    NO_OVERRIDES,
    SWEEP_KNOBS,
    DataFormat,
    LoraMethod,
    Overrides,
    knob_layer,
    resolve_params,
)
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
    train_path: str = FORM["train_path"],
    eval_path: str = FORM["eval_path"],
    data_format: DataFormat = FORM["data_format"],  # type: ignore[valid-type]
    base_model: str = FORM["base_model"],
    lora_method: LoraMethod = FORM["lora_method"],  # type: ignore[valid-type]
    n_trials: int = FORM["n_trials"],
    trial_steps: int = FORM["trial_steps"],
    sets: list[str] = [],  # noqa: B006 (never changed)
    overrides: Overrides = NO_OVERRIDES,  # type: ignore[valid-type]
) -> dict[str, Any]:
    """Validate and tokenize, run the trials, write the best trial's values; returns the sweep's summary.

    A knob applies only when it differs from params.yaml's value as the run starts (flows/parameters.py).

    Args:
        sets: any other params key as dotted KEY=VALUE, applied last, as `tuneline sweep --set`
            (e.g. `sweep.parallel=2`).
        overrides: any keys of params.yaml, nested as there (e.g. `{"train": {"warmup_ratio": 0.1}}`), checked
            against its types as the run starts. Applied after the knobs, before `sets`.
    """
    knobs = {name: value for name, value in locals().items() if name in SWEEP_KNOBS}
    params = resolve_params(DEFAULT_PARAMS, overrides, sets, knob_layer(knobs))
    prepare(params)
    plan = open_sweep(params)
    run_trials(plan)
    summary = finish(plan)
    print(summary["line"])
    return summary
