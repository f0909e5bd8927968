"""Serving under stress: a soak, fuzzed request bodies, the body size limit, a model replica killed under
load, and secrets that reach no log, report or MLflow run.

One local Ray cluster for the module and one application on it (`/rel`: a key, two model replicas,
a small body limit), started with secrets in its environment as a shell with exported credentials
would. The replica-kill test perturbs the app and the secrets test reads every log the module made:
they come last, in that order. API-key auth itself (401 without, 200 with) is tested in
tests/test_serving.py on the app the deploy stage puts up; here every request sends the key.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import secrets
import signal
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
import ray
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ray import serve
from support.models import save_tiny_model
from support.project import REPO, tiny_params
from support.services import free_port

from serving.api import ChatRequest, CompletionRequest
from serving.builders import build_app
from serving.model_server import MODEL_DEPLOYMENT
from serving.router import RETRIED, ROUTER_DEPLOYMENT
from tasks import run_stage
from tuneline.atomic import read_json
from tuneline.config import Serving

sys.path.insert(0, str(REPO / "bench"))
import soak  # noqa: E402 - bench/soak.py: the same soak runs standalone

SERVED, TEMPLATE, APP, ROUTE = "tiny", "chatml", "reliability", "/rel"
MAX_TOKENS, MAX_PROMPT_TOKENS = 128, 64  # long enough that a killed replica dies mid-generation
REPLICAS = 2
BODY_LIMIT = 16 * 1024  # serving.max_request_bytes of the app: small, so the refused bodies are small too
KEY_ENV = "TUNELINE_RELIABILITY_KEY"
# Fresh values each run, so that a hit in a log can only come from this run.
SECRETS = {KEY_ENV: f"rel-key-{secrets.token_hex(12)}",
           "AWS_SECRET_ACCESS_KEY": f"aws-secret-{secrets.token_hex(12)}",
           "MLFLOW_TRACKING_PASSWORD": f"mlflow-pass-{secrets.token_hex(12)}"}
KEY = SECRETS[KEY_ENV]
SOAK_CLIENTS, SOAK_REQUESTS, SOAK_MAX_TOKENS = 64, 64 * 32, 4
FUZZ_EXAMPLES = 150
KILL_CLIENTS, AFTER_RECOVERY = 16, 32
RECOVERY_TIMEOUT_S = 180


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    model_dir = save_tiny_model(tmp_path_factory.mktemp("model"))
    with pytest.MonkeyPatch.context() as mp:  # the cluster inherits them, as from a shell that exported them
        for name, value in {**SECRETS, "AWS_ACCESS_KEY_ID": "tuneline-test"}.items():
            mp.setenv(name, value)
        ray.init(address="local", num_cpus=REPLICAS + 2, include_dashboard=False, log_to_driver=False)
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serving = Serving(max_tokens_limit=MAX_TOKENS, max_prompt_tokens=MAX_PROMPT_TOKENS, api_key_env=KEY_ENV,
                          max_request_bytes=BODY_LIMIT, min_replicas=REPLICAS, max_replicas=REPLICAS)
        serve.run(build_app(str(model_dir), SERVED, TEMPLATE, serving), name=APP, route_prefix=ROUTE)
        try:
            yield f"http://127.0.0.1:{port}{ROUTE}/v1"
        finally:
            serve.shutdown()
            ray.shutdown()


@pytest.fixture(scope="module")
def http(served):
    with httpx.Client(base_url=served, headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as client:
        yield client


def assert_openai_error(r: httpx.Response) -> dict:
    error = r.json()["error"]
    assert isinstance(error["message"], str) and error["message"], r.text
    assert error["type"] == ("invalid_request_error" if r.status_code < 500 else "server_error"), r.text
    assert all(error[k] is None or isinstance(error[k], str) for k in ("param", "code")), r.text
    return error


# --- soak ---------------------------------------------------------------------------------------------------

def test_soak_answers_every_request_well_formed(served, tmp_path):
    figures = asyncio.run(soak.soak(served, SOAK_CLIENTS, SOAK_REQUESTS, SOAK_MAX_TOKENS, KEY, SERVED))
    (tmp_path / "soak.json").write_text(json.dumps(figures, indent=2))
    print(f"\n{soak.report(figures)}\n(figures in {tmp_path / 'soak.json'})")
    assert figures["requests"] == SOAK_REQUESTS
    assert figures["errors"] == 0, figures["first_errors"]


# --- fuzz ---------------------------------------------------------------------------------------------------

EDGE_NUMBERS = [0, -1, 1, 2**31, 2**63, 2**64, -(2**63) - 1, 10**30, -(10**30), math.nan, math.inf, -math.inf,
                1e308, -0.0, 0.5, 2.0000001, 1e-320]
ANY_TEXT = st.text(st.characters(exclude_categories=()), max_size=30)  # surrogates and control characters too
SCALARS = (st.none() | st.booleans() | st.integers() | st.floats() | ANY_TEXT | st.sampled_from(EDGE_NUMBERS)
           | st.sampled_from(["", "\x00", "\ud800", "🍎" * 8, "NaN", "1e999"]))
JUNK = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(ANY_TEXT, inner, max_size=4), max_leaves=12)
GOOD_PROMPT = st.sampled_from(soak.PROMPTS)
PROMPT = GOOD_PROMPT | ANY_TEXT
ROLES = st.sampled_from(["system", "user", "assistant", "robot", "", "USER"])
MESSAGE = st.fixed_dictionaries({}, optional={"role": ROLES | JUNK, "content": PROMPT | JUNK})
# Per field: a valid value, and a plausible one (valid or near the edge); fields without either get junk.
VALID = {
    "model": st.just(SERVED), "max_tokens": st.integers(1, 8), "max_completion_tokens": st.integers(1, 8),
    "temperature": st.floats(0, 2), "top_p": st.floats(0.01, 1), "seed": st.integers(0, 2**32),
    "stop": st.text(min_size=1, max_size=4) | st.lists(st.text(min_size=1, max_size=4), max_size=2),
    "stream": st.booleans(), "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "ignore_eos": st.booleans(), "prompt": GOOD_PROMPT | GOOD_PROMPT.map(lambda p: [p]),
    "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]),
                                                "content": PROMPT}), min_size=1, max_size=3),
}
LIMITS = st.integers(-2, 8) | st.sampled_from([MAX_TOKENS - 1, MAX_TOKENS, MAX_TOKENS + 1, 2**63])
PLAUSIBLE = {**VALID,
    "model": st.sampled_from([SERVED, "someone-else", ""]),
    "max_tokens": LIMITS, "max_completion_tokens": LIMITS,
    "temperature": st.floats(-1, 3), "top_p": st.floats(-0.5, 1.5), "n": st.integers(-1, 3),
    "stop": ANY_TEXT | st.lists(ANY_TEXT, max_size=3), "seed": st.integers(),
    "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans() | JUNK}),
    "prompt": PROMPT | st.lists(PROMPT, max_size=2),
    "messages": st.lists(MESSAGE, max_size=3),
}


def bodies(model) -> st.SearchStrategy:
    """JSON bodies for one request model: a valid body with a few fields made plausible or junk (or
    none), or every field plausible or junk with extra keys beside, or now and then not an object."""
    names = list(model.model_fields)
    required = {n: VALID[n] for n, f in model.model_fields.items() if f.is_required()}
    valid = st.fixed_dictionaries(required, optional={n: VALID[n] for n in names if n in VALID and n not in required})
    change = st.sampled_from(names).flatmap(lambda n: st.tuples(st.just(n), PLAUSIBLE.get(n, JUNK) | JUNK))
    mutations = st.lists(change | st.tuples(ANY_TEXT, JUNK), max_size=2).map(dict)
    fields = {n: PLAUSIBLE.get(n, JUNK) | JUNK for n in names}
    anything = st.builds(lambda extra, known: {**extra, **known}, st.dictionaries(ANY_TEXT, JUNK, max_size=2),
                         st.fixed_dictionaries({}, optional=fields))
    mutated = st.builds(lambda body, changes: {**body, **changes}, valid, mutations)
    return st.one_of(valid, mutated, mutated, anything, JUNK)


def raw_bytes() -> st.SearchStrategy:
    """Bodies that are not JSON, or not quite: random bytes, truncated JSON, other encodings, deep nesting."""
    truncated = st.builds(lambda body, cut: json.dumps(body).encode()[:cut], bodies(CompletionRequest),
                          st.integers(0, 200))
    encoded = st.builds(lambda body, codec: json.dumps(body, ensure_ascii=False).encode(
        codec, "surrogatepass" if codec.startswith("utf") else "replace"),
        bodies(ChatRequest), st.sampled_from(["utf-8", "utf-16", "utf-32", "latin-1", "utf-8-sig"]))
    nested = st.integers(100, 5000).map(lambda depth: b'{"prompt": ' + b"[" * depth + b"]" * depth + b"}")
    return st.one_of(st.binary(max_size=300), truncated, encoded, nested)


CONTENT_TYPES = ["application/json", "text/plain", "application/x-www-form-urlencoded", "multipart/form-data",
                 "application/json; charset=latin-1"]


def check_answer(r: httpx.Response, chat: bool, statuses: Counter) -> None:
    """No 5xx; a 4xx with an OpenAI error body; a 200 well-formed (a stream ends with [DONE])."""
    statuses[r.status_code] += 1
    assert r.status_code < 500, r.text
    if r.status_code >= 400:
        assert_openai_error(r)
    elif r.headers["content-type"].startswith("text/event-stream"):
        events = [line for line in r.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]" and '"error"' not in r.text, r.text
    else:
        assert soak.problem(r.json(), chat, MAX_TOKENS) is None, r.text


FUZZ = settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.mark.parametrize("path, model", [("/completions", CompletionRequest), ("/chat/completions", ChatRequest)],
                         ids=["completions", "chat"])
def test_fuzzed_bodies_never_get_a_5xx(http, path, model):
    statuses: Counter = Counter()

    @FUZZ
    @given(body=bodies(model))
    def one(body):
        content = json.dumps(body)  # NaN and Infinity as Python writes them: a lenient parser's input
        check_answer(http.post(path, content=content, headers={"Content-Type": "application/json"}),
                     path == "/chat/completions", statuses)

    one()
    print(f"\nfuzz {path}: {sum(statuses.values())} bodies, statuses {dict(sorted(statuses.items()))}")
    assert statuses[200] and sum(n for s, n in statuses.items() if 400 <= s < 500), statuses  # both kinds reached


def test_fuzzed_raw_bytes_never_get_a_5xx(http):
    statuses: Counter = Counter()

    @FUZZ
    @given(body=raw_bytes(), content_type=st.sampled_from(CONTENT_TYPES) | st.none())
    def one(body, content_type):
        headers = {"Content-Type": content_type} if content_type else {}
        check_answer(http.post("/completions", content=body, headers=headers), False, statuses)

    one()
    print(f"\nfuzz raw bytes: {sum(statuses.values())} bodies, statuses {dict(sorted(statuses.items()))}")
    assert statuses[400], statuses


# --- body size limit ----------------------------------------------------------------------------------------

def test_a_body_over_the_limit_gets_413_before_parsing(http):
    big = json.dumps({"prompt": "apple " * (BODY_LIMIT // 6 + 10)}).encode()
    assert len(big) > BODY_LIMIT
    declared = http.post("/completions", content=big, headers={"Content-Type": "application/json"})

    def chunks():  # no Content-Length: the router must count what arrives
        for i in range(0, len(big), 4096):
            yield big[i:i + 4096]

    chunked = http.post("/chat/completions", content=chunks(), headers={"Content-Type": "application/json"})
    junk = http.post("/completions", content=b"\xff" * (BODY_LIMIT + 1))  # not even JSON: still 413, not 400
    for r in (declared, chunked, junk):
        assert r.status_code == 413, r.text
        error = assert_openai_error(r)
        assert error["code"] == "request_too_large" and str(BODY_LIMIT) in error["message"], error
    # Just under the limit it is parsed and judged on its content: a prompt over max_prompt_tokens.
    under = json.dumps({"prompt": "apple " * ((BODY_LIMIT - 100) // 6)}).encode()
    assert len(under) <= BODY_LIMIT
    r = http.post("/completions", content=under, headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and assert_openai_error(r)["param"] == "prompt", r.text


# --- a model replica killed under load ---------------------------------------------------------------------

def model_replicas() -> set[str]:
    """The named actors of the app's model replicas (Serve names them SERVE_REPLICA::app#deployment#id)."""
    prefix = f"SERVE_REPLICA::{APP}#{MODEL_DEPLOYMENT}#"
    return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)}


def kill_a_busy_replica() -> tuple[str, int]:
    """SIGKILL the process of the model replica with the most requests on it, as the OOM killer or a lost node
    would; returns its name and how many requests it held. A replica that held none would test nothing, so
    this waits until one holds some (Serve's own queue-length probe says how many)."""
    deadline = time.monotonic() + 30
    while True:
        actors = {name: ray.get_actor(name, namespace="serve") for name in model_replicas()}
        ongoing = {name: ray.get(actor.get_num_ongoing_requests.remote()) for name, actor in actors.items()}
        name = max(ongoing, key=ongoing.get)
        if ongoing[name] > 0 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    pid = ray.get(actors[name].__ray_call__.remote(lambda _: os.getpid()))
    os.kill(pid, signal.SIGKILL)
    return name, ongoing[name]


def wait_replaced(killed: str) -> dict:
    """Until Serve runs REPLICAS model replicas again, the killed one not among them; the replica states."""
    deadline, states, names = time.monotonic() + RECOVERY_TIMEOUT_S, {}, set()
    while time.monotonic() < deadline:
        deployment = serve.status().applications[APP].deployments[MODEL_DEPLOYMENT]
        states = {state: n for state, n in deployment.replica_states.items() if n}
        names = model_replicas()
        if states == {"RUNNING": REPLICAS} and len(names) == REPLICAS and killed not in names:
            return states
        time.sleep(0.5)
    raise AssertionError(f"Serve did not replace {killed} within {RECOVERY_TIMEOUT_S}s: {states}, {names}")


def router_retries() -> int:
    logs = Path(ray._private.worker._global_node.get_logs_dir_path()) / "serve"
    return sum(f.read_text(errors="replace").count(RETRIED) for f in logs.glob(f"replica_{APP}_{ROUTER_DEPLOYMENT}_*"))


async def kill_under_load(url: str) -> dict:
    outcomes: list[str | None] = []  # None: a good answer, else what was wrong
    started = 0
    stop = asyncio.Event()
    async with soak.client(url, KEY, KILL_CLIENTS) as http:
        ask = soak.Asker(http, MAX_TOKENS, SERVED)

        async def loop(c: int) -> None:
            nonlocal started
            i = c
            while not stop.is_set():
                started += 1
                outcomes.append((await ask(i))[1])
                i += KILL_CLIENTS

        clients = asyncio.gather(*(loop(c) for c in range(KILL_CLIENTS)))
        while len(outcomes) < 2 * KILL_CLIENTS:  # the load is on
            await asyncio.sleep(0.05)
        killed, on_killed = await asyncio.to_thread(kill_a_busy_replica)
        in_flight = started - len(outcomes)
        states = await asyncio.to_thread(wait_replaced, killed)
        during = len(outcomes)
        stop.set()
        await clients
        after = [wrong for _, wrong in await asyncio.gather(*(ask(i) for i in range(AFTER_RECOVERY)))]
    return {"killed": killed, "in_flight_at_kill": in_flight, "on_killed_replica": on_killed,
            "answered_until_recovered": during, "states": states,
            "sent": len(outcomes) + len(after), "failed": [w for w in outcomes + after if w],
            "failed_after_recovery": [w for w in after if w]}


def test_a_killed_model_replica_is_replaced_and_no_request_fails(served):
    # The bound: zero. A request on the killed replica fails there with RayActorError, and the router sends
    # it once more to the replica that lives (Serve's handle drops the dead one), so no client sees it.
    retries_before = router_retries()
    result = asyncio.run(kill_under_load(served))
    retried = router_retries() - retries_before
    print(f"\nreplica kill: {result['sent']} requests sent, {len(result['failed'])} failed; "
          f"{result['in_flight_at_kill']} in flight at the kill, {result['on_killed_replica']} on the killed "
          f"replica, {retried} retried by the router; replicas after: {result['states']}")
    assert result["on_killed_replica"] > 0  # the kill came under load, on requests
    assert result["failed"] == [], result["failed"][:5]
    assert retried >= 1  # requests did die with the replica, and the retry saved them
    assert result["failed_after_recovery"] == []


# --- secrets ------------------------------------------------------------------------------------------------

def files_holding(root: Path, values: list[str]) -> dict[str, list[str]]:
    """Every regular file under root whose bytes hold one of `values`: file -> the values found."""
    hits = {}
    for f in root.rglob("*"):
        if f.is_file() and not f.is_symlink():
            data = f.read_bytes()
            found = [v for v in values if v.encode() in data]
            if found:
                hits[str(f)] = found
    return hits


def test_secrets_reach_no_log_report_or_mlflow_run(served, http, tmp_path, capfd, caplog):
    from mlflow import MlflowClient

    caplog.set_level(logging.DEBUG)
    assert all(os.environ[name] == value for name, value in SECRETS.items())  # the fixture exported them
    params = tiny_params(tmp_path, serving__api_key_env=KEY_ENV, bootstrap__pretrain_steps=10,
                         bootstrap__train_records=32, bootstrap__eval_records=8)
    for stage in ("bootstrap", "validate", "tokenize", "train"):
        run_stage(stage, params)
    assert http.post("/completions", json={"prompt": "apple", "max_tokens": 2}).status_code == 200  # the key works
    values = list(SECRETS.values())

    captured = capfd.readouterr()
    logged = caplog.text + captured.out + captured.err
    assert "train" in logged and not [v for v in values if v in logged]

    run = MlflowClient(params.registry.tracking_uri).get_run(read_json(params.report("train.json"))["mlflow_run_id"])
    assert run.data.params and run.data.tags
    recorded = json.dumps([run.data.params, run.data.tags])
    assert not [v for v in values if v in recorded]
    # The project folder: reports, data, models, mlflow.db (every param, tag and metric), mlartifacts.
    assert params.report("train.json").exists() and files_holding(tmp_path, values) == {}

    session = Path(ray._private.worker._global_node.get_session_dir_path())
    router_logs = list((session / "logs" / "serve").glob(f"replica_{APP}_{ROUTER_DEPLOYMENT}_*"))
    assert any(f"{ROUTE}/v1/completions" in f.read_text(errors="replace") for f in router_logs)  # the right logs
    assert files_holding(session, values) == {}
