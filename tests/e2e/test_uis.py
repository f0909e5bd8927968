"""What a person sees in the UIs, in a real headless chromium against the real servers on loopback.

Screenshots of every page a test opens are kept in tests/artifacts/ (git ignores it); each test prints where.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest
from support.browser import browser_page, screenshot
from support.project import tiny_params
from support.services import Service, free_port, wait_http

from tasks import run_stage
from tuneline import registry, run_view, tracking
from tuneline.atomic import read_json

# --- MLflow UI


@pytest.fixture(scope="module")
def mlflow_ui(tiny_run, tmp_path_factory):
    """`mlflow ui` on the tiny project's store, which then holds two pipeline runs: the tiny run (promoted v1)
    and a re-evaluation of its candidate against a gate it cannot pass (rejected). Yields the UI's URL, the
    experiment id, and the two runs."""
    params, _ = tiny_run
    tmp = tmp_path_factory.mktemp("mlflow-ui")
    promoted = read_json(params.report("train.json"))["mlflow_run_id"]
    # Its own reports folder: the tiny project's reports stay as the tests of its stages expect them.
    strict = tiny_params(Path(params.data.root), reports_dir=str(tmp / "reports"), gate__min_rouge_l=1.0)
    rejected = tracking.open_pipeline_run(strict, run_view.run_name(strict))
    for name in ("evaluate", "gate", "merge"):
        run_stage(name, strict.in_mlflow_run(rejected))
    tracking.close_pipeline_run(strict, rejected, ok=True)

    port = free_port()
    cmd = [str(Path(sys.executable).parent / "mlflow"), "ui", "--backend-store-uri", params.registry.tracking_uri,
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    log = tmp / "mlflow-ui.log"
    ui = Service("mlflow-ui", cmd, log, env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/health", ui.proc, log)
        client = registry.client(params)
        experiment = client.get_run(promoted).info.experiment_id
        # The store also holds the runs of other tests that trained on the tiny project (the suite shares it).
        runs = len(client.search_runs([experiment]))
        yield url, experiment, client.get_run(promoted), client.get_run(rejected), runs
    finally:
        ui.stop()


def _ml(url: str) -> str:
    """A UI address in model-training mode (MLflow 3.17's UI opens in GenAI mode unless told; see README)."""
    return f"{url}?workflowType=machine_learning"


def _data(run) -> tuple[str, str]:
    """How the UI names the run's train and eval datasets: file (DVC md5)."""
    return tuple(f"{Path(p).name} ({tracking.file_md5(p)})" for p in (run.data.params["data.train_path"],
                                                                      run.data.params["data.eval_path"]))


def test_mlflow_run_list_shows_distinct_names_outcomes_and_datasets(mlflow_ui):
    from playwright.sync_api import expect

    url, experiment, promoted, rejected, runs = mlflow_ui
    names = [promoted.info.run_name, rejected.info.run_name]
    assert names[0] != names[1]
    outcome = rejected.data.tags["tuneline.outcome"]
    assert outcome.startswith("rejected: rouge_l ") and outcome.endswith(", needs >= 1.0 (gate.min_rouge_l)")
    train, evals = _data(promoted)
    with browser_page(1800, 900) as page:
        page.goto(_ml(f"{url}/#/experiments/{experiment}"))
        expect(page.get_by_text(f"{runs} matching runs")).to_be_visible()
        expect(page.get_by_role("link", name="Model registry")).to_be_visible()  # model-training mode's sidebar
        for name in names:
            expect(page.get_by_text(name, exact=True).first).to_be_visible()
        expect(page.get_by_text(train, exact=True).first).to_be_visible()  # the "Dataset" column
        expect(page.get_by_text(evals, exact=True).first).to_be_visible()
        # What a person does to read the list: close the assistant, widen "Run Name" (at first it shows about 22
        # characters), and turn the description column on (Columns > Description): it holds the outcome.
        page.get_by_role("button", name="Close").click()
        header = page.get_by_role("columnheader", name="Run Name").first.bounding_box()
        page.mouse.move(header["x"] + header["width"] - 2, header["y"] + header["height"] / 2)
        page.mouse.down()
        page.mouse.move(header["x"] + header["width"] + 150, header["y"] + header["height"] / 2, steps=5)
        page.mouse.up()
        page.get_by_role("button", name="Columns", exact=True).click()
        page.get_by_text("Description", exact=True).click()
        page.keyboard.press("Escape")
        expect(page.get_by_text(re.compile(r"^promoted v1\b")).first).to_be_visible()
        expect(page.get_by_text(re.compile(r"^rejected: rouge_l ")).first).to_be_visible()
        print(f"screenshot: {screenshot(page, 'mlflow-run-list')}")


def test_mlflow_run_page_shows_outcome_datasets_and_the_eval_table(mlflow_ui):
    from playwright.sync_api import expect

    url, experiment, promoted, _, _ = mlflow_ui
    train, evals = _data(promoted)
    run_page = f"{url}/#/experiments/{experiment}/runs/{promoted.info.run_id}"
    with browser_page(1800, 1000) as page:
        page.goto(_ml(run_page))
        page.get_by_role("button", name="Close").click()  # the assistant
        expect(page.get_by_role("heading", name=promoted.info.run_name)).to_be_visible()
        expect(page.get_by_text("registered as models:/tuneline-default/1")).to_be_visible()  # the description
        expect(page.get_by_text(train, exact=True)).to_be_visible()  # "Datasets"
        page.get_by_text("+1", exact=True).click()  # the second dataset is behind "+1"
        expect(page.get_by_text(evals, exact=True)).to_be_visible()
        print(f"screenshot: {screenshot(page, 'mlflow-run-page')}")

        page.goto(_ml(f"{run_page}/artifacts"))
        page.get_by_text("reports", exact=True).click()
        for name in ("eval.json", "gate.json", "train.json", "train_log.csv", "eval_samples.json"):
            expect(page.get_by_text(name, exact=True)).to_be_visible()
        page.get_by_text("eval_table.json", exact=True).click()
        expect(page.get_by_text("View as table")).to_be_visible()
        headers = page.get_by_role("columnheader").get_by_role("button", name=re.compile("^(?!Resize)"))
        expect(headers).to_have_text(["metric", "candidate", "base", "champion"])
        for metric in ("perplexity", "rouge_l", "exact_match"):  # one row each: the models side by side
            expect(page.get_by_role("row", name=re.compile(rf"^{metric} \S+ \S+ no champion yet$"))).to_be_visible()
        print(f"screenshot: {screenshot(page, 'mlflow-eval-table')}")
