"""`tuneline`: the command line. It only wires; the work is in the stage modules."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from tasks import ALL_STAGES, run_stage
from tuneline.config import DEFAULT_PARAMS, Params, file_overrides, load_params
from tuneline.errors import TunelineError, guarded
from tuneline.logs import quiet_libraries

app = typer.Typer(
    help="Tuneline: fine-tune, evaluate, gate, register and serve a language model.\n\n"
    "Stages, in order: " + " -> ".join(ALL_STAGES) + ". Every knob is in params.yaml; "
    "override any with --set dotted.key=value.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
serve_app = typer.Typer(help="The Ray Serve endpoint: start it (with the fine-tuning API), its status, roll back, "
                        "stop.", no_args_is_help=True)
app.add_typer(serve_app, name="serve")
data_app = typer.Typer(help="Version data with DVC: push it to the DVC remote (S3 or a folder), pull it back.",
                       no_args_is_help=True)
app.add_typer(data_app, name="data")
prefect_app = typer.Typer(help="The embedded Prefect: a local server, a worker and the deployments of prefect.yaml.",
                          no_args_is_help=True)
app.add_typer(prefect_app, name="prefect")


@app.callback()
def _quiet() -> None:
    """Before any command: our own lines and progress bars only, no library chatter."""
    quiet_libraries()


RemoteOpt = Annotated[str | None, typer.Option("--remote", "-r", help="DVC remote name (default: the default remote)")]

ParamsOpt = Annotated[Path, typer.Option("--params", "-p", help="params file")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", "-s", metavar="KEY=VALUE",
                                                  help="override a params key, e.g. train.epochs=2; repeatable")]
OverridesOpt = Annotated[Path | None, typer.Option(
    "--overrides", "-o", help="YAML file of params keys to override, nested as in params.yaml or dotted (e.g. "
    "reports/sweep_best.yaml from `tuneline sweep`); --set applies after it")]


def _exit(code: int) -> None:
    if code:
        raise typer.Exit(code)


def _echo(tree: dict, prefix: str = "") -> None:
    """A command's result as `key: value` lines; nested sections as dotted keys."""
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            _echo(value, f"{prefix}{key}.")
        else:
            typer.echo(f"{prefix}{key}: {value}")


def run_flow(params: Params) -> None:
    """All stages as the Prefect flow `finetune` in this process: unchanged stages come from its cache."""
    from flows.finetune import finetune_from_params
    from flows.local import prefect_api

    start = time.perf_counter()
    with prefect_api() as api:  # PREFECT_API_URL, else this project's `tuneline prefect up` server, else ephemeral
        s = finetune_from_params(params=params)
    typer.echo(f"pipeline done in {time.perf_counter() - start:.0f}s (Prefect: {api}); "
               f"ran: {', '.join(s['ran']) or 'none'}; cached: {', '.join(s['cached']) or 'none'}; "
               f"MLflow run {s['mlflow_run_id'] or 'none (every stage cached)'}; gate: {s['decision']}; "
               f"model version: {s['model_version'] or 'none'}")


def run_pipeline(params: Params) -> None:
    """All stages in order in this process, without Prefect, logging into one MLflow run."""
    from tuneline import run_view, tracking

    run_id = tracking.open_pipeline_run(params, run_view.run_name(params))
    start, ok = time.perf_counter(), False
    try:
        for name in ALL_STAGES:
            run_stage(name, params.in_mlflow_run(run_id))
        ok = True
    finally:
        tracking.close_pipeline_run(params, run_id, ok)
    typer.echo(f"pipeline done in {time.perf_counter() - start:.0f}s; MLflow run {run_id}; "
               f"reports in {params.reports_dir}/")


@app.command()
def run(params: ParamsOpt = DEFAULT_PARAMS, set_: SetOpt = None, overrides: OverridesOpt = None,
        prefect: Annotated[bool, typer.Option("--prefect/--no-prefect", help="run as the Prefect flow `finetune` "
                                              "(stage cache, retries, run report), or plainly")] = True) -> None:
    """Run every stage in order: bootstrap, validate, tokenize, train, evaluate, gate, merge, deploy."""
    _exit(guarded(lambda: (run_flow if prefect else run_pipeline)(
        load_params(params, set_ or [], layer=file_overrides(overrides)))))


@app.command()
def stage(name: Annotated[str, typer.Argument(help="one of: " + ", ".join(ALL_STAGES))],
          params: ParamsOpt = DEFAULT_PARAMS, set_: SetOpt = None) -> None:
    """Run one stage (its inputs must exist: earlier stages ran before)."""
    _exit(guarded(lambda: run_stage(name, load_params(params, set_ or []))))


@app.command()
def sweep(params: ParamsOpt = DEFAULT_PARAMS, set_: SetOpt = None) -> None:
    """Search learning rate, LoRA r/alpha and batch size with Optuna (params `sweep`): short trials scored by eval
    loss, each an MLflow child run; the best trial's values go to sweep.best_path, for `tuneline run --overrides`."""

    def search() -> None:
        from flows import trials

        typer.echo(trials.run(load_params(params, set_ or []))["line"])

    _exit(guarded(search))


@app.command()
def estimate(params: ParamsOpt = DEFAULT_PARAMS, set_: SetOpt = None) -> None:
    """Expected GPU-hours and cost of training, from the token count and a known speed (see params `cost`)."""
    from tuneline import cost

    _exit(guarded(lambda: _echo(cost.estimate(load_params(params, set_ or [])))))


@app.command()
def validate(paths: Annotated[list[Path], typer.Argument(help="JSON Lines files to check")],
             format: Annotated[str | None, typer.Option(help="instruction | chat | completion | preference "
                                                        "(default: data.format from params)")] = None,
             params: ParamsOpt = DEFAULT_PARAMS,
             eval_: Annotated[Path | None, typer.Option("--eval", help="an eval file: checked too, and against "
                                                        "the one train PATH for train/eval overlap")] = None) -> None:
    """Check any data files you name, wherever they are (nothing is written): the first problem is reported by
    file, line and field."""

    def check() -> None:
        from tasks.validate import validate_paths

        cfg = load_params(params) if params.exists() else None
        fmt = format or (cfg.data.format if cfg else "instruction")
        if fmt not in ("instruction", "chat", "completion", "preference"):
            raise TunelineError(f"--format {fmt!r}: must be instruction, chat, completion or preference")
        from tuneline.config import Validate

        counts = validate_paths(paths, fmt, cfg.validate_ if cfg else Validate(), eval_)
        for path, n in counts.items():
            typer.echo(f"ok: {path}: {n} {fmt} records")

    _exit(guarded(check))


@serve_app.command("start")
def serve_start(params: ParamsOpt = DEFAULT_PARAMS) -> None:
    """Bring the serving endpoint up (serving.host:port) with the fine-tuning API on it, no model needed.

    `/v1/files` and `/v1/fine_tuning/jobs`, as the `openai` client calls them (see the README's "Fine-tuning
    through the OpenAI API"). Jobs run on Prefect: PREFECT_API_URL, else this project's server and worker,
    started as `tuneline prefect up` does. `deploy` adds the champion on the same endpoint."""
    from flows.jobs import serve_app

    _exit(guarded(lambda: _echo(serve_app.start(load_params(params), params))))


@serve_app.command("status")
def serve_status(params: ParamsOpt = DEFAULT_PARAMS) -> None:
    """Is the endpoint up, which model version serves, and its metrics (requests, latency, TTFT, tokens/s, batches)?"""
    from serving import control

    _exit(guarded(lambda: _echo(control.status(load_params(params)))))


@app.command()
def promote(version: Annotated[str, typer.Argument(help="registered version number, or an alias such as challenger")],
            params: ParamsOpt = DEFAULT_PARAMS) -> None:
    """Serve a registered model version and make it the champion, without downtime, gate or no gate.

    The manual way to ship (deploy is the gated one): the version starts beside what serves, must answer a
    real generation, takes the traffic, and the `champion` alias moves to it; if it fails, what served keeps
    serving. `tuneline serve rollback` undoes it."""
    from serving import control

    _exit(guarded(lambda: _echo(control.promote(load_params(params), version))))


@serve_app.command("rollback")
def serve_rollback(params: ParamsOpt = DEFAULT_PARAMS) -> None:
    """Serve the previous champion again, without downtime, and move the `champion` alias back to it."""
    from serving import control

    _exit(guarded(lambda: _echo(control.rollback(load_params(params)))))


@serve_app.command("stop")
def serve_stop(params: ParamsOpt = DEFAULT_PARAMS) -> None:
    """Stop the served app and the local Ray cluster that deploy started."""
    from serving import control

    _exit(guarded(lambda: control.stop(load_params(params))))


@data_app.command("push")
def data_push(path: Annotated[Path | None, typer.Argument(help="file or folder to track first (dvc add)")] = None,
              remote: RemoteOpt = None) -> None:
    """Track PATH with DVC (when given), push its data (else all tracked data) to the remote; print its hash."""
    from tuneline import dvc_data

    def push() -> None:
        digest = dvc_data.push(path, remote=remote)
        typer.echo(f"pushed {path or 'all tracked data'}: {digest}")
        from flows.events import DATA_UPDATED, emit_data_updated

        sent_to = emit_data_updated(str(path or "."), digest)
        typer.echo(f"event {DATA_UPDATED} sent to {sent_to}" if sent_to else
                   f"event {DATA_UPDATED} not sent: no Prefect server (PREFECT_API_URL, `tuneline prefect up`)")
        if path is not None:
            typer.echo(f"commit it: git add {path}.dvc && git commit")

    _exit(guarded(push))


@data_app.command("pull")
def data_pull(remote: RemoteOpt = None) -> None:
    """Fetch the data of every DVC-tracked output from the remote into the workspace (dvc pull)."""
    from tuneline import dvc_data

    _exit(guarded(lambda: typer.echo(dvc_data.pull(remote=remote) or "pulled")))


@prefect_app.command("up")
def prefect_up(params: ParamsOpt = DEFAULT_PARAMS) -> None:
    """Start a local Prefect server and a process worker here, and register the deployments of prefect.yaml."""
    from flows import local

    def start() -> None:
        _echo(local.up(load_params(params)))
        typer.echo("stop with: tuneline prefect down")

    _exit(guarded(start))


@prefect_app.command("down")
def prefect_down() -> None:
    """Stop the worker and the server that `tuneline prefect up` started in this folder."""
    from flows import local

    _exit(guarded(lambda: typer.echo(", ".join(f"{k}: {'stopped' if v else 'not running'}"
                                               for k, v in local.down().items()))))


@prefect_app.command("deploy")
def prefect_deploy(params: ParamsOpt = DEFAULT_PARAMS) -> None:
    """Register (or update) the deployments of prefect.yaml on PREFECT_API_URL, values from params.yaml."""
    from flows import local

    def deploy() -> None:
        from prefect.settings import PREFECT_API_URL

        from flows.deployments import DEPLOYMENTS

        cfg = load_params(params)
        url = PREFECT_API_URL.value() or local.local_api_url() or local.server_url(cfg)
        local.deploy(cfg, url, Path.cwd())
        typer.echo(f"registered {', '.join(DEPLOYMENTS)} on {url}")

    _exit(guarded(deploy))


@prefect_app.command("status")
def prefect_status(params: ParamsOpt = DEFAULT_PARAMS) -> None:
    """Is the local Prefect server up, and its worker running?"""
    from flows import local

    _exit(guarded(lambda: _echo(local.status(load_params(params)))))


if __name__ == "__main__":
    app()
