"""Soak of the serving endpoint: many concurrent clients, a fixed budget of short requests, nothing may fail.

A closed loop of --clients clients (bench/serve_bench.py's) sends --requests short requests in all,
completions and chat completions by turns; every answer must be a 200 whose body is a well-formed
OpenAI response with its usage. Prints requests, errors (with the first few), p50/p95 latency and
requests/s; --json writes the same figures to a file. tests/integration/test_serving_reliability.py runs this
soak on its own served app.

    python bench/soak.py                                   # a tiny model on a local Ray cluster of its own
    python bench/soak.py --url http://127.0.0.1:8000/v1 --api-key-env KEY --model tuneline-default
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from serve_bench import closed_loop, quantiles  # noqa: E402 - bench/ is this script's folder

PROMPTS = ["Which word is a fruit? apple piano", "List every animal, in order: tiger mango otter",
           "Count the words: one two three", "Which word is a tool? hammer cloud"]
SHOWN_ERRORS = 5


def request_body(i: int, max_tokens: int, model: str | None) -> tuple[str, dict]:
    """Request i of the soak: completions and chats by turns, greedy and seeded sampling by turns."""
    prompt = f"{PROMPTS[i % len(PROMPTS)]} {i}"
    sampling = {"max_tokens": 1 + i % max_tokens, "temperature": 0.8 if i % 3 else 0.0, "seed": i}
    if model:
        sampling["model"] = model
    if i % 2:
        return "/chat/completions", {"messages": [{"role": "user", "content": prompt}], **sampling}
    return "/completions", {"prompt": prompt, **sampling}


def problem(body: object, chat: bool, max_tokens: int) -> str | None:
    """What is wrong with the body of a 200 answer to a (chat) completion request, or None."""
    if not isinstance(body, dict):
        return f"not a JSON object: {body!r:.200}"
    kind = "chat.completion" if chat else "text_completion"
    choices, usage = body.get("choices"), body.get("usage")
    if body.get("object") != kind or not isinstance(body.get("id"), str) or not isinstance(body.get("model"), str):
        return f"object/id/model: {body!r:.300}"
    if not (isinstance(choices, list) and len(choices) == 1 and choices[0].get("index") == 0):
        return f"choices: {choices!r:.300}"
    choice = choices[0]
    text = choice.get("message", {}).get("content") if chat else choice.get("text")
    if not isinstance(text, str) or (chat and choice["message"].get("role") != "assistant"):
        return f"choice: {choice!r:.300}"
    if choice.get("finish_reason") not in ("stop", "length"):
        return f"finish_reason: {choice.get('finish_reason')!r}"
    if not isinstance(usage, dict) or not all(isinstance(usage.get(k), int) for k in
                                              ("prompt_tokens", "completion_tokens", "total_tokens")):
        return f"usage: {usage!r:.300}"
    if not (usage["prompt_tokens"] >= 1 and 1 <= usage["completion_tokens"] <= max_tokens
            and usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]):
        return f"usage counts: {usage} (max_tokens {max_tokens})"
    return None


def client(url: str, api_key: str | None, connections: int, timeout_s: float = 300) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    return httpx.AsyncClient(base_url=url, headers=headers, timeout=timeout_s, limits=limits)


class Asker:
    """Sends request i of the soak through `http`; returns its completion tokens and what was wrong
    with the answer (None: a 200 with a well-formed body)."""

    def __init__(self, http: httpx.AsyncClient, max_tokens: int, model: str | None):
        self.http, self.max_tokens, self.model = http, max_tokens, model

    async def __call__(self, i: int) -> tuple[int, str | None]:
        path, body = request_body(i, self.max_tokens, self.model)
        try:
            r = await self.http.post(path, json=body)
            if r.status_code != 200:
                return 0, f"{path}: HTTP {r.status_code}: {r.text[:300]}"
            answer = r.json()
        except (httpx.HTTPError, ValueError) as e:  # ValueError: a 200 whose body is no JSON
            return 0, f"{path}: {type(e).__name__}: {e}"
        wrong = problem(answer, path == "/chat/completions", body["max_tokens"])
        return (0, f"{path}: {wrong}") if wrong else (answer["usage"]["completion_tokens"], None)


async def soak(url: str, clients: int = 64, requests: int = 64 * 32, max_tokens: int = 4, api_key: str | None = None,
               model: str | None = None) -> dict:
    """The soak against `url` (…/v1). Returns requests, errors, the first errors, p50/p95 latency (s),
    requests/s and wall time (s)."""
    errors: list[str] = []
    async with client(url, api_key, clients) as http:
        ask = Asker(http, max_tokens, model)

        async def one(i: int) -> tuple[int, None]:
            tokens, wrong = await ask(i)
            if wrong:
                errors.append(f"request {i}: {wrong}")
            return tokens, None

        _, wall, _, latencies = await closed_loop(one, clients, requests)
    p50, p95 = quantiles(latencies)
    return {"clients": clients, "requests": len(latencies), "errors": len(errors),
            "first_errors": errors[:SHOWN_ERRORS], "p50_s": round(p50, 4),
            "p95_s": round(p95, 4), "requests_per_s": round(len(latencies) / wall, 2),
            "wall_s": round(wall, 2), "max_tokens": max_tokens}


def report(figures: dict) -> str:
    lines = [f"soak: {figures['clients']} clients, {figures['requests']} requests (max_tokens <= "
             f"{figures['max_tokens']}): {figures['errors']} errors; latency p50 {figures['p50_s']:.3f}s "
             f"p95 {figures['p95_s']:.3f}s; {figures['requests_per_s']:.1f} requests/s over {figures['wall_s']:.1f}s"]
    return "\n".join(lines + [f"  {e}" for e in figures["first_errors"]])


def serve_tiny(port: int, replicas: int) -> str:
    """A random-init tiny model (serve_bench's) behind the app on a local Ray cluster; returns its …/v1 URL."""
    import ray
    from ray import serve
    from serve_bench import build_model

    from serving.builders import build_app
    from tuneline.config import Serving

    model_dir = build_model("tiny", Path(tempfile.mkdtemp(prefix="soak-")) / "model")
    ray.init(address="local", num_cpus=replicas + 2, include_dashboard=False, log_to_driver=False,
             logging_level="WARNING")
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(str(model_dir), "soak", "alpaca", Serving(min_replicas=replicas, max_replicas=replicas)),
              name="soak", route_prefix="/")
    return f"http://127.0.0.1:{port}/v1"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running endpoint (…/v1); default: serve a tiny model here")
    parser.add_argument("--api-key-env", help="the env var that holds the endpoint's API key")
    parser.add_argument("--model", help="the `model` to send (the endpoint's served name)")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--requests", type=int, default=64 * 32, help="the budget: requests in all")
    parser.add_argument("--max-tokens", type=int, default=4, help="requests ask for 1 to this many tokens")
    parser.add_argument("--replicas", type=int, default=2, help="model replicas of the local app")
    parser.add_argument("--port", type=int, default=8124, help="HTTP port of the local app")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    url = args.url or serve_tiny(args.port, args.replicas)
    key = os.environ.get(args.api_key_env) if args.api_key_env else None
    try:
        figures = asyncio.run(soak(url, args.clients, args.requests, args.max_tokens, key, args.model))
    finally:
        if not args.url:
            import ray
            from ray import serve

            serve.shutdown()
            ray.shutdown()
    print(report(figures), flush=True)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    sys.exit(1 if figures["errors"] else 0)


if __name__ == "__main__":
    main()
