"""Serving: the OpenAI-compatible Ray Serve app, the deploy stage and serve control, on a tiny model.

One local Ray cluster for the module, two apps on it: `/main` (no key) for the
API tests, and `/`, put there by the real deploy stage with an API key.
"""

from __future__ import annotations

import os
import subprocess

import httpx
import mlflow
import openai
import pytest
import ray
from ray import serve
from serving_helpers import free_port, save_tiny_model

from serving.app import build_app
from tasks import deploy, serve_control
from tasks.atomic import read_json, write_json
from tasks.config import Params
from tasks.errors import TunelineError
from tasks.formats import render_prompt
from tasks.models import encode_prompt

SERVED = "tiny"
TEMPLATE = "chatml"
MAX_TOKENS = 32
MAX_PROMPT_TOKENS = 64
KEY_ENV = "TUNELINE_TEST_SERVING_KEY"
KEY = "test-secret"
PROMPT = "Which word is a fruit? apple piano"
FINISH_REASONS = {"stop", "length"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("merged"))


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def port():
    # Two apps of one replica each, one CPU apiece.
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield port
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def base_url(port, model_dir):
    serve.run(build_app(str(model_dir), SERVED, TEMPLATE, MAX_TOKENS, MAX_PROMPT_TOKENS),
              name="test-main", route_prefix="/main")
    return f"http://127.0.0.1:{port}/main/v1"


@pytest.fixture(scope="module")
def client(base_url):
    return openai.OpenAI(base_url=base_url, api_key="x", max_retries=0, timeout=60)


def complete(client, **kwargs):
    return client.completions.create(model=SERVED, prompt=PROMPT, **kwargs)


def test_models_lists_the_served_name(client):
    assert [m.id for m in client.models.list()] == [SERVED]


def test_completion_counts_tokens_and_says_why_it_ended(client, tokenizer):
    resp = complete(client, max_tokens=5, temperature=0)
    choice, usage = resp.choices[0], resp.usage
    assert resp.model == SERVED and isinstance(choice.text, str)
    assert choice.finish_reason in FINISH_REASONS
    assert usage.prompt_tokens == len(tokenizer(PROMPT)["input_ids"])
    assert 1 <= usage.completion_tokens <= 5
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    if choice.finish_reason == "length":
        assert usage.completion_tokens == 5
    assert complete(client, max_tokens=5, temperature=0).choices[0].text == choice.text  # greedy


def test_seed_makes_sampling_repeatable(client):
    first, again = (complete(client, max_tokens=MAX_TOKENS, temperature=1.0, seed=7) for _ in range(2))
    assert first.choices[0].text == again.choices[0].text
    assert first.usage.completion_tokens > 1


def test_stop_sequence_cuts_the_text(client):
    full = complete(client, max_tokens=MAX_TOKENS, temperature=1.0, seed=11)
    text = full.choices[0].text
    stop = next((c for c in text[1:] if c.isascii() and c.isalnum()), None)
    assert stop is not None, f"the tiny model wrote no usable stop character: {text!r}"
    cut = complete(client, max_tokens=MAX_TOKENS, temperature=1.0, seed=11, stop=[stop])
    assert cut.choices[0].text == text[:text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    assert cut.usage.completion_tokens <= full.usage.completion_tokens


def test_chat_completion_renders_the_template(client, tokenizer):
    messages = [{"role": "user", "content": PROMPT}]
    resp = client.chat.completions.create(model=SERVED, messages=messages, max_tokens=8, temperature=0)
    message = resp.choices[0].message
    assert message.role == "assistant" and isinstance(message.content, str)
    assert "<|im_end|>" not in message.content  # the template's stop string ends the answer
    assert resp.choices[0].finish_reason in FINISH_REASONS
    prompt_ids = encode_prompt(tokenizer, render_prompt(messages, TEMPLATE, tokenizer), TEMPLATE)
    assert resp.usage.prompt_tokens == len(prompt_ids)
    assert 1 <= resp.usage.completion_tokens <= 8


def test_streaming_completion_matches_the_whole_answer(client):
    whole = complete(client, max_tokens=12, temperature=0).choices[0]
    chunks = list(complete(client, max_tokens=12, temperature=0, stream=True))
    assert len(chunks) >= 2
    assert "".join(c.choices[0].text for c in chunks) == whole.text
    assert [c.choices[0].finish_reason for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert chunks[-1].choices[0].finish_reason == whole.finish_reason


def test_streaming_chat_sends_role_content_and_usage(client):
    messages = [{"role": "user", "content": PROMPT}]
    whole = client.chat.completions.create(model=SERVED, messages=messages, max_tokens=10, temperature=0)
    stream = client.chat.completions.create(model=SERVED, messages=messages, max_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == whole.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens


def test_stream_ends_with_done(base_url):
    body = {"model": SERVED, "prompt": PROMPT, "max_tokens": 4, "stream": True}
    with httpx.stream("POST", f"{base_url}/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"


@pytest.mark.parametrize("path, body, status, param", [
    ("/completions", b'{"prompt": "hi", ', 400, None),
    ("/completions", {"max_tokens": 4}, 400, "prompt"),
    ("/completions", {"prompt": "hi", "max_tokens": "lots"}, 400, "max_tokens"),
    ("/completions", {"prompt": 123}, 400, "prompt"),
    ("/completions", {"prompt": "hi", "max_tokens": MAX_TOKENS + 1}, 400, "max_tokens"),
    ("/completions", {"prompt": "apple " * (MAX_PROMPT_TOKENS + 1)}, 400, "prompt"),
    ("/completions", {"prompt": "hi", "temperature": -1}, 400, "temperature"),
    ("/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages"),
    ("/chat/completions", {"messages": []}, 400, "messages"),
    ("/completions", {"prompt": "hi", "model": "someone-else"}, 404, "model"),
], ids=["malformed-json", "missing-prompt", "max-tokens-type", "prompt-type", "max-tokens-limit",
        "prompt-too-long", "temperature-range", "bad-role", "no-messages", "unknown-model"])
def test_bad_requests_get_openai_errors(base_url, path, body, status, param):
    if isinstance(body, bytes):
        r = httpx.post(base_url + path, content=body, headers={"Content-Type": "application/json"})
    else:
        r = httpx.post(base_url + path, json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    assert error["param"] == param


# The deploy stage, for real: on the module's cluster (it joins the connection this process holds).

@pytest.fixture(scope="module")
def deployed(port, model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    params = Params(
        reports_dir=root / "reports",
        data={"template": TEMPLATE},
        registry={"tracking_uri": f"sqlite:///{root}/mlflow.db", "artifact_location": root / "mlartifacts",
                  "model_name": "tiny-model"},
        serving={"port": port, "app_name": "test-deploy", "api_key_env": KEY_ENV, "health_timeout_s": 90},
    )
    exp_id = deploy.tracking.setup(params)
    with mlflow.start_run(experiment_id=exp_id) as run:
        pass
    registry = mlflow.MlflowClient()
    registry.create_registered_model("tiny-model")
    created = registry.create_model_version("tiny-model", source=str(model_dir), run_id=run.info.run_id)
    version = str(created.version)
    write_json(params.report("train.json"), {"mlflow_run_id": run.info.run_id})
    write_json(params.report("gate.json"), {"decision": "promote", "reasons": ["all checks passed"]})
    merge = {"model_name": "tiny-model", "version": version, "model_dir": str(model_dir),
             "model_uri": f"models:/tiny-model/{version}"}
    write_json(params.report("merge.json"), merge)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(KEY_ENV, KEY)
        result = deploy.run(params)
        yield params, result, version, run.info.run_id


def test_deploy_serves_the_version_and_makes_it_champion(deployed, port):
    params, result, version, run_id = deployed
    endpoint = f"http://127.0.0.1:{port}/v1"
    assert result["version"] == version and result["endpoint"] == endpoint
    assert read_json(params.report("deploy.json")) == {
        "endpoint": endpoint, "model_name": "tiny-model", "version": version, "served_model": "tiny-model",
        "model_uri": f"models:/tiny-model/{version}"}
    registry = mlflow.MlflowClient()
    assert str(registry.get_model_version_by_alias("tiny-model", "champion").version) == version
    assert registry.get_run(run_id).data.tags["deploy.version"] == version


def test_deployed_app_requires_its_api_key(deployed, port):
    url = f"http://127.0.0.1:{port}/v1"
    r = httpx.get(f"{url}/models")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url, api_key="wrong", max_retries=0).models.list()
    keyed = openai.OpenAI(base_url=url, api_key=KEY, max_retries=0, timeout=60)
    resp = keyed.completions.create(model="tiny-model", prompt=PROMPT, max_tokens=3, temperature=0)
    assert resp.usage.completion_tokens >= 1


def test_status_reports_the_deployed_version(deployed):
    params, _, version, _ = deployed
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(KEY_ENV, KEY)
        st = serve_control.status(params)
    assert st["running"] is True
    assert (st["version"], st["served_model"], st["model_name"]) == (version, "tiny-model", "tiny-model")


def test_stop_on_a_named_cluster_removes_only_the_app(deployed, client):
    # Runs after the other deploy tests (file order): it takes the deployed app down.
    params, *_ = deployed
    named = params.model_copy(update={"serving": params.serving.model_copy(
        update={"ray_address": ray.get_runtime_context().gcs_address})})
    assert serve_control.stop(named) == {"stopped": True, "app": "test-deploy", "ray_stopped": False}
    assert serve_control.status(params)["running"] is False
    assert [m.id for m in client.models.list()] == [SERVED]  # the cluster and its other apps live on


def _reject(params: Params) -> None:
    write_json(params.report("gate.json"), {"decision": "reject", "reasons": ["rouge_l 0.1 < 0.5"]})


def test_deploy_skips_a_rejected_candidate_without_touching_ray(tmp_path, monkeypatch):
    def no_ray(*args, **kwargs):
        raise AssertionError("a rejected deploy must not start or join Ray")

    monkeypatch.setattr(ray, "init", no_ray)
    monkeypatch.setattr(subprocess, "run", no_ray)
    params = Params(reports_dir=tmp_path)
    champion = {"endpoint": "http://127.0.0.1:8000/v1", "model_name": "m", "version": "3"}
    write_json(params.report("deploy.json"), champion)
    _reject(params)
    assert deploy.run(params) == {"skipped": True}
    report = read_json(params.report("deploy.json"))
    assert report["skipped"] is True and "reject" in report["reason"] and "rouge_l" in report["reason"]
    assert report["current"] == champion  # the champion keeps serving, and status can still say so


def test_deploy_without_a_gate_report_names_the_stage_to_run(tmp_path):
    with pytest.raises(TunelineError, match="gate.json.*run the gate stage"):
        deploy.run(Params(reports_dir=tmp_path))
    assert not os.path.exists(tmp_path / "deploy.json")
