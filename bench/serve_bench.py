"""Serving bench: Tuneline's Ray Serve app (dynamic batching) against plain `model.generate`, one at a time.

For each concurrency level (default 1, 8, 32) a closed loop of that many clients sends completion
requests of a fixed length (greedy, `ignore_eos`, so every request generates exactly --max-tokens
tokens) and the bench reports tokens/s and p50/p95 latency for

- baseline: the same model in this process, `model.generate` on one request at a time (requests
  that arrive meanwhile wait their turn: latency includes that wait), and
- served: serving.builders.build_app on a local Ray cluster (router + ModelServer, @serve.batch) over
  HTTP, as an OpenAI client would see it,

then the ratio served/baseline and the mean batch size the server formed (its /v1/metrics).

    python bench/serve_bench.py --tiny                 # CPU: the embedded default's base shape, random init
    python bench/serve_bench.py models/base            # any Hugging Face folder
    python bench/serve_bench.py --llama-1b             # GPU: a Llama-3.2-1B shape, random init, bf16

Imports only torch, transformers, ray[serve], httpx (and this repo's serving/ and tasks/).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, max_position_embeddings=4096)
SEED = 1234


def _corpus(n: int = 400) -> list[str]:
    from tasks.bootstrap.data import generate_records
    from tuneline.formats import ALPACA_HEADER

    records = generate_records(n, random.Random(SEED), set())
    return [ALPACA_HEADER] + [f"{r['instruction']}\n\n{r['input']}\n\n{r['output']}" for r in records]


def build_model(kind: str, dest: Path) -> Path:
    """A random-init Llama with a BPE tokenizer (tasks.bootstrap.tiny.build_tokenizer), saved to `dest`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tasks.bootstrap.tiny import build_tokenizer
    from tuneline.config import TinyModel

    corpus = _corpus()
    torch.manual_seed(SEED)
    if kind == "tiny":  # the embedded default's base model shape (params.yaml bootstrap.model)
        shape = TinyModel()
        tokenizer = build_tokenizer(corpus, shape.vocab_size)
        cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=shape.hidden_size,
                          intermediate_size=shape.intermediate_size, num_hidden_layers=shape.num_layers,
                          num_attention_heads=shape.num_heads, num_key_value_heads=shape.num_heads,
                          max_position_embeddings=shape.max_position_embeddings, tie_word_embeddings=True)
        dtype, device = torch.float32, "cpu"
    else:  # ids past the small tokenizer's vocabulary decode to nothing: the shapes (and FLOPs) are Llama's
        tokenizer = build_tokenizer(corpus, 8000)
        cfg = LlamaConfig(**LLAMA_1B)
        dtype, device = torch.bfloat16, "cuda" if torch.cuda.is_available() else "cpu"
    cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id = (tokenizer.pad_token_id, tokenizer.bos_token_id,
                                                           tokenizer.eos_token_id)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)
    model.save_pretrained(dest, safe_serialization=True)
    tokenizer.save_pretrained(dest)
    del model
    return dest


def prompts(n: int, words: int) -> list[str]:
    rng = random.Random(SEED)
    vocab = " ".join(_corpus(100)).split()
    return [" ".join(rng.choice(vocab) for _ in range(words)) for _ in range(n)]


async def closed_loop(one, concurrency: int, total: int) -> tuple[list[float], int, float]:
    """`concurrency` clients, each sending its next request when its last one is answered; `total` in all.
    Returns the latencies, the completion tokens, and the wall time."""
    next_i, latencies, tokens = 0, [], 0

    async def client() -> None:
        nonlocal next_i, tokens
        while next_i < total:
            i, next_i = next_i, next_i + 1
            start = time.perf_counter()
            n = await one(i)  # not `tokens += await ...`: that reads `tokens` before the await
            latencies.append(time.perf_counter() - start)
            tokens += n

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return latencies, tokens, time.perf_counter() - start


def summary(latencies: list[float], tokens: int, wall: float) -> dict:
    ordered = sorted(latencies)
    q = statistics.quantiles(ordered, n=20, method="inclusive") if len(ordered) > 1 else ordered * 19
    return {"tokens_per_s": tokens / wall, "p50": statistics.median(ordered), "p95": q[18], "requests": len(ordered)}


def run_baseline(model_dir: Path, texts: list[str], levels: list[int], args) -> dict[int, dict]:
    """Plain `model.generate`, one request at a time, in this process, on the device the server uses."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from serving.model_server import REPLICA_CPUS

    cuda = torch.cuda.is_available()
    if not cuda:
        torch.set_num_threads(REPLICA_CPUS)  # the compute a model replica gets
    dtype = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if cuda else torch.float32
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to("cuda" if cuda else "cpu").eval()
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def generate(text: str) -> int:
        ids = tok(text, return_tensors="pt").to(model.device)
        with torch.inference_mode():
            out = model.generate(**ids, max_new_tokens=args.max_tokens, min_new_tokens=args.max_tokens,
                                 do_sample=False, pad_token_id=pad)
        if cuda:
            torch.cuda.synchronize()
        return out.shape[1] - ids["input_ids"].shape[1]

    async def level(c: int, total: int) -> tuple[list[float], int, float]:
        lock = asyncio.Lock()

        async def one(i: int) -> int:
            async with lock:  # one at a time: the others wait, as they would behind a plain server
                return await asyncio.to_thread(generate, texts[i % len(texts)])

        return await closed_loop(one, c, total)

    for t in texts[:2]:
        generate(t)  # warm-up
    results = {}
    for c in levels:
        results[c] = summary(*asyncio.run(level(c, max(args.requests, 2 * c))))
        print(f"baseline  c={c:<3} {fmt(results[c])}", flush=True)
    model.to("cpu")  # give the GPU to the server
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return results


def run_served(model_dir: Path, texts: list[str], levels: list[int], args) -> dict[int, dict]:
    import httpx
    import ray
    from ray import serve

    from serving.builders import build_app
    from tuneline.config import Serving

    ray.init(address="local", include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    port = args.port
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app = build_app(str(model_dir), "bench", "alpaca", Serving(
        max_tokens_limit=args.max_tokens, max_prompt_tokens=4096, max_batch_size=args.max_batch_size,
        batch_wait_timeout_s=args.batch_wait_ms / 1000, target_ongoing_requests=args.max_batch_size))
    serve.run(app, name="bench", route_prefix="/")
    url = f"http://127.0.0.1:{port}/v1"
    results = {}

    async def level(c: int, total: int) -> tuple[list[float], int, float]:
        limits = httpx.Limits(max_connections=c + 4, max_keepalive_connections=c + 4)
        async with httpx.AsyncClient(timeout=900, limits=limits) as client:
            async def one(i: int) -> int:
                body = {"prompt": texts[i % len(texts)], "max_tokens": args.max_tokens, "temperature": 0,
                        "ignore_eos": True}
                r = await client.post(f"{url}/completions", json=body)
                r.raise_for_status()
                return r.json()["usage"]["completion_tokens"]

            return await closed_loop(one, c, total)

    try:
        asyncio.run(level(min(8, max(levels)), 8))  # warm-up
        for c in levels:
            before = httpx.get(f"{url}/metrics", timeout=60).json()["batch_size"]["requests_by_size"]
            results[c] = summary(*asyncio.run(level(c, max(args.requests, 2 * c))))
            after = httpx.get(f"{url}/metrics", timeout=60).json()["batch_size"]["requests_by_size"]
            sizes = {int(k): v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}
            results[c]["mean_batch"] = sum(sizes.values()) / sum(n / k for k, n in sizes.items())
            print(f"served    c={c:<3} {fmt(results[c])}  mean batch {results[c]['mean_batch']:.1f}", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    return results


def fmt(r: dict) -> str:
    return f"{r['tokens_per_s']:9.1f} tok/s   p50 {r['p50']:7.3f}s   p95 {r['p95']:7.3f}s   ({r['requests']} requests)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", help="a Hugging Face model folder (else --tiny or --llama-1b)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--tiny", action="store_true", help="random-init embedded default shape (CPU)")
    which.add_argument("--llama-1b", action="store_true", help="random-init Llama-3.2-1B shape, bf16 (GPU)")
    parser.add_argument("--levels", default="1,8,32", help="concurrency levels (default 1,8,32)")
    parser.add_argument("--requests", type=int, default=32, help="requests per level, at least 2x the level")
    parser.add_argument("--max-tokens", type=int, default=None, help="tokens per request (32 CPU, 128 GPU)")
    parser.add_argument("--prompt-words", type=int, default=None, help="words per prompt (16 CPU, 200 GPU)")
    parser.add_argument("--max-batch-size", type=int, default=32, help="serving.max_batch_size")
    parser.add_argument("--batch-wait-ms", type=float, default=20, help="serving.batch_wait_timeout_s x 1000")
    parser.add_argument("--port", type=int, default=8123)
    args = parser.parse_args()
    gpu = torch.cuda.is_available()
    args.max_tokens = args.max_tokens or (128 if gpu else 32)
    args.prompt_words = args.prompt_words or (200 if gpu else 16)
    levels = [int(x) for x in args.levels.split(",")]

    with tempfile.TemporaryDirectory(prefix="serve-bench-") as tmp:
        if args.model:
            model_dir = Path(args.model).resolve()
        elif args.tiny or args.llama_1b:
            model_dir = build_model("tiny" if args.tiny else "llama-1b", Path(tmp) / "model")
        else:
            parser.error("give a model folder, --tiny or --llama-1b")
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(model_dir)
        texts = prompts(64, args.prompt_words)
        device = torch.cuda.get_device_name(0) if gpu else f"CPU ({os.cpu_count()} cores, replica: 1 thread)"
        name = args.model or ("random-init tiny (the embedded default's base shape)" if args.tiny
                              else "random-init Llama-3.2-1B shape")
        print(f"model: {name} ({cfg.model_type}, hidden {cfg.hidden_size}, {cfg.num_hidden_layers} "
              f"layers, vocab {cfg.vocab_size}); device: {device}\n"
              f"requests: greedy, {args.max_tokens} new tokens each (ignore_eos), prompts of {args.prompt_words} "
              f"words; served: max_batch_size {args.max_batch_size}, batch_wait {args.batch_wait_ms:g} ms, "
              f"1 replica", flush=True)
        base = run_baseline(model_dir, texts, levels, args)
        served = run_served(model_dir, texts, levels, args)

    print("\nconcurrency | baseline tok/s  p50 s   p95 s | served tok/s  p50 s   p95 s  batch | throughput x")
    for c in levels:
        b, s = base[c], served[c]
        print(f"{c:>11} | {b['tokens_per_s']:14.1f} {b['p50']:6.3f} {b['p95']:7.3f} | {s['tokens_per_s']:12.1f} "
              f"{s['p50']:6.3f} {s['p95']:7.3f} {s['mean_batch']:6.1f} | {s['tokens_per_s'] / b['tokens_per_s']:11.2f}")


if __name__ == "__main__":
    main()
