"""Serving: the OpenAI-compatible Ray Serve app, batching, metrics, the deploy stage's zero-downtime
promotion and rollback, and serve control, on tiny models.

One local Ray cluster for the module, two applications on it: `/main` (no key; built by the
application builder of serving/serve_config.yaml) for the API tests, and `/`, put there by the
real deploy stage with an API key, which then promotes v2 under load, rolls a broken v3 back,
`tuneline serve rollback` returns to v1, deploy survives a kill, and `tuneline promote 1` picks v1
by hand. The deploy tests run in file order.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import ray
import torch
import yaml
from ray import serve
from support.models import save_tiny_model
from support.project import REPO
from support.services import free_port
from torch._dynamo.utils import counters

from serving import control
from serving.api import VERSION_HEADER
from serving.builders import AppArgs, app_builder
from serving.generation import Engine
from serving.model_source import resolve_model
from tasks import deploy
from tuneline import tracking
from tuneline.atomic import read_json, write_json
from tuneline.config import Params
from tuneline.errors import TunelineError
from tuneline.formats import render_prompt
from tuneline.models import encode_prompt

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # MLflow's transformers flavor asks the hub about local models

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
    # A cluster of its own, even beside a deployed one on this machine. Four logical CPUs on two cores:
    # the main app's model, and during a promotion two versions side by side (routers take none).
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield port
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def base_url(port, model_dir):
    # The application builder and the args of serving/serve_config.yaml, on the tiny model.
    config = yaml.safe_load((REPO / "serving" / "serve_config.yaml").read_text())
    (app_cfg,) = config["applications"]
    assert app_cfg["import_path"] == "serving.builders:app_builder"
    args = AppArgs.model_validate({**app_cfg["args"], "model": str(model_dir), "tracking_uri": None,
                                   "served_name": SERVED, "template": TEMPLATE, "max_tokens_limit": MAX_TOKENS,
                                   "max_prompt_tokens": MAX_PROMPT_TOKENS, "max_replicas": 1})
    serve.run(app_builder(args), name="test-main", route_prefix="/main")
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


def test_a_refused_stream_gets_a_4xx_not_a_broken_stream(base_url):
    body = {"prompt": "apple " * (MAX_PROMPT_TOKENS + 1), "stream": True}
    r = httpx.post(f"{base_url}/completions", json=body, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"


def test_concurrent_requests_all_succeed_and_share_batches(client, base_url):
    def ask(i: int):
        return client.completions.create(model=SERVED, prompt=f"{PROMPT} {i}", max_tokens=4 + i % 5,
                                         temperature=0 if i % 2 else 0.8, seed=i)

    before = httpx.get(f"{base_url}/metrics", timeout=30).json()
    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(ask, range(32)))
    assert all(1 <= a.usage.completion_tokens <= 4 + i % 5 for i, a in enumerate(answers))  # per-request max_tokens
    after = httpx.get(f"{base_url}/metrics", timeout=30).json()
    assert after["requests_by_status"]["2xx"] - before["requests_by_status"].get("2xx", 0) == 32
    assert after["batch_size"]["max"] > 1, after["batch_size"]  # requests rode together in a batch
    assert after["model"]["max_batch_size"] == 8 and after["model"]["device"] == "cpu"
    assert after["ttft_s"]["p50"] is not None and after["tokens_per_s"] > 0


def test_batched_generation_matches_generation_one_at_a_time(model_dir):
    # In-process, no Ray: batch mates, per-row max_tokens, stops and seeds change nothing about a row.
    engine = Engine(str(model_dir), TEMPLATE, MAX_TOKENS, MAX_PROMPT_TOKENS, threads=1, max_batch_size=4)
    specs = [{"kind": "completion", "prompt": p, "max_tokens": m, "temperature": t, "top_p": tp, "seed": seed,
              "stop": stop}
             for p, m, t, tp, seed, stop in [(PROMPT, 12, 0.0, 1.0, None, []), ("hi", 5, 1.0, 1.0, 3, []),
                                            ("List every animal: tiger apple otter", 20, 1.0, 0.9, 7, ["e"]),
                                            ("Count", 9, 0.0, 1.0, None, [])]]
    batch = engine.generate([engine.prepare(s) for s in specs])
    alone = [engine.generate([engine.prepare(s)])[0] for s in specs]
    assert max(r["batch_size"] for r in batch) > 1  # they ran together
    for b, a, spec in zip(batch, alone, specs, strict=True):
        assert (b["text"], b["finish_reason"], b["completion_tokens"]) == \
            (a["text"], a["finish_reason"], a["completion_tokens"])
        assert b["completion_tokens"] <= spec["max_tokens"]
    pieces: list[str] = []
    streamed = engine.stream(engine.prepare(specs[2]), pieces.append)
    assert "".join(pieces) == streamed["text"] == alone[2]["text"] and "e" not in streamed["text"]


def _run(engine: Engine, spec: dict, emit=None) -> tuple[threading.Event, list]:
    """Submit a request to an in-process engine: an event set when it ends, and a box for (result, error)."""
    ended, box = threading.Event(), []
    engine.submit(engine.prepare(spec), lambda result, error: (box.append((result, error)), ended.set()), emit)
    return ended, box


@pytest.fixture(scope="module")
def sharp_model_dir(tmp_path_factory, tokenizer):
    """A random Llama whose weights are large enough that every attended key moves its logits (a model at the
    usual init barely looks at its keys), with grouped-query heads: a wrong mask or position shows in its text."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         initializer_range=0.5, eos_token_id=tokenizer.eos_token_id)
    path = tmp_path_factory.mktemp("sharp")
    LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_steps_padded_to_graph_buckets_give_each_request_its_text_alone(sharp_model_dir, compile):
    # A GPU replays decode graphs, of a torch.compile'd step, captured for bucketed sizes: idle rows, and masked
    # positions past each row's own. Here the same bucketing runs without graphs, the step plain or compiled
    # (Inductor's CPU code): batched so, each request gets the text it gets alone.
    specs = [{"kind": "completion", "prompt": p, "max_tokens": m, "temperature": t, "seed": 5, "ignore_eos": True}
             for p, m, t in [(PROMPT, 20, 0.0), ("hi", 7, 1.0), ("List every animal: tiger apple otter", 13, 0.0)]]
    exact = Engine(str(sharp_model_dir), TEMPLATE, MAX_TOKENS, MAX_PROMPT_TOKENS, threads=1, graphs=False)
    alone = [(r["text"], r["completion_tokens"]) for s in specs for r in exact.generate([exact.prepare(s)])]
    exact.close()
    compiled = counters["stats"]["unique_graphs"]
    padded = Engine(str(sharp_model_dir), TEMPLATE, MAX_TOKENS, 256 - MAX_TOKENS, threads=1, max_batch_size=8,
                    graphs=True, compile=compile)  # rows of up to 256 positions: two length buckets
    graphs = padded.decoder.graphs
    assert (graphs.fallback is not None) == compile and not padded.decoder.graphs_on  # no CUDA: not captured
    assert graphs.rows == ([2, 4, 8] if compile else [1, 2, 4, 8]) and graphs.lengths == [128, 256]
    batched = [(r["text"], r["completion_tokens"]) for r in padded.generate([padded.prepare(s) for s in specs])]
    batched += [(r["text"], r["completion_tokens"]) for r in padded.generate([padded.prepare(specs[0])])]
    padded.decoder.call(lambda: [graphs.step(n, length) for n in graphs.rows for length in graphs.lengths])
    prefill = padded.decoder.forward.compiled_prefill
    padded.close()
    assert batched == alone + alone[:1] and [n for _, n in alone] == [20, 7, 13]
    # Compiled: one compilation serves every decode bucket, two (one row, several) every prefill, all made at
    # start but the decode step's on a CPU (each more would stall a GPU replica for a minute or more).
    assert counters["stats"]["unique_graphs"] - compiled == (3 if compile else 0)
    assert (prefill is not None and prefill.compiled is not None) == compile  # never fell back to eager


def _forward_after_prefill(model_dir, length: int, prompt_lengths: list[int]):
    """A float32 Forward over `length` positions whose first slots hold prompts of these lengths, each at its
    next position: (forward, the next step's input tokens) for decode steps to compare."""
    from transformers import AutoModelForCausalLM

    from serving.forward import Forward

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    rows = len(prompt_lengths)
    forward = Forward(model, slots=4, length=length, pad_id=0, eos_ids=[model.config.eos_token_id])
    forward.prefill(torch.randint(3, 100, (rows, max(prompt_lengths)), generator=torch.Generator().manual_seed(0)),
                    prompt_lengths, list(range(rows)), [True] * rows, [None] * rows)
    forward.positions[:rows] = torch.tensor(prompt_lengths)
    return forward, forward.next_ids.clone()


def test_a_frozen_decode_step_fuses_the_shared_input_products_and_gives_the_plain_steps_tokens(sharp_model_dir):
    # DecodeGraphs(freeze=True) (bench/decode_profile.py --frozen): Inductor's freezing makes the weights constants
    # and concatenates the products that share an input, query/key/value and gate/up: 4 matrix products a layer
    # where the plain compiled step has 7. A flag Dynamo did not see while tracing would leave the weights as
    # inputs, and nothing fused (what happened when only Inductor was told). The plain compiled step runs first:
    # the GPU machine's torch 2.11 reused its code for the frozen one (bench/decode_profile.py, 2026-12-05), before
    # freezing went in as an option too; torch 2.13 here compiles the frozen step anew either way.
    import re

    from torch._inductor.utils import run_and_get_code

    from serving.cuda_graphs import DecodeGraphs

    with torch.inference_mode():
        forward, inputs = _forward_after_prefill(sharp_model_dir, 64, [10, 8, 6, 9])
        logits, tokens = (t.clone() for t in forward.pick(4, 64))
        DecodeGraphs(forward.pick, 4, 64, capture=False, compile=True).step(4, 64)
        frozen = DecodeGraphs(forward.pick, 4, 64, capture=False, compile=True, freeze=True)
        forward.next_ids.copy_(inputs)
        with torch._inductor.config.patch({"cpp.weight_prepack": False}):  # products show as mm (not mkl) calls
            (frozen_logits, frozen_tokens), code = run_and_get_code(frozen.step, 4, 64)
    layers = forward.model.config.num_hidden_layers
    assert len(re.findall(r"extern_kernels\.mm\(", "\n".join(code))) == 4 * layers + 1  # + the output head
    assert torch.equal(frozen_tokens, tokens) and torch.allclose(frozen_logits, logits, atol=1e-4)
    assert frozen.fallback is not None  # it ran compiled, not the plain step after a failure


def test_one_row_steps_run_a_step_compiled_for_one_row_that_gives_the_plain_steps_tokens(sharp_model_dir):
    # DecodeGraphs(one_row=True): a step of one row runs its own compilation (static row count: on a GPU its
    # products become fused reductions), two in all over any number of lengths.
    from serving.cuda_graphs import DecodeGraphs

    with torch.inference_mode():
        forward, inputs = _forward_after_prefill(sharp_model_dir, 512, [10])
        # As in a replica's process: Dynamo keeps the sizes it has seen by code object, and every one-row step
        # shares one (`_one_row`'s `alone`), so a test before this one could leave lengths that change the count.
        torch._dynamo.reset()
        graphs = DecodeGraphs(forward.pick, 4, 512, capture=False, compile=True, one_row=True)
        assert graphs.rows == [1, 2, 4] and graphs.lengths == [128, 256, 512]
        before = counters["stats"]["unique_graphs"]
        for length in graphs.lengths:
            forward.next_ids.copy_(inputs)
            logits, tokens = (t.clone() for t in forward.pick(1, length))
            forward.next_ids.copy_(inputs)
            one_logits, one_tokens = graphs.run(1, length)
            assert torch.equal(one_tokens, tokens) and torch.allclose(one_logits, logits, atol=1e-4)
        assert counters["stats"]["unique_graphs"] - before == 2
    assert graphs.one is not None and graphs.fallback is not None  # neither fell back to the plain step


def test_nan_logits_end_greedy_and_sampled_rows_with_a_model_error(sharp_model_dir, tmp_path):
    # Broken weights are the server's fault, not the request's: NaN logits end each row with a ModelError (a 5xx
    # in the API), however the row picks its tokens.
    import shutil

    from transformers import AutoModelForCausalLM

    from serving.job import ModelError

    shutil.copytree(sharp_model_dir, tmp_path / "nan")
    model = AutoModelForCausalLM.from_pretrained(sharp_model_dir)
    with torch.no_grad():
        model.lm_head.weight[0, 0] = float("nan")
    model.save_pretrained(tmp_path / "nan", safe_serialization=True)
    engine = Engine(str(tmp_path / "nan"), TEMPLATE, MAX_TOKENS, MAX_PROMPT_TOKENS, threads=1, graphs=True)
    futures = [engine.start(engine.prepare({"kind": "completion", "prompt": PROMPT, "max_tokens": 5,
                                            "temperature": t, "seed": 1})) for t in (0.0, 1.0)]
    for future in futures:
        with pytest.raises(ModelError, match="NaN logits"):
            future.result(timeout=60)
    engine.close()


def test_a_request_joins_and_leaves_a_running_batch(model_dir):
    # Continuous batching: a short request that arrives while a long one runs starts at the next step and
    # ends on its own, long before the long one; its text is what it gets alone.
    engine = Engine(str(model_dir), TEMPLATE, MAX_TOKENS, MAX_PROMPT_TOKENS, threads=1, max_batch_size=4)
    short = {"kind": "completion", "prompt": "Count", "max_tokens": 3, "temperature": 0.0, "ignore_eos": True}
    alone = engine.generate([engine.prepare(short)])[0]
    started = threading.Event()
    long_job = engine.prepare({"kind": "completion", "prompt": PROMPT, "max_tokens": MAX_TOKENS,
                               "temperature": 0.0, "ignore_eos": True})
    long_ended, long_box = threading.Event(), []
    engine.submit(long_job, lambda result, error: (long_box.append(result), long_ended.set()),
                  emit=lambda text: started.set())
    assert started.wait(30)
    short_ended, short_box = threading.Event(), []
    # Called on the decoding thread: what the long request had done when the short one ended.
    engine.submit(engine.prepare(short), lambda result, error: (
        short_box.append((result, long_job.ended, len(long_job.tokens))), short_ended.set()))
    assert short_ended.wait(30) and long_ended.wait(60)
    joined, long_had_ended, long_tokens_then = short_box[0]
    assert not long_had_ended and long_tokens_then < MAX_TOKENS
    assert long_box[0]["completion_tokens"] == MAX_TOKENS and long_box[0]["finish_reason"] == "length"
    assert (joined["text"], joined["completion_tokens"]) == (alone["text"], 3) and joined["batch_size"] == 2
    engine.close()


def test_the_engines_start_up_objects_are_left_to_no_garbage_collection(model_dir):
    # The libraries and the model are some 450,000 objects that live as long as the engine; a full collection
    # scanned them all, stalling the decoding thread 0.19 s (0.65 s compiled: bench/results/gc_pause_cpu.txt)
    # each time. Frozen at start, they are never scanned; closed, the engine gives them back to the collector.
    import gc

    engine = Engine(str(model_dir), TEMPLATE, MAX_TOKENS, MAX_PROMPT_TOKENS, threads=1, max_batch_size=1)
    frozen = gc.get_freeze_count()
    engine.close()
    assert frozen > 100_000 and gc.get_freeze_count() == 0


def test_a_cancelled_request_ends_at_the_next_step_and_frees_its_row(model_dir):
    # One row only: the cancelled request must give it up for the next one to run at all.
    engine = Engine(str(model_dir), TEMPLATE, MAX_TOKENS, MAX_PROMPT_TOKENS, threads=1, max_batch_size=1)
    spec = {"kind": "completion", "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0.0, "ignore_eos": True}
    job = engine.prepare(spec)
    ended, box = threading.Event(), []
    engine.submit(job, lambda result, error: (box.append(result), ended.set()), emit=lambda text: job.cancel())
    assert ended.wait(30)
    assert box[0]["finish_reason"] == "cancelled" and box[0]["completion_tokens"] < 4
    after = engine.generate([engine.prepare(spec)])[0]
    assert after["completion_tokens"] == MAX_TOKENS
    engine.close()


def test_a_stream_whose_client_goes_away_is_cancelled_in_the_replica(port, model_dir):
    # What Serve does when the HTTP client disconnects: it closes the replica's stream generator.
    import asyncio

    from serving.model_server import ModelServer

    server = ModelServer.func_or_class(str(model_dir), TEMPLATE, MAX_TOKENS, MAX_PROMPT_TOKENS, None, 2)
    spec = {"kind": "completion", "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0.0, "ignore_eos": True}
    jobs, submit = [], server.engine.submit
    server.engine.submit = lambda job, *args, **kwargs: (jobs.append(job), submit(job, *args, **kwargs))[1]

    async def leave_after_the_first_piece() -> None:
        events = server.stream(spec)
        assert "prompt_tokens" in await events.__anext__()
        assert "text" in await events.__anext__()
        await events.aclose()

    asyncio.run(leave_after_the_first_piece())
    assert server.stats() == {"cancelled": 1}
    deadline = time.monotonic() + 10
    while not jobs[0].ended and time.monotonic() < deadline:
        time.sleep(0.01)
    assert jobs[0].ended and jobs[0].cancelled and len(jobs[0].tokens) < MAX_TOKENS  # it stopped early
    whole = server.engine.generate([server.engine.prepare(spec)])[0]  # and the row is free again
    assert whole["completion_tokens"] == MAX_TOKENS
    server.engine.close()


# The deploy stage, for real: on the module's cluster (it joins the connection this process holds).
# v1 and v2 are registered as merge registers them (MLflow's transformers flavor); v3 is a folder
# whose weights are corrupt. Every replica loads its version from the registry by URI.

@pytest.fixture(scope="module")
def pipeline(port, model_dir, tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tuneline import registry

    root = tmp_path_factory.mktemp("pipeline")
    params = Params(
        reports_dir=root / "reports",
        data={"template": TEMPLATE},
        registry={"tracking_uri": f"sqlite:///{root}/mlflow.db", "artifact_location": root / "mlartifacts",
                  "model_name": "tiny-model"},
        serving={"port": port, "app_name": "test-deploy", "api_key_env": KEY_ENV, "health_timeout_s": 90,
                 "max_tokens_limit": MAX_TOKENS},
    )
    dirs = {"1": model_dir, "2": save_tiny_model(root / "v2", seed=1)}
    broken = save_tiny_model(root / "v3", seed=2)
    (broken / "model.safetensors").write_bytes(b"\x00not safetensors" * 64)
    with tracking.pipeline_run(params, new=True) as run:
        for version, path in dirs.items():
            model, tok = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
            assert registry.register(params, model, tok, {"source": "test"}) == version
    created = registry.client(params).create_model_version("tiny-model", source=str(broken), run_id=run.info.run_id)
    dirs[str(created.version)] = broken
    write_json(params.report("train.json"), {"mlflow_run_id": run.info.run_id})
    write_json(params.report("gate.json"), {"decision": "promote", "reasons": ["all checks passed"]})
    return params, dirs, run.info.run_id


def _merged(params: Params, dirs: dict, version: str) -> None:
    write_json(params.report("merge.json"), {"model_name": "tiny-model", "version": version,
                                             "model_dir": str(dirs[version]),
                                             "model_uri": f"models:/tiny-model/{version}"})


def _champion(params: Params) -> str:
    from tuneline import registry

    return registry.alias_version(params, "champion")


def _answered_by(port: int) -> str:
    r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json={"prompt": PROMPT, "max_tokens": 2},
                   headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert r.status_code == 200, r.text
    return r.headers[VERSION_HEADER]


@pytest.fixture(scope="module")
def deployed(pipeline):
    params, dirs, run_id = pipeline
    _merged(params, dirs, "1")
    with pytest.MonkeyPatch.context() as mp:  # the key stays exported while the deploy tests run
        mp.setenv(KEY_ENV, KEY)
        result = deploy.run(params)
        yield params, result, "1", run_id


def test_deploy_serves_the_version_and_makes_it_champion(deployed, port):
    import mlflow

    params, result, version, run_id = deployed
    endpoint = f"http://127.0.0.1:{port}/v1"
    assert result["version"] == version and result["endpoint"] == endpoint
    assert read_json(params.report("deploy.json")) == {
        "endpoint": endpoint, "model_name": "tiny-model", "version": version, "served_model": "tiny-model",
        "model_uri": f"models:/tiny-model/{version}", "app": "test-deploy-v1", "previous_version": None}
    assert _champion(params) == version
    assert mlflow.MlflowClient().get_run(run_id).data.tags["deploy.version"] == version
    assert _answered_by(port) == version
    assert {"test-deploy", "test-deploy-v1"} <= set(serve.status().applications)


def test_deployed_app_requires_its_api_key(deployed, port):
    url = f"http://127.0.0.1:{port}/v1"
    r = httpx.get(f"{url}/models")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url, api_key="wrong", max_retries=0).models.list()
    keyed = openai.OpenAI(base_url=url, api_key=KEY, max_retries=0, timeout=60)
    resp = keyed.completions.create(model="tiny-model", prompt=PROMPT, max_tokens=3, temperature=0)
    assert resp.usage.completion_tokens >= 1


def test_registry_alias_uri_resolves_to_the_champion_folder(deployed):
    params = deployed[0]
    folder, source = resolve_model("models:/tiny-model@champion", params.registry.tracking_uri)
    assert source == {"model_uri": "models:/tiny-model@champion", "name": "tiny-model", "version": "1"}
    assert (folder / "config.json").exists() and (folder / "tokenizer.json").exists()
    assert resolve_model("models:/tiny-model/1", params.registry.tracking_uri)[0] == folder  # cached once


def test_promotion_under_load_drops_no_request(deployed, pipeline, port):
    params, dirs, _ = pipeline
    url = f"http://127.0.0.1:{port}/v1"
    stop, results = threading.Event(), []

    def keep_asking(stream: bool) -> None:
        c = openai.OpenAI(base_url=url, api_key=KEY, max_retries=0, timeout=60)
        while not stop.is_set():
            sent = time.monotonic()
            try:
                raw = c.completions.with_raw_response.create(model="tiny-model", prompt=PROMPT, max_tokens=4,
                                                             temperature=0, stream=stream)
                answer = raw.parse()
                text = "".join(ch.choices[0].text for ch in answer) if stream else answer.choices[0].text
                results.append((sent, raw.headers.get(VERSION_HEADER), isinstance(text, str)))
            except Exception as e:  # noqa: BLE001 - any failure at all is what this test looks for
                results.append((sent, None, repr(e)))
            time.sleep(0.1)

    clients = [threading.Thread(target=keep_asking, args=(stream,)) for stream in (False, True)]
    for t in clients:
        t.start()
    try:
        time.sleep(1.0)
        _merged(params, dirs, "2")
        result = deploy.run(params)
        switched = time.monotonic()
        time.sleep(1.5)
    finally:
        stop.set()
        for t in clients:
            t.join()
    failures = [r for r in results if r[2] is not True]
    assert not failures, failures[:5]
    assert result["version"] == "2" and result["previous_version"] == "1"
    assert Counter(v for _, v, _ in results).keys() == {"1", "2"}, Counter(v for _, v, _ in results)
    assert {v for sent, v, _ in results if sent > switched} == {"2"}
    assert _champion(params) == "2"
    report = read_json(params.report("deploy.json"))
    assert (report["version"], report["previous_version"], report["app"]) == ("2", "1", "test-deploy-v2")
    apps = set(serve.status().applications)
    assert "test-deploy-v2" in apps and "test-deploy-v1" not in apps  # the old version is retired


def test_status_reports_the_served_version_and_metrics(deployed):
    from typer.testing import CliRunner

    from flows.cli import app

    params = deployed[0]
    st = control.status(params)
    assert st["running"] is True
    assert (st["version"], st["serving_version"], st["served_model"], st["model_name"]) == \
        ("2", "2", "tiny-model", "tiny-model")
    metrics = st["metrics"]
    assert metrics["requests"] >= 1 and metrics["completion_tokens"] >= 1
    assert metrics["latency_s"]["p50"] > 0 and metrics["ttft_s"]["p50"] > 0 and metrics["tokens_per_s"] > 0
    assert metrics["batch_size"]["max"] >= 1
    params_file = params.reports_dir / "params.yaml"
    params_file.write_text(yaml.safe_dump(params.model_dump(mode="json", by_alias=True)))
    out = CliRunner().invoke(app, ["serve", "status", "--params", str(params_file)])
    assert out.exit_code == 0, out.output
    assert "serving_version: 2" in out.output and "metrics.ttft_s.p50:" in out.output


def test_a_broken_candidate_is_rolled_back_and_the_champion_keeps_serving(deployed, pipeline, port):
    params, dirs, _ = pipeline
    _merged(params, dirs, "3")
    with pytest.raises(TunelineError, match=r"(?s)v3 failed and was rolled back.*version 2 keeps serving"):
        deploy.run(params)
    report = read_json(params.report("deploy.json"))
    assert report["rolled_back"] is True and report["serving_version"] == "2" and report["candidate_version"] == "3"
    assert "did not start" in report["reason"] and "SafetensorError" in report["reason"]
    assert _champion(params) == "2"
    assert _answered_by(port) == "2"
    assert "test-deploy-v3" not in serve.status().applications
    assert control.status(params)["version"] == "2"  # status still knows what serves


def test_serve_rollback_brings_the_previous_champion_back(deployed, port):
    from typer.testing import CliRunner

    from flows.cli import app

    params = deployed[0]
    params_file = params.reports_dir / "params.yaml"
    params_file.write_text(yaml.safe_dump(params.model_dump(mode="json", by_alias=True)))
    out = CliRunner().invoke(app, ["serve", "rollback", "--params", str(params_file)])
    assert out.exit_code == 0, out.output
    assert "version: 1" in out.output and "rolled_back_from: 2" in out.output
    assert _champion(params) == "1" and _answered_by(port) == "1"
    report = read_json(params.report("deploy.json"))
    assert (report["version"], report["previous_version"]) == ("1", "2")


def test_deploy_killed_mid_promotion_keeps_the_champion_serving_and_a_rerun_promotes(deployed, pipeline, port):
    """kill -9 while the candidate starts beside the champion: traffic and the alias stay; deploy again finishes."""
    import sys

    params, dirs, _ = pipeline
    assert _champion(params) == "1" and "test-deploy-v2" not in serve.status().applications  # after the rollback
    _merged(params, dirs, "2")
    params_file = params.reports_dir / "params.yaml"
    params_file.write_text(yaml.safe_dump(params.model_dump(mode="json", by_alias=True)))
    proc = subprocess.Popen([sys.executable, "-m", "tasks", "deploy", "--params", str(params_file)],
                            env={**os.environ, KEY_ENV: KEY}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while "test-deploy-v2" not in serve.status().applications:
        assert proc.poll() is None, "deploy ended before it was killed"
        assert time.monotonic() < deadline, "the candidate never started"
        time.sleep(0.2)
    proc.kill()
    assert proc.wait() == -9
    assert _champion(params) == "1" and _answered_by(port) == "1"

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(KEY_ENV, KEY)
        result = deploy.run(params)
    assert result["version"] == "2" and _champion(params) == "2" and _answered_by(port) == "2"
    apps = set(serve.status().applications)
    assert "test-deploy-v2" in apps and "test-deploy-v1" not in apps


def test_promote_serves_a_chosen_version_and_refuses_an_unknown_one(deployed, port):
    from typer.testing import CliRunner

    from flows.cli import app

    params = deployed[0]
    params_file = params.reports_dir / "params.yaml"
    assert _champion(params) == "2"  # after the re-run deploy above

    def promote(version: str):
        return CliRunner().invoke(app, ["promote", version, "--params", str(params_file)])

    out = promote("99")
    assert out.exit_code == 1 and "promote 99: the registry" in out.output and "'99' of tiny-model" in out.output
    assert _champion(params) == "2" and _answered_by(port) == "2"
    out = promote("1")
    assert out.exit_code == 0, out.output
    assert "version: 1" in out.output and "previous_version: 2" in out.output
    assert _champion(params) == "1" and _answered_by(port) == "1"
    report = read_json(params.report("deploy.json"))
    assert (report["version"], report["previous_version"], report["model_uri"]) == ("1", "2", "models:/tiny-model/1")
    out = promote("champion")  # an alias resolves to its version: here the one that serves
    assert out.exit_code == 0 and "unchanged: already serving" in out.output, out.output
    assert "test-deploy-v2" not in serve.status().applications  # the replaced version was retired


def test_stop_on_a_named_cluster_removes_only_the_app(deployed, client):
    # Runs after the other deploy tests (file order): it takes the deployed app down.
    params, *_ = deployed
    named = params.model_copy(update={"serving": params.serving.model_copy(
        update={"ray_address": ray.get_runtime_context().gcs_address})})
    assert control.stop(named) == {"stopped": True, "app": "test-deploy", "ray_stopped": False}
    assert control.status(params)["running"] is False
    assert not [a for a in serve.status().applications if a.startswith("test-deploy")]
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
