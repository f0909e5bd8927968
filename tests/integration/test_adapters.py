"""Many adapters on one served base (serving/adapters.py): Ray Serve model multiplexing, on a tiny model.

Three LoRA adapters are trained over one tiny base, each on its own task (answer "beta", "dog" or
"zero" whatever the question), and served by one AdapterServer replica: one from the MLflow registry
by alias, one by version, one from a folder, plus one whose folder holds no adapter. At most two are
loaded at once, so asking the three in turn evicts one and reloads another at every request.
"""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import ray
from ray import serve
from support.models import save_tiny_model
from support.services import free_port

from serving.adapters import adapter_app, register_adapter
from serving.model_source import CACHE_ENV
from tuneline.config import ConfigError, Params, load_params

TEMPLATE = "chatml"
BASE = "tiny-base"
ANSWERS = {"tenant-a": "beta", "tenant-b": "dog", "tenant-c": "zero"}  # adapter -> the one answer it learned
WORDS = "apple tiger piano mango otter violin lemon eagle drum".split()
QUESTIONS = ["lemon drum otter", "Which word is a fruit? apple", "hello"]  # none of them trained on


def train_adapter(base, answer: str, dest, steps: int = 40) -> None:
    """LoRA (lm_head included: the random base's logits are too flat for the projections alone to move)
    trained until greedy decoding gives `answer` to any user message."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tuneline.models import encode

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                            "down_proj", "lm_head"]))
    params = Params(data={"format": "chat", "template": TEMPLATE})
    rng = random.Random(answer)
    rows = [encode({"messages": [{"role": "user", "content": " ".join(rng.sample(WORDS, 3))},
                                 {"role": "assistant", "content": answer}]}, params, tokenizer) for _ in range(32)]
    width = max(len(r["input_ids"]) for r in rows)
    pad = [width - len(r["input_ids"]) for r in rows]
    ids = torch.tensor([r["input_ids"] + [tokenizer.pad_token_id] * p for r, p in zip(rows, pad, strict=True)])
    labels = torch.tensor([r["labels"] + [-100] * p for r, p in zip(rows, pad, strict=True)])
    mask = (ids != tokenizer.pad_token_id).long()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(dest, save_embedding_layers=False)  # the base keeps its own (tied) embeddings


@pytest.fixture(scope="module")
def params(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    base = save_tiny_model(root / "base")
    folders = {name: root / name for name in ANSWERS}
    for name, answer in ANSWERS.items():
        train_adapter(base, answer, folders[name])
    tracking_uri, artifacts = f"sqlite:///{root / 'mlflow.db'}", (root / "mlartifacts").as_uri()
    register_adapter(folders["tenant-a"], "adapter-a", tracking_uri, alias="champion", artifact_location=artifacts)
    version = register_adapter(folders["tenant-b"], "adapter-b", tracking_uri, artifact_location=artifacts)
    (root / "not-an-adapter").mkdir()
    served = [{"name": "tenant-a", "source": "models:/adapter-a@champion"},
              {"name": "tenant-b", "source": f"models:/adapter-b/{version}"},
              {"name": "tenant-c", "source": str(folders["tenant-c"])},
              {"name": "broken", "source": str(root / "not-an-adapter")}]
    return Params(model={"base": str(base)}, data={"template": TEMPLATE}, registry={"tracking_uri": tracking_uri},
                  serving={"max_tokens_limit": 16, "max_prompt_tokens": 64,
                           "adapters": {"base_name": BASE, "max_loaded": 2, "served": served}})


@pytest.fixture(scope="module")
def base_url(params, tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:  # the replica's registry downloads go to a temp folder
        mp.setenv(CACHE_ENV, str(tmp_path_factory.mktemp("model-cache")))
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(adapter_app(params), name="test-adapters", route_prefix="/adapters")
    yield f"http://127.0.0.1:{port}/adapters/v1"
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def client(base_url):
    return openai.OpenAI(base_url=base_url, api_key="x", max_retries=0, timeout=60)


def ask(client, model: str, question: str = QUESTIONS[0]):
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                          max_tokens=8, temperature=0)


def loaded(client) -> set[str]:
    return {m.id for m in client.models.list() if getattr(m, "loaded", False)}


def test_each_adapter_answers_its_own_task_and_the_base_none(client):
    for name, answer in ANSWERS.items():
        for question in QUESTIONS:
            resp = ask(client, name, question)
            assert (resp.model, resp.choices[0].message.content) == (name, answer), question
            assert resp.choices[0].finish_reason == "stop"
    base = ask(client, BASE)
    assert base.model == BASE and base.choices[0].message.content not in ANSWERS.values()


def test_models_lists_the_base_and_every_adapter(client):
    models = client.models.list().data
    assert [m.id for m in models] == [BASE, *ANSWERS, "broken"]
    assert all(m.parent == BASE and isinstance(m.loaded, bool) for m in models[1:])
    assert not hasattr(models[0], "parent")


def test_least_recently_used_adapter_is_evicted_and_reloads_on_demand(client):
    ask(client, "tenant-a")
    ask(client, "tenant-b")
    assert loaded(client) == {"tenant-a", "tenant-b"}
    ask(client, "tenant-a")  # now tenant-b is the least recently used
    assert ask(client, "tenant-c").choices[0].message.content == "zero"
    assert loaded(client) == {"tenant-a", "tenant-c"}
    for name in ["tenant-b", "tenant-a", "tenant-c"] * 2:  # three adapters, room for two: every one a reload
        assert ask(client, name).choices[0].message.content == ANSWERS[name]
    assert loaded(client) == {"tenant-a", "tenant-c"}


def test_concurrent_requests_for_many_adapters_each_get_their_own(client):
    names = [*ANSWERS, BASE] * 6
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda n: ask(client, n).choices[0].message.content, names))
    base_answer = ask(client, BASE).choices[0].message.content
    assert answers == [ANSWERS.get(n, base_answer) for n in names]


def test_streamed_adapter_answer_matches_the_whole_one(client):
    stream = client.chat.completions.create(model="tenant-b", messages=[{"role": "user", "content": "piano"}],
                                            max_tokens=8, temperature=0, stream=True)
    chunks = list(stream)
    assert {c.model for c in chunks} == {"tenant-b"}
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "dog"


def test_an_adapter_that_does_not_load_fails_alone(client, base_url):
    r = httpx.post(f"{base_url}/completions", json={"model": "broken", "prompt": "hi", "max_tokens": 2}, timeout=60)
    assert r.status_code == 500, r.text
    message = r.json()["error"]["message"]
    assert "'broken'" in message and "not-an-adapter" in message and "adapter_config.json" in message
    assert ask(client, "tenant-c").choices[0].message.content == "zero"


def test_unknown_model_gets_404_naming_what_is_served(base_url):
    r = httpx.post(f"{base_url}/completions", json={"model": "tenant-z", "prompt": "hi"}, timeout=60)
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"
    assert "'tenant-z'" in r.json()["error"]["message"] and "'tenant-a'" in r.json()["error"]["message"]


@pytest.mark.parametrize("served, error", [
    ([{"name": "a", "source": "x"}, {"name": "a", "source": "y"}],
     r"serving\.adapters: .*names must differ from each other and from base_name: a"),
    ([{"name": "base", "source": "x"}], r"serving\.adapters: .*names must differ .* base_name: base"),
    ([{"name": "a b", "source": "x"}], r"serving\.adapters\.served\.0\.name: String should match pattern"),
])
def test_bad_adapter_config_names_the_key(tmp_path, served, error):
    path = tmp_path / "params.yaml"
    path.write_text("", encoding="utf-8")
    with pytest.raises(ConfigError, match=rf"params\.yaml: {error}"):
        load_params(path, [f"serving.adapters.served={served}"])
