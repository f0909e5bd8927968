"""Adapters bench: the first request to a cold adapter against one to a warm adapter, and the memory that each
loaded adapter takes (serving/adapters.py: Ray Serve model multiplexing over one shared base).

One AdapterServer replica on a local Ray cluster serves a random-init base and --adapters LoRA adapters with
random weights (params' default lora section: r 16 on all seven projections), all folders but the first two,
which come from the MLflow registry (SQLite in a temp folder). At most --max-loaded stay loaded. Every figure is a
request's latency as an HTTP client sees it (completions, --max-tokens tokens each, ignore_eos):

- warm:   a request to an adapter that is loaded (and to the base, adapters off, for reference);
- cold:   the first request to an adapter from a folder (the replica reads it, injects it into its PEFT model,
          evicting the least recently used one when full);
- cold, registry: the same for a registry adapter, downloading it from MLflow first (the first one also
          pays the replica's first `import mlflow`);
- reload: a request to an adapter that was evicted (registry adapters are cached on disk: no download).

Memory: the bytes of each loaded adapter's weights as the replica counts them (parameter bytes), and the
replica process's resident memory (RSS) before and after it loads adapters, per adapter.

    python bench/adapters_bench.py                    # CPU: a small Llama (hidden 1024, 8 layers), fp32
    python bench/adapters_bench.py --shape tiny       # the embedded default's base shape
    python bench/adapters_bench.py --shape llama-1b   # GPU: a Llama-3.2-1B shape, bf16

Imports only torch, peft, ray[serve], httpx, psutil, mlflow (and this repo's bench/, serving/ and tasks/).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from serve_bench import build_model, prompts  # this folder; it puts the repo on sys.path

APP = "adapters-bench"
REGISTERED = 2  # adapters from the MLflow registry: the first pays the replica's `import mlflow`
SMALL = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=8, num_attention_heads=16,
             num_key_value_heads=16)  # adapters of a size whose memory shows above the noise of a process's RSS


def build_base(shape: str, dest: Path) -> Path:
    """serve_bench's random-init model (and tokenizer); for `small`, its tiny one at the SMALL shape."""
    if shape != "small":
        return build_model(shape, dest)
    from transformers import AutoConfig, LlamaForCausalLM

    build_model("tiny", dest)
    config = AutoConfig.from_pretrained(dest)
    config.update(SMALL)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(dest, safe_serialization=True)
    return dest


def make_adapters(base: Path, n: int, dest: Path) -> list[Path]:
    """`n` LoRA adapters with random (not identity) weights, each seeded apart."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tuneline.config import Lora

    lora = Lora()
    model = AutoModelForCausalLM.from_pretrained(base)
    folders = []
    for i in range(n):
        torch.manual_seed(i)
        peft = get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, target_modules=lora.target_modules,
                                                init_lora_weights=False))
        peft.save_pretrained(dest / f"adapter-{i}")
        folders.append(dest / f"adapter-{i}")
        model = peft.unload()
    return folders


def replica_rss() -> int:
    import psutil

    (proc,) = [p for p in psutil.process_iter(["cmdline"]) if "AdapterServer" in " ".join(p.info["cmdline"] or [])]
    return proc.memory_info().rss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=["small", "tiny", "llama-1b"], default="small",
                        help="random-init base: small (CPU, default), tiny, llama-1b (a GPU, bf16)")
    parser.add_argument("--adapters", type=int, default=6)
    parser.add_argument("--max-loaded", type=int, default=4, help="serving.adapters.max_loaded")
    parser.add_argument("--repeats", type=int, default=5, help="warm requests per adapter")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--port", type=int, default=8124)
    args = parser.parse_args()
    if not REGISTERED <= args.max_loaded < args.adapters:
        parser.error(f"need {REGISTERED} <= --max-loaded < --adapters, so that loading them all evicts some")

    import httpx
    import ray
    from ray import serve

    from serving.adapters import adapter_app, register_adapter
    from serving.model_source import CACHE_ENV
    from tuneline.config import Params

    with tempfile.TemporaryDirectory(prefix="adapters-bench-") as tmp:
        root = Path(tmp)
        base = build_base(args.shape, root / "base")
        folders = make_adapters(base, args.adapters, root)
        tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
        sources = [f"models:/bench-adapter-{i}/"
                   + register_adapter(folders[i], f"bench-adapter-{i}", tracking_uri,
                                      artifact_location=(root / "mlartifacts").as_uri()) for i in range(REGISTERED)]
        sources += [str(f) for f in folders[REGISTERED:]]
        names = [f"a{i}" for i in range(args.adapters)]
        params = Params(model={"base": str(base)}, registry={"tracking_uri": tracking_uri},
                        serving={"max_prompt_tokens": 4096, "adapters": {
                            "max_loaded": args.max_loaded,
                            "served": [{"name": n, "source": s} for n, s in zip(names, sources, strict=True)]}})
        gpu = torch.cuda.is_available()
        device = torch.cuda.get_device_name(0) if gpu else f"CPU ({os.cpu_count()} cores, replica: 1 thread)"
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(base)
        print(f"base: random-init {args.shape} (llama, hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers, "
              f"vocab {cfg.vocab_size}); device: {device}\nadapters: {args.adapters} (a0, a1 from the MLflow "
              "registry, the rest folders), "
              f"max_loaded {args.max_loaded}; requests: completions, {args.max_tokens} tokens (ignore_eos), "
              "one at a time", flush=True)

        os.environ[CACHE_ENV] = str(root / "cache")  # the replica's registry downloads go with the temp folder
        ray.init(address="local", include_dashboard=False, log_to_driver=False, logging_level="WARNING")
        serve.start(http_options={"host": "127.0.0.1", "port": args.port})
        serve.run(adapter_app(params), name=APP, route_prefix="/")
        handle = serve.get_deployment_handle("AdapterServer", APP)
        text = prompts(1, 16)[0]
        http = httpx.Client(base_url=f"http://127.0.0.1:{args.port}/v1", timeout=900)

        def ask(model: str) -> float:
            start = time.perf_counter()
            r = http.post("/completions", json={"model": model, "prompt": text, "max_tokens": args.max_tokens,
                                                "temperature": 0, "ignore_eos": True})
            r.raise_for_status()
            return time.perf_counter() - start

        try:
            for _ in range(3):
                ask("base")  # warm-up: the replica's first generations
            rss = [replica_rss()]
            cold = {}
            for name in names:  # the last ones evict the first ones
                cold[name] = ask(name)
                rss.append(replica_rss())
            sizes = handle.loaded_adapters.remote().result()
            loaded = names[-args.max_loaded:]
            warm, base_warm = [], []
            for _ in range(args.repeats):  # interleaved, so that both see the same load on the machine
                base_warm.append(ask("base"))
                warm += [ask(name) for name in loaded]
            reload = [ask(name) for name in names[:args.adapters - args.max_loaded]]  # each evicts the LRU one
        finally:
            http.close()
            serve.shutdown()
            ray.shutdown()

    def ms(values: list[float]) -> str:
        return f"{1000 * statistics.median(values):8.1f} ms  (median of {len(values)})"

    grew = [b - a for a, b in zip(rss[:args.max_loaded], rss[1:args.max_loaded + 1], strict=True)]
    print(f"warm, base (adapters off)       {ms(base_warm)}")
    print(f"warm, adapter loaded            {ms(warm)}")
    print(f"cold, adapter from a folder     {ms([cold[n] for n in names[REGISTERED:]])}")
    for name in names[:REGISTERED]:
        print(f"cold, {name} from the registry   {ms([cold[name]])}  (download included"
              f"{', and the first import mlflow' if name == names[0] else ''})")
    print(f"reload after eviction           {ms(reload)}  ({', '.join(names[:len(reload)])}; registry ones from "
          "the disk cache)")
    print(f"adapter weights, loaded         {statistics.median(sizes.values()) / 2**20:8.2f} MiB per adapter "
          f"(parameter bytes, {len(sizes)} loaded)")
    print(f"replica RSS, loading adapters   {statistics.median(grew) / 2**20:8.2f} MiB per adapter "
          f"(median of {len(grew)} loads without eviction; RSS {rss[0] / 2**20:.0f} MiB before)")


if __name__ == "__main__":
    main()
