"""Serving bench: Tuneline's continuous-batching engine against the engine it replaced and the hardware's limit.

One process, one model, the same requests. For each concurrency level (default 1, 8, 32, 128) a closed
loop of that many clients sends completion requests (greedy, `ignore_eos`: every request generates
--max-tokens tokens, or with --mixed its own number between an eighth of that and all) and the bench
reports output tokens/s, time to first token and request latency (p50, p95) for

- tuneline: serving/generation.py's Engine, in-process (what a model replica runs), with
  max_batch_size = the highest level; with --compile, once per variant (rows say which: `compile` off,
  decode (serving.compile_decode's step only), all (step and prefill, as compile_decode runs), frozen
  (all, the step with Inductor's freezing: fused projections, serving/cuda_graphs.py) or one-row (all, and
  steps of one row through a step compiled for one row alone, serving/cuda_graphs.py));
- tuneline-served (optional): the same engine behind the Ray Serve app, streamed over HTTP through the
  `openai` client, as a user sees it;
- baseline: the engine before it, rebuilt here: `model.generate` over a left-padded batch of the requests
  waiting when the model is free (up to the same batch size), fixed until its longest row ends;
- transformers-cb (--with-transformers-cb, GPU): transformers' own continuous batching
  (`generate_batch`, CUDA graphs on, paged SDPA), fed in waves of `concurrency` requests;

and the limit: one decode step must read every weight once, so at concurrency 1 no engine can beat
(device copy bandwidth) / (weight bytes) tokens/s. The copy bandwidth (read + write of a 1 GiB buffer) is
measured here, in this process.

    python bench/serve_bench.py --llama-1b            # GPU: random-init Llama-3.2-1B shape, bf16
    python bench/serve_bench.py models/base --levels 1,8,32 --max-tokens 32 --prompt-words 16  # CPU

Results: bench/results/serve_h200.jsonl (GPU) or serve_cpu.jsonl, one JSON object per engine and level
{"engine", "concurrency", "output_tokens_per_s", "ttft_p50_s", "ttft_p95_s", "latency_p50_s",
"latency_p95_s", ...} and one {"limit": true, "weights_gib", "copy_tb_s", "c1_limit_tokens_per_s"}.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import random
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

RESULTS = Path(__file__).resolve().parent / "results"
_ALL = {"compile": True, "compile_prefill": True}
VARIANTS = {"off": {}, "decode": {"compile": True, "compile_prefill": False}, "all": _ALL,  # Engine's arguments
            "frozen": {**_ALL, "freeze": True}, "one-row": {**_ALL, "one_row": True}}
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


def budgets(n: int, args) -> list[int]:
    """Each request's max_tokens: all --max-tokens, or with --mixed drawn between an eighth of it and all of it
    (a mix of short and long answers: a batch fixed until its longest row ends wastes the short rows' slots)."""
    rng = random.Random(SEED + 1)
    return [rng.randint(max(1, args.max_tokens // 8), args.max_tokens) if args.mixed else args.max_tokens
            for _ in range(n)]


def quantiles(values: list[float]) -> tuple[float, float]:
    ordered = sorted(values)
    q = statistics.quantiles(ordered, n=20, method="inclusive") if len(ordered) > 1 else ordered * 19
    return statistics.median(ordered), q[18]


def row(engine: str, c: int, tokens: int, wall: float, ttfts: list[float], latencies: list[float], **extra) -> dict:
    t50, t95 = quantiles(ttfts)
    l50, l95 = quantiles(latencies)
    return {"engine": engine, "concurrency": c, "output_tokens_per_s": round(tokens / wall, 1),
            "ttft_p50_s": round(t50, 4), "ttft_p95_s": round(t95, 4), "latency_p50_s": round(l50, 4),
            "latency_p95_s": round(l95, 4), "requests": len(latencies), **extra}


async def closed_loop(one, concurrency: int, total: int) -> tuple[int, float, list[float], list[float]]:
    """`concurrency` clients, each sending its next request when its last one is answered; `total` in all.
    `one(i)` returns (tokens, time to first token or None). Returns tokens, wall time, ttfts, latencies."""
    next_i, tokens, ttfts, latencies = 0, 0, [], []

    async def client() -> None:
        nonlocal next_i, tokens
        while next_i < total:
            i, next_i = next_i, next_i + 1
            start = time.perf_counter()
            n, ttft = await one(i)
            latencies.append(time.perf_counter() - start)
            tokens += n  # not `tokens += await ...`: that reads `tokens` before the await
            if ttft is not None:
                ttfts.append(ttft)

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return tokens, time.perf_counter() - start, ttfts, latencies


def measure_limit(model) -> dict:
    """Weight bytes of `model`, and the device's copy bandwidth (bytes read + written per second)."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    device = next(model.parameters()).device
    src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(10 if device.type == "cuda" else 3):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        dst.copy_(src)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    copy = 2 * src.numel() / best
    del src, dst
    return {"limit": True, "weights_gib": round(weights / 2**30, 3), "copy_tb_s": round(copy / 1e12, 3),
            "c1_limit_tokens_per_s": round(copy / weights, 1)}


def run_tuneline(model_dir: Path, texts: list[str], levels: list[int], args, keep, variant: str) -> None:
    from serving.generation import Engine

    budget = budgets(len(texts), args)
    start = time.perf_counter()
    engine = Engine(str(model_dir), "alpaca", args.max_tokens, args.max_prompt_tokens, threads=args.threads,
                    max_batch_size=max(levels), **VARIANTS[variant])
    ready = time.perf_counter() - start  # loading, compiling and capturing
    print(f"tuneline (compile {variant}) ready in {ready:.1f} s", flush=True)

    async def level(c: int, total: int):
        async def one(i: int):
            job = engine.prepare({"kind": "completion", "prompt": texts[i % len(texts)],
                                  "max_tokens": budget[i % len(texts)], "temperature": 0.0, "ignore_eos": True})
            result = await asyncio.wrap_future(engine.start(job))
            return result["completion_tokens"], result["ttft_s"]

        return await closed_loop(one, c, total)

    asyncio.run(level(min(8, max(levels)), 8))  # warm-up
    d = engine.decoder
    for c in levels:
        steps, prefills = d.steps, d.prefills
        tokens, wall, ttfts, latencies = asyncio.run(level(c, max(args.requests, 2 * c)))
        graphs, prefill = d.graphs, d.forward.compiled_prefill
        keep(row("tuneline", c, tokens, wall, ttfts, latencies, cuda_graphs=d.graphs_on,
                 decode_steps=d.steps - steps, prefill_forwards=d.prefills - prefills,  # how requests were batched
                 compile=variant, start_s=round(ready, 1),  # what ran compiled (a failed compile falls back):
                 compiled_step=graphs is not None and graphs.fallback is not None,
                 compiled_prefill=prefill is not None and prefill.compiled is not None))
    engine.close()


def run_served(model_dir: Path, texts: list[str], levels: list[int], args, keep) -> None:
    """The same engine as a user sees it: the Ray Serve app (router + model replica) on a local cluster,
    streamed over HTTP through the official `openai` client (time to first token = the first text chunk)."""
    import openai
    import ray
    from ray import serve

    from serving.builders import build_app
    from tuneline.config import Serving

    ray.init(address="local", include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    serve.run(build_app(str(model_dir), "bench", "alpaca", Serving(
        max_tokens_limit=args.max_tokens, max_prompt_tokens=args.max_prompt_tokens, max_batch_size=max(levels),
        target_ongoing_requests=max(levels))), name="bench", route_prefix="/")
    budget = budgets(len(texts), args)

    async def level(c: int, total: int):
        async with openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{args.port}/v1", api_key="none", max_retries=0,
                                      timeout=900) as client:  # one per event loop: asyncio.run makes a new one
            async def one(i: int):
                start = time.perf_counter()
                stream = await client.completions.create(
                    model="bench", prompt=texts[i % len(texts)], max_tokens=budget[i % len(texts)], temperature=0,
                    stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
                ttft, tokens = None, 0
                async for chunk in stream:
                    if ttft is None and chunk.choices and chunk.choices[0].text:
                        ttft = time.perf_counter() - start
                    if chunk.usage:
                        tokens = chunk.usage.completion_tokens
                return tokens, ttft

            return await closed_loop(one, c, total)

    try:
        asyncio.run(level(min(8, max(levels)), 8))  # warm-up
        for c in levels:
            tokens, wall, ttfts, latencies = asyncio.run(level(c, max(args.requests, 2 * c)))
            keep(row("tuneline-served", c, tokens, wall, ttfts, latencies))
    finally:
        serve.shutdown()
        ray.shutdown()


def run_baseline(model, tok, texts: list[str], levels: list[int], args, keep) -> None:
    """The engine before continuous batching: whenever the model is free, every waiting request (up to the
    batch size) goes into one left-padded `generate`, which runs until its longest row ends."""
    from transformers import LogitsProcessor, LogitsProcessorList

    tok.padding_side = "left"
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    class FirstToken(LogitsProcessor):
        def __init__(self):
            self.at = None

        def __call__(self, input_ids, scores):
            if self.at is None:
                self.at = time.perf_counter()
            return scores

    def generate_batch(batch: list[tuple[str, float, int]]) -> list[tuple[int, float]]:
        """(text, arrival, max_tokens) each; a row's answer is its first max_tokens of the batch's longest."""
        enc = tok([t for t, _, _ in batch], return_tensors="pt", padding=True).to(model.device)
        first = FirstToken()
        longest = max(n for _, _, n in batch)
        with torch.inference_mode():
            model.generate(**enc, max_new_tokens=longest, min_new_tokens=longest, do_sample=False, pad_token_id=pad,
                           logits_processor=LogitsProcessorList([first]))
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        return [(n, first.at - arrived) for _, arrived, n in batch]

    budget = budgets(len(texts), args)

    async def level(c: int, total: int):
        queue: list = []
        wake = asyncio.Event()
        batch_size = max(levels)

        async def batcher():
            while True:
                await wake.wait()
                wake.clear()
                while queue:
                    batch, rest = queue[:batch_size], queue[batch_size:]
                    queue[:] = rest
                    results = await asyncio.to_thread(generate_batch, [(t, a, n) for t, a, n, _ in batch])
                    for (*_, future), result in zip(batch, results, strict=True):
                        future.set_result(result)

        async def one(i: int):
            future = asyncio.get_running_loop().create_future()
            queue.append((texts[i % len(texts)], time.perf_counter(), budget[i % len(texts)], future))
            wake.set()
            return await future

        task = asyncio.create_task(batcher())
        try:
            return await closed_loop(one, c, total)
        finally:
            task.cancel()

    asyncio.run(level(1, 2))  # warm-up
    for c in levels:
        tokens, wall, ttfts, latencies = asyncio.run(level(c, max(args.requests, 2 * c)))
        keep(row("baseline", c, tokens, wall, ttfts, latencies))


def run_transformers_cb(model, tok, texts: list[str], levels: list[int], args, keep) -> None:
    """transformers' continuous batching (generate_batch with its CUDA-graph warm-up), in waves of c requests."""
    from transformers import ContinuousBatchingConfig, GenerationConfig

    gen = GenerationConfig(max_new_tokens=args.max_tokens, do_sample=False, eos_token_id=-1,
                           pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    ids = [tok(t)["input_ids"] for t in texts]
    for c in levels:
        cfg = ContinuousBatchingConfig(use_cuda_graph=True, max_requests_per_batch=c)
        try:
            model.generate_batch(ids[:c], generation_config=gen, continuous_batching_config=cfg)  # warm-up, graphs
            total = 2 * c  # two waves: at c=1 its steps are slow enough that more would take minutes
            tokens, ttfts, latencies = 0, [], []
            start = time.perf_counter()
            for wave in range(0, total, c):
                batch = [ids[i % len(ids)] for i in range(wave, min(total, wave + c))]
                out = model.generate_batch(batch, generation_config=gen, continuous_batching_config=cfg,
                                           record_timestamps=True)
                for o in out.values():
                    tokens += len(o.generated_tokens)
                    ttfts.append(o.timestamps[0] - o.created_time)
                    latencies.append(o.timestamps[-1] - o.created_time)
        except Exception as e:  # a probe: its failure is a result too
            keep({"engine": "transformers-cb", "concurrency": c, "error": f"{type(e).__name__}: {e}"[:500]})
            continue
        keep(row("transformers-cb", c, tokens, time.perf_counter() - start, ttfts, latencies, mode="waves"))


def check_graphs(model_dir: Path, texts: list[str], args) -> dict:
    """Do replayed CUDA graphs decode what eager steps decode? The same greedy requests, batched, through an
    engine with graphs and one without (float32, so the two differ only where kernels of other shapes
    round differently): the share of requests whose tokens match, and of tokens before a row first differs."""
    from serving.generation import Engine

    outputs = {}
    for graphs in (True, False):
        engine = Engine(str(model_dir), "alpaca", 32, args.max_prompt_tokens, dtype="float32", max_batch_size=16,
                        graphs=graphs, compile=graphs and args.compile != ["off"])
        jobs = [engine.prepare({"kind": "completion", "prompt": " ".join(t.split()[:40]), "max_tokens": 32,
                                "temperature": 0.0, "ignore_eos": True}) for t in texts[:16]]
        engine.generate(jobs)
        outputs[graphs] = ([j.tokens for j in jobs], engine.decoder.graphs_on)
        engine.close()
    (graphed, on), (eager, _) = outputs[True], outputs[False]
    same = sum(a == b for a, b in zip(graphed, eager, strict=True))
    prefix = sum(next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))
                 for a, b in zip(graphed, eager, strict=True))
    return {"check": "cuda graphs vs eager", "cuda_graphs": on, "requests_equal": f"{same}/{len(graphed)}",
            "tokens_before_first_difference": f"{prefix}/{sum(map(len, graphed))}"}


def label(r: dict) -> str:
    return r["engine"] + (f" ({r['compile']})" if r.get("compile", "off") != "off" else "")


def fmt(r: dict) -> str:
    return (f"{label(r):<18} c={r['concurrency']:<4} {r['output_tokens_per_s']:10.1f} tok/s   ttft p50 "
            f"{r['ttft_p50_s']:.3f}s p95 {r['ttft_p95_s']:.3f}s   latency p50 {r['latency_p50_s']:.3f}s "
            f"p95 {r['latency_p95_s']:.3f}s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", help="a Hugging Face model folder (else --llama-1b)")
    parser.add_argument("--llama-1b", action="store_true", help="random-init Llama-3.2-1B shape, bf16 (GPU)")
    parser.add_argument("--levels", default="1,8,32,128", help="concurrency levels (default 1,8,32,128)")
    parser.add_argument("--requests", type=int, default=64, help="requests per level, at least 2x the level")
    parser.add_argument("--max-tokens", type=int, default=128, help="new tokens per request (default 128)")
    parser.add_argument("--mixed", action="store_true",
                        help="each request's max_tokens drawn between 1/8 of --max-tokens and all of it")
    parser.add_argument("--prompt-words", type=int, default=200, help="words per prompt (default 200)")
    parser.add_argument("--max-prompt-tokens", type=int, default=512, help="the engine's prompt limit")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--engines", default="tuneline,baseline",
                        help="of tuneline, tuneline-served (through Ray Serve and HTTP), baseline, transformers-cb")
    parser.add_argument("--compile", default="off",
                        help="tuneline's variants, run one after the other: of off, decode (the decode step "
                             "torch.compile'd), all (and the prefill: serving.compile_decode), frozen (all, "
                             "the step frozen: fused projections), one-row (all, and a step of one row compiled "
                             "for one row alone); GPU: minutes at each compiled engine's start")
    parser.add_argument("--check-graphs", action="store_true",
                        help="GPU: first compare CUDA-graph and eager decoding on a small float32 model")
    parser.add_argument("--port", type=int, default=8123, help="for tuneline-served")
    parser.add_argument("--out", type=Path, default=None, help="JSON Lines to append to (default bench/results/"
                                                                "serve_h200.jsonl on GPU, serve_cpu.jsonl on CPU)")
    args = parser.parse_args()
    if not args.model and not args.llama_1b:
        parser.error("give a model folder or --llama-1b")
    if args.mixed and "transformers-cb" in args.engines:
        parser.error("--mixed: transformers-cb takes one max_tokens for all its requests")
    gpu = torch.cuda.is_available()
    if args.threads:
        torch.set_num_threads(args.threads)
    levels = [int(x) for x in args.levels.split(",")]
    args.compile = args.compile.split(",")
    if set(args.compile) - set(VARIANTS):
        parser.error(f"--compile: {args.compile}: each of {', '.join(VARIANTS)}")
    engines = args.engines.split(",")
    out = args.out or RESULTS / ("serve_h200.jsonl" if gpu else "serve_cpu.jsonl")

    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="serve-bench-") as tmp:
        model_dir = Path(args.model).resolve() if args.model else build_model("llama-1b", Path(tmp) / "model")
        texts = prompts(64, args.prompt_words)
        tok = AutoTokenizer.from_pretrained(model_dir)
        dtype = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if gpu else torch.float32
        device = (torch.cuda.get_device_name(0) if gpu
                  else f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads)")
        prompt_tokens = statistics.mean(len(tok(t)["input_ids"]) for t in texts)
        meta = {"device": device, "model": args.model or "random-init Llama-3.2-1B shape", "dtype": str(dtype)[6:],
                "max_tokens": args.max_tokens, "mixed_max_tokens": args.mixed,
                "prompt_tokens_mean": round(prompt_tokens, 1),
                "date": datetime.now(UTC).strftime("%Y-%m-%d"), "torch": torch.__version__}
        print(f"{meta}", flush=True)
        rows: list[dict] = []
        out.parent.mkdir(parents=True, exist_ok=True)

        def keep(r: dict) -> dict:  # written at once: a run cut short still leaves what it measured
            rows.append({**r, **meta})
            with out.open("a") as f:
                f.write(json.dumps(rows[-1]) + "\n")
            print(fmt(r) if "output_tokens_per_s" in r else json.dumps(r), flush=True)
            return r

        if args.check_graphs and gpu:
            keep(check_graphs(build_model("tiny", Path(tmp) / "tiny"), texts, args))
        if "tuneline" in engines:  # first: it loads the model itself, and frees it before the others load theirs
            for variant in args.compile:
                run_tuneline(model_dir, texts, levels, args, keep, variant)
                gc.collect()  # the variant's model and graphs, before the next one loads
                torch._dynamo.reset()  # and what it compiled: each variant compiles afresh (train_bench.fresh_start)
                if gpu:
                    torch.cuda.empty_cache()
        if "tuneline-served" in engines:
            run_served(model_dir, texts, levels, args, keep)
        gc.collect()
        if gpu:
            torch.cuda.empty_cache()
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to("cuda" if gpu else "cpu").eval()
        limit = keep(measure_limit(model))
        print(f"limit: weights {limit['weights_gib']} GiB, copy {limit['copy_tb_s']} TB/s -> "
              f"{limit['c1_limit_tokens_per_s']} tokens/s at concurrency 1", flush=True)
        if "baseline" in engines:
            run_baseline(model, tok, texts, levels, args, keep)
        if "transformers-cb" in engines:
            run_transformers_cb(model, tok, texts, levels, args, keep)

    by = {(label(r), r["concurrency"]): r["output_tokens_per_s"] for r in rows if "output_tokens_per_s" in r}
    columns = list(dict.fromkeys(name for name, _ in by))
    print(f"\nconcurrency | {' | '.join(f'{e:>18}' for e in columns)} | best tuneline / baseline c=1 (unbatched)")
    for c in levels:
        ours = [by[(e, c)] for e in columns if e.startswith("tuneline") and (e, c) in by]
        ratio = f"{max(ours) / by[('baseline', 1)]:.2f}x" if ours and ("baseline", 1) in by else "- (no baseline)"
        cells = [f"{by[(e, c)]:18.1f}" if (e, c) in by else f"{'-':>18}" for e in columns]
        print(f"{c:>11} | {' | '.join(cells)} | {ratio}")
    print(f"appended {len(rows)} rows to {out}")


if __name__ == "__main__":
    main()
