"""Training speed: the plain PEFT loop (shared/bench/plain_peft_baseline.py) against Tuneline's engine.

Both run in this process on the same random-init Llama shape, the same data and
the same GPU. The baseline is the hand-written loop a transformers + peft user
writes (padded batches, full logits, loss inside the model). Tuneline's side is
`tuneline.training.trainer.build_trainer` with params: the real collator (packing), the
chunked loss, torch.compile, gradient checkpointing as configured.

Two datasets: fixed length (every row `seq` tokens: the shared baseline's setting)
and variable length (instruction-like: log-normal lengths, mean near 300, tail to
`seq`, the first third of each example is prompt and carries no loss), where the
baseline pads every batch to its longest row.

    python bench/train_bench.py --shape llama-1b --bs 8                # one GPU
    python bench/train_bench.py --shape llama-8b --bs 4 --ckpt
    python bench/train_bench.py --shape llama-8b --qlora          # QLoRA vs bf16 LoRA: memory and loss
Prints one JSON line per run and a ratio line per dataset.

`--qlora` saves the random-init shape to disk (QLoRA quantizes while loading, through
tuneline.models.load_model as the train stage does), then trains `lora.method: qlora`
and `lora` on the same learnable data (Zipf-distributed tokens from a 2,000-token
subset, a 64-token motif repeating through each row), batch 1, checkpointing, and
prints each run's peak memory and its mean loss over the last 50 steps.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import memory_peak  # noqa: E402 - bench/, beside this file: peer_bench.py's --memory-peak

SHAPES = {
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256),
    "llama-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1000),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PEAK = float(os.environ.get("PEAK_TFLOPS", "790")) * 1e12


def make_data(kind: str, n: int, seq: int, vocab: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    if kind == "fixed":
        lengths = [seq] * n
    else:
        # log-normal with median ~220 and mean ~300 tokens, clipped to [16, seq]
        raw = torch.exp(torch.randn(n, generator=g) * 0.8 + math.log(220))
        lengths = [int(min(max(x, 16), seq)) for x in raw]
    rows = []
    for length in lengths:
        ids = torch.randint(0, vocab, (length,), generator=g).tolist()
        prompt = length // 3 if kind != "fixed" else 0
        rows.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return rows


def pattern_data(n: int, seq: int, vocab: int) -> list[dict]:
    """Learnable rows: a Zipf unigram over 2,000 token ids, each row a 64-token motif repeated."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randperm(vocab, generator=g)[:2000]
    zipf = 1.0 / torch.arange(1, len(ids) + 1, dtype=torch.float64)
    rows = []
    for _ in range(n):
        motif = ids[torch.multinomial(zipf, 64, replacement=True, generator=g)].tolist()
        row = (motif * (seq // 64 + 1))[:seq]
        rows.append({"input_ids": row, "labels": row})
    return rows


def model_for(shape: str, seq: int, attn: str = "sdpa"):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**SHAPES[shape], max_position_embeddings=seq, attn_implementation=attn)
    torch.manual_seed(0)
    with torch.device("cuda"):
        return LlamaForCausalLM(cfg).to(torch.bfloat16)


def flops_per_token(model, seq: int, ckpt: bool) -> float:
    """The shared baseline's count: matmul FLOPs per token for LoRA (frozen weights fwd + input-grad bwd)."""
    cfg = model.config
    n_mm = sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()
    attn = 2 * 2 * cfg.num_hidden_layers * seq * cfg.hidden_size / 2
    return (4 + (2 if ckpt else 0)) * n_mm + (2 + 2 + (1 if ckpt else 0)) * attn


def built(peaks: dict) -> None:
    """Call once the model is built: keeps the build's peak, then measures training on its own.

    The shared baseline resets the peak before building the model in fp32, so its figure is mostly
    the build (30 GiB for 8B); the training peak, counted from here, is what the engine changes."""
    torch.cuda.synchronize()
    peaks["build"] = torch.cuda.max_memory_allocated() / 2**30
    torch.cuda.reset_peak_memory_stats()
    memory_peak.train_starts()


def result(name, data_kind, args, step_s, tokens, real_tokens, per_tok, peaks) -> dict:
    train_peak = torch.cuda.max_memory_allocated() / 2**30
    return {"engine": name, "data": data_kind, "shape": args.shape, "seq": args.seq, "bs": args.bs,
            "ckpt": args.ckpt, "step_s": round(step_s, 4), "tokens_per_s": round(tokens / step_s),
            "nonpad_tokens_per_s": round(real_tokens / step_s),
            "padding_fraction": round(1 - real_tokens / tokens, 4),
            "mfu": round(real_tokens / step_s * per_tok / PEAK, 3),
            "peak_mem_gib": round(max(peaks["build"], train_peak), 1), "train_peak_mem_gib": round(train_peak, 2)}


def fresh_start() -> None:
    """Before each run: free memory, reset the peak, and drop what torch.compile compiled for earlier runs.

    Every run compiles the same transformers layer code, and dynamo's caches and its recompile limit (8 per code
    object) are per process: a run after others would find that limit spent and run those frames eagerly (seen
    on an H100: `torch._dynamo hit config.recompile_limit (8)` at the second run's first step, and every later
    run slowed; bench/results/peer_h100.txt).

    The limit is raised too, for every run alike: within one run of TRL's compiled peer, transformers' deprecation
    wrapper (one code object shared by every decorated forward) spent it on its own, and the frames past it ran
    eagerly (bench/results/peer_h100.txt, 2026-12-05 afternoon).

    Then a collection, after dynamo has let go of what it compiled: a Trainer sits in reference cycles, so the last
    run's model outlived it until Python's collector happened to run, and counted in the next run's peak (seen on
    an H100: 15.1 GiB of an 8B model left from the run before; bench/results/peer_h100.txt, 2026-12-06)."""
    torch._dynamo.reset()
    gc.collect()
    torch._dynamo.config.recompile_limit = 64
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def baseline(args, rows, data_kind, compile_: bool) -> dict:
    """The shared baseline loop, with padded batches of `rows`."""
    from peft import LoraConfig, get_peft_model

    fresh_start()
    model = model_for(args.shape, args.seq)
    per_tok = flops_per_token(model, args.seq, args.ckpt)
    if args.ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM",
                                             target_modules=TARGETS))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
    peaks: dict = {}
    built(peaks)
    fwd = torch.compile(model) if compile_ else model
    batches = [rows[i:i + args.bs] for i in range(0, len(rows) - args.bs + 1, args.bs)]

    def pad(batch):
        n = max(len(r["input_ids"]) for r in batch)
        ids = torch.tensor([r["input_ids"] + [0] * (n - len(r["input_ids"])) for r in batch], device="cuda")
        mask = torch.tensor([[1] * len(r["input_ids"]) + [0] * (n - len(r["input_ids"])) for r in batch],
                            device="cuda")
        labels = torch.tensor([r["labels"] + [-100] * (n - len(r["labels"])) for r in batch], device="cuda")
        return ids, mask, labels

    def step(batch):
        ids, mask, labels = pad(batch)
        fwd(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return ids.numel(), int(mask.sum())

    for b in batches[:args.warmup]:
        step(b)
    torch.cuda.synchronize()
    t, tokens, real = time.perf_counter(), 0, 0
    for b in batches[args.warmup:args.warmup + args.steps]:
        a, r = step(b)
        tokens, real = tokens + a, real + r
    torch.cuda.synchronize()
    out = result("baseline" + ("-compiled" if compile_ else ""), data_kind, args,
                 (time.perf_counter() - t) / args.steps, tokens / args.steps, real / args.steps, per_tok, peaks)
    return out


def tuneline(args, rows, data_kind, method: str = "lora", model_dir: Path | None = None) -> dict:
    """Tuneline's engine: tuneline.training.trainer.build_trainer with the params below, timed between steps.

    With `model_dir` the model loads as the train stage loads it (4-bit for qlora)."""
    from transformers import TrainerCallback

    from tasks.bootstrap.tiny import build_tokenizer
    from tuneline.config import Params
    from tuneline.training.trainer import attention, build_trainer, load_base, training_args, with_adapter

    fresh_start()
    work = Path(tempfile.mkdtemp(prefix="train-bench-"))
    default_for_qlora = "auto" if method == "qlora" else False  # as the train stage runs it: eager, padded
    params = Params.model_validate({"train": {
        "batch_size": args.bs, "max_steps": args.warmup + args.steps, "save_steps": 10**6,
        "logging_steps": 10 if model_dir else 10**6,
        "learning_rate": 1e-4, "lr_scheduler": "constant", "warmup_ratio": 0.0, "bf16": True,
        "gradient_checkpointing": args.ckpt, "packing": default_for_qlora or not args.no_packing,
        "chunked_loss": not args.no_chunked,
        "compile": default_for_qlora or not args.no_compile,
        "output_dir": str(work / "adapter"), "checkpoint_dir": str(work / "ckpt"),
        "checkpoint_skip_layers": args.skip_ckpt_layers, "loss_chunk_tokens": args.loss_chunk_tokens,
        "batch_tokens": getattr(args, "batch_tokens", 0), "pad_to_multiple": getattr(args, "pad_to_multiple", 0),
        "compile_mode": getattr(args, "compile_mode", "default"),
        "compile_regions": getattr(args, "regions", False), "fused_lora": getattr(args, "fused_lora", "auto")},
        "lora": {"method": method, "r": 16, "alpha": 32, "target_modules": TARGETS},
        "model": {"base": str(model_dir or work / "unused"), "dtype": "bfloat16"}})
    targs = training_args(params, has_eval=False)
    targs.dataloader_drop_last = True
    if getattr(args, "rehearse", False):  # bench/peer_bench.py: the rows are read in order
        targs.train_sampling_strategy = "sequential"
    if model_dir:
        base = load_base(params)
    else:
        base = model_for(args.shape, args.seq, attention(params) or "sdpa")
    model = with_adapter(base, params)
    peaks: dict = {}
    built(peaks)
    per_tok = flops_per_token(model.get_base_model(), args.seq, args.ckpt)
    marks: dict[int, tuple[float, int]] = {}

    class Clock(TrainerCallback):
        def on_train_begin(self, a, state, control, **kw):
            marks[-1] = (time.perf_counter(), 0)

        def on_step_end(self, a, state, control, **kw):
            if state.global_step in (args.warmup, args.warmup + args.steps):
                torch.cuda.synchronize()
                marks[state.global_step] = (time.perf_counter(), state.num_input_tokens_seen)

    tokenizer = build_tokenizer(["bench"], 300)
    trainer, restore = build_trainer(params, targs, model, tokenizer, rows,
                                     callbacks=[Clock()])
    trainer.train()
    restore()
    (t0, n0), (t1, n1) = marks[args.warmup], marks[args.warmup + args.steps]
    step_s = (t1 - t0) / args.steps
    real = (n1 - n0) / args.steps
    name = "tuneline" + "".join(f"-no{k}" for k in ("packing", "chunked", "compile") if getattr(args, f"no_{k}"))
    name += f"-{method}" if model_dir else ""
    name += "-graphs" if params.train.compile_mode == "reduce-overhead" else ""
    name += "-regions" if params.train.compile_regions else ""
    name += "-peft-lora" if params.train.fused_lora is False else ""
    # Trainer counts non-padding tokens only: with packing there is no padding to count.
    out = result(name, data_kind, args, step_s, real, real, per_tok, peaks)
    out["warmup_s"] = round(t0 - marks[-1][0], 1)  # the warm-up steps with torch.compile's compilations
    out["loss_chunk_tokens"] = params.train.loss_chunk_tokens
    if args.skip_ckpt_layers:
        out["skip_ckpt_layers"] = args.skip_ckpt_layers
    for key in ("batch_tokens", "pad_to_multiple"):
        if getattr(args, key, 0):
            out[key] = getattr(args, key)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    if model_dir and losses:
        out["final_loss"] = round(sum(losses[-5:]) / len(losses[-5:]), 4)  # logged every 10 steps: the last 50
        out["first_loss"] = round(losses[0], 4)
    del trainer, model, base
    return out


def qlora_compare(args) -> None:
    """QLoRA against bf16 LoRA on the same saved model and data: peak memory and loss after the steps."""
    import shutil

    model_dir = Path(tempfile.mkdtemp(prefix="train-bench-model-"))
    model = model_for(args.shape, args.seq)
    model.save_pretrained(model_dir, safe_serialization=True)
    del model
    rows = pattern_data((args.warmup + args.steps + 2) * args.bs, args.seq, SHAPES[args.shape]["vocab_size"])
    results = {}
    for method in ("qlora", "lora"):
        torch.cuda.empty_cache()
        results[method] = tuneline(args, rows, "pattern", method, model_dir)
        print(json.dumps(results[method]), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(results[method]) + "\n")
    q, b = results["qlora"], results["lora"]
    print(json.dumps({"shape": args.shape, "qlora_peak_mem_gib": q["peak_mem_gib"],
                      "qlora_train_peak_mem_gib": q["train_peak_mem_gib"], "lora_peak_mem_gib": b["peak_mem_gib"],
                      "final_loss_qlora_vs_lora": round(q["final_loss"] / b["final_loss"], 4)}), flush=True)
    shutil.rmtree(model_dir, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama-1b", choices=sorted(SHAPES))
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--bs", type=int, default=8)
    ap.add_argument("--ckpt", action="store_true", help="gradient checkpointing (both sides)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--data", default="fixed,variable")
    ap.add_argument("--runs", default="baseline,baseline-compiled,tuneline")
    for k in ("packing", "chunked", "compile"):
        ap.add_argument(f"--no-{k}", action="store_true", help=f"Tuneline without {k}")
    ap.add_argument("--skip-ckpt-layers", type=int, default=0, help="train.checkpoint_skip_layers for Tuneline")
    ap.add_argument("--loss-chunk-tokens", type=int, default=512, help="train.loss_chunk_tokens for Tuneline")
    ap.add_argument("--qlora", action="store_true", help="QLoRA vs bf16 LoRA (memory, loss); bs 1, ckpt, 200 steps")
    ap.add_argument("--out", default=None, help="append results as JSON lines here")
    args = ap.parse_args()
    print("torch", torch.__version__, torch.cuda.get_device_name(), flush=True)
    if args.qlora:
        args.bs, args.ckpt, args.steps, args.warmup = 1, True, max(args.steps, 190), 10
        return qlora_compare(args)
    vocab = SHAPES[args.shape]["vocab_size"]
    for kind in args.data.split(","):
        rows = make_data(kind, (args.warmup + args.steps + 2) * args.bs, args.seq, vocab)
        results = {}
        for run in args.runs.split(","):
            try:
                r = tuneline(args, rows, kind) if run == "tuneline" else baseline(args, rows, kind,
                                                                                    run.endswith("compiled"))
            except Exception as e:  # an OOM in one run must not hide the others' figures
                r = {"engine": run, "data": kind, "failed": f"{type(e).__name__}: {str(e)[:300]}"}
                torch.cuda.empty_cache()
            results[run] = r
            print(json.dumps(r), flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(r) + "\n")
        t, b = results.get("tuneline", {}), results.get("baseline", {})
        if "nonpad_tokens_per_s" in t and "nonpad_tokens_per_s" in b:
            c = results.get("baseline-compiled", {})
            print(json.dumps({"data": kind, "shape": args.shape,
                              "ratio_vs_eager_nonpad": round(t["nonpad_tokens_per_s"] / b["nonpad_tokens_per_s"], 2),
                              "ratio_vs_compiled_nonpad": round(t["nonpad_tokens_per_s"] / c["nonpad_tokens_per_s"], 2)
                              if "nonpad_tokens_per_s" in c else None,
                              "peak_mem_vs_eager": round(t["peak_mem_gib"] / b["peak_mem_gib"], 2),
                              "train_peak_mem_vs_eager": round(t["train_peak_mem_gib"] / b["train_peak_mem_gib"],
                                                               2)}), flush=True)


if __name__ == "__main__":
    main()
