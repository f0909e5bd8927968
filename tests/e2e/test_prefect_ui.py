"""The Prefect UI as a person sees it, in headless chromium: the run form of `finetune/finetune-on-demand`
and a run that the gate rejected.

A real Prefect server with its UI on a free loopback port, the deployments of prefect.yaml registered from a
tiny project (`tuneline prefect deploy`'s code), and one in-process pipeline run whose gate cannot pass
(gate.min_rouge_l 1.0). Screenshots go to tests/artifacts/ (each test prints the path).
"""

from __future__ import annotations

import re
import uuid

import pytest
import yaml
from support.browser import browser_page, screenshot
from support.prefect_server import prefect_server
from support.project import tiny_params
from support.services import free_port

from flows import local
from flows.deployments import FINETUNE_ON_DEMAND
from flows.parameters import FINETUNE_KNOBS, KNOBS


@pytest.fixture(scope="module")
def prefect_ui(tmp_path_factory):
    """(UI base URL, project params, project folder), the deployments registered from the project."""
    root = tmp_path_factory.mktemp("prefect-ui") / "project"
    root.mkdir()
    params = tiny_params(root, gate__min_rouge_l=1.0, train__seed=4242, train__learning_rate=0.0075,
                         orchestration__work_pool=f"tuneline-ui-{uuid.uuid4().hex[:6]}",
                         orchestration__results_dir=str(root / ".prefect-results"))
    (root / "params.yaml").write_text(yaml.safe_dump(params.model_dump(mode="json", by_alias=True), sort_keys=False))
    with prefect_server(root.parent, free_port(), ui=True) as api:
        local.deploy(params, api, root)
        yield api.removesuffix("/api"), params, root


def _field(page, name: str):
    """A top-level field of the run form, by its label (`name (Optional)`)."""
    label = page.locator(".schema-form-property__label", has_text=re.compile(rf"^{name} \(Optional\)$"))
    return page.locator(".schema-form-property", has=label).first


@pytest.mark.slow
def test_run_form_shows_the_tuned_knobs_with_params_yaml_values(prefect_ui):
    from prefect.client.orchestration import get_client

    ui, params, _ = prefect_ui
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name(FINETUNE_ON_DEMAND)
    tree = params.model_dump(mode="json", by_alias=True)
    with browser_page(height=2600) as page:
        page.goto(f"{ui}/deployments/deployment/{deployment.id}/run")
        page.get_by_text("learning_rate (Optional)").wait_for()
        print(f"screenshot: {screenshot(page, 'prefect-finetune-on-demand-run-form')}")
        labels = page.locator(".schema-form-property__label").all_inner_texts()
        assert [label.removesuffix(" (Optional)") for label in labels] == [*FINETUNE_KNOBS, "refresh", "sets",
                                                                             "overrides"]
        assert page.get_by_text('Property is type "None"').count() == 0  # no None toggle to click first
        for name in FINETUNE_KNOBS:
            section, key = KNOBS[name][0].split(".")
            field = _field(page, name)
            assert f"(params.yaml: {section}.{key})" in field.locator(".schema-form-property__description").inner_text()
            control = field.locator("input, textarea")
            shown = control.first.input_value() if control.count() else field.locator(".p-label__body").inner_text()
            expected = tree[section][key]
            if isinstance(expected, bool):
                assert control.first.is_checked() is expected, name
            elif isinstance(expected, int | float):
                assert float(shown) == expected, (name, shown)
            else:
                assert shown.strip() == expected, (name, shown)


@pytest.mark.slow
def test_a_rejected_run_says_so_and_its_report_comes_first(prefect_ui):
    from flows.finetune import finetune_from_params

    ui, params, root = prefect_ui
    state = finetune_from_params(params_path=str(root / "params.yaml"), return_state=True)
    assert state.name == "Rejected", state.message
    run_id = state.state_details.flow_run_id
    with browser_page() as page:
        page.goto(f"{ui}/runs/flow-run/{run_id}")
        page.get_by_text("Rejected", exact=True).first.wait_for()  # the state badge
        print(f"screenshot: {screenshot(page, 'prefect-rejected-run')}")

        page.locator("li.p-tab", has_text="Artifacts").click()
        page.get_by_text("finetune-tuneline-default").first.click()
        page.get_by_text("Gate: reject").first.wait_for()  # the report, rendered
        assert page.get_by_text(re.compile(r": rejected$")).count() >= 1  # its title says the outcome
        print(f"screenshot: {screenshot(page, 'prefect-rejected-run-report')}")
        assert page.get_by_text("gate.min_rouge_l").count() >= 1  # the gate's reason
