"""`tuneline`: the command line. It only wires; the work is in the stage modules."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Annotated

import typer

from tasks.config import DEFAULT_PARAMS, load_params
from tasks.errors import TunelineError
from tasks.stage import ALL_STAGES, guarded, quiet_libraries, run_stage

app = typer.Typer(
    help="Tuneline: fine-tune, evaluate, gate, register and serve a language model.\n\n"
    "Stages, in order: " + " -> ".join(ALL_STAGES) + ". Every knob is in params.yaml; "
    "override any with --set dotted.key=value.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
serve_app = typer.Typer(help="Control the Ray Serve endpoint that `deploy` started.", no_args_is_help=True)
app.add_typer(serve_app, name="serve")

ParamsOpt = Annotated[Path, typer.Option("--params", "-p", help="params file")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", "-s", metavar="KEY=VALUE",
                                                  help="override a params key, e.g. train.epochs=2; repeatable")]


def _exit(code: int) -> None:
    if code:
        raise typer.Exit(code)


def run_pipeline(params_path: Path, overrides: list[str]) -> None:
    """All stages in order in this process, logging into one MLflow run."""
    from tasks import tracking

    params = load_params(params_path, overrides)
    run_id = tracking.open_pipeline_run(params, f"finetune-{params.registry.model_name}")
    os.environ[tracking.RUN_ID_ENV] = run_id
    start, ok = time.perf_counter(), False
    try:
        for name in ALL_STAGES:
            run_stage(name, params)
        ok = True
    finally:
        tracking.close_pipeline_run(params, run_id, ok)
        os.environ.pop(tracking.RUN_ID_ENV, None)
    typer.echo(f"pipeline done in {time.perf_counter() - start:.0f}s; MLflow run {run_id}; "
               f"reports in {params.reports_dir}/")


@app.command()
def run(params: ParamsOpt = DEFAULT_PARAMS, set_: SetOpt = None) -> None:
    """Run every stage in order: bootstrap, validate, tokenize, train, evaluate, gate, merge, deploy."""
    quiet_libraries()
    _exit(guarded(lambda: run_pipeline(params, set_ or [])))


@app.command()
def stage(name: Annotated[str, typer.Argument(help="one of: " + ", ".join(ALL_STAGES))],
          params: ParamsOpt = DEFAULT_PARAMS, set_: SetOpt = None) -> None:
    """Run one stage (its inputs must exist: earlier stages ran before)."""
    quiet_libraries()
    _exit(guarded(lambda: run_stage(name, load_params(params, set_ or []))))


@app.command()
def validate(paths: Annotated[list[Path], typer.Argument(help="JSON Lines files to check")],
             format: Annotated[str | None, typer.Option(help="instruction | chat | completion "
                                                        "(default: data.format from params)")] = None,
             params: ParamsOpt = DEFAULT_PARAMS) -> None:
    """Check data files alone (no outputs written): the first problem is reported by file, line and field."""
    quiet_libraries()

    def check() -> None:
        from tasks.validate import validate_paths

        cfg = load_params(params) if params.exists() else None
        fmt = format or (cfg.data.format if cfg else "instruction")
        if fmt not in ("instruction", "chat", "completion"):
            raise TunelineError(f"--format {fmt!r}: must be instruction, chat or completion")
        from tasks.config import Validate

        counts = validate_paths(paths, fmt, cfg.validate_ if cfg else Validate())
        for path, n in counts.items():
            typer.echo(f"ok: {path}: {n} {fmt} records")

    _exit(guarded(check))


@serve_app.command("status")
def serve_status(params: ParamsOpt = DEFAULT_PARAMS) -> None:
    """Is the endpoint up, and which model version does it serve?"""
    from tasks import serve_control

    def show() -> None:
        for key, value in serve_control.status(load_params(params)).items():
            typer.echo(f"{key}: {value}")

    _exit(guarded(show))


@serve_app.command("stop")
def serve_stop(params: ParamsOpt = DEFAULT_PARAMS) -> None:
    """Stop the served app and the local Ray cluster that deploy started."""
    from tasks import serve_control

    _exit(guarded(lambda: serve_control.stop(load_params(params))))


if __name__ == "__main__":
    app()
