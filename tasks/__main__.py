"""`python -m tasks STAGE [--params FILE] [--set KEY=VALUE ...]`: one stage, as dvc.yaml runs it."""

from __future__ import annotations

import argparse
import sys

from tasks import ALL_STAGES, run_stage
from tuneline.config import DEFAULT_PARAMS, load_params
from tuneline.errors import guarded
from tuneline.logs import quiet_libraries


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tasks", description="Run one stage of the pipeline.")
    parser.add_argument("stage", choices=ALL_STAGES, help="the stage to run")
    parser.add_argument("--params", default=str(DEFAULT_PARAMS), help="params file (default: params.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a dotted key of params.yaml; repeatable")
    parser.add_argument("--mlflow-run-id", metavar="ID", help="log into this MLflow run (the torchrun workers of a "
                        "distributed train get the pipeline's); default: the one reports/train.json names")
    args = parser.parse_args(argv)
    quiet_libraries()
    return guarded(lambda: run_stage(args.stage,
                                     load_params(args.params, args.overrides).in_mlflow_run(args.mlflow_run_id)))


if __name__ == "__main__":
    sys.exit(main())
