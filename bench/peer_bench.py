"""Training speed against the peer a skilled user would pick: TRL's SFTTrainer with Liger kernels.

One process, one GPU, the same random-init Llama shape, the same rows (bench/train_bench.py
`make_data`), the same LoRA (r 16, alpha 32, all seven projections), batch and bf16. Tuneline's
side is bench/train_bench.py's `tuneline` run (the train stage's engine with its GPU defaults:
packed rows, chunked loss, torch.compile). The peer runs `SFTTrainer(use_liger_kernel=True)` in
each reasonable configuration: eager or compiled, padding-free or padded; packed rows use the
attention kernel Tuneline uses (flex attention), padded ones SDPA. The best peer run is the one
to beat.

    python bench/peer_bench.py --shape llama-1b --data variable --bs 8 --steps 30 --rehearse
    python bench/peer_bench.py --shape llama-8b --data fixed --bs 4 --ckpt --skip-ckpt-layers 5 --steps 10 --rehearse \
        --peers trl-liger-eager-padded,trl-liger-compiled-padded
    python bench/peer_bench.py ... --batch-tokens 16384   # Tuneline with train.batch_tokens
    python bench/peer_bench.py ... --ours tuneline,tuneline-regions   # also train.compile_regions
    python bench/peer_bench.py ... --steps 3 --rehearse --memory-peak   # what is live at each run's peak, by line
    python bench/peer_bench.py ... --ours tuneline,tuneline-peft-lora   # also with train.fused_lora off
    python bench/peer_bench.py ... --ours tuneline,tuneline-graphs --rehearse
        # also CUDA graphs (train.compile_mode reduce-overhead, rows padded to multiples of --pad-to-multiple)

`--rehearse`: every run's warm-up is its timed steps themselves, the same batches in the same order
(sequential sampling, so the warm-up count is --steps): each run meets every step size before the clock
starts. A run that compiles or records a CUDA graph per new size is then timed at its steady state, as
in a long training run where sizes recur, and not on its first meetings with them.

Prints one JSON line per run and a ratio line per workload; `--out` appends them (JSON Lines,
bench/results/peer_h200.jsonl): per run {"engine", "shape", "data", "nonpad_tokens_per_s",
"train_peak_mem_gib", "mfu", ...}; per workload {"ratio": "tuneline/best-peer", "shape", "data",
"speed", "memory", "best_peer"}.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))
import memory_peak  # noqa: E402
import train_bench as tb  # noqa: E402 - the shapes, rows, FLOP count and Tuneline's run are shared


def peer(args, rows: list[dict], data_kind: str, compiled: bool, padding_free: bool) -> dict:
    """TRL's SFTTrainer with Liger's kernels on the same rows: completion-only loss from the rows' labels."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from tasks.bootstrap.tiny import build_tokenizer

    tb.fresh_start()
    model = tb.model_for(args.shape, args.seq, "flex_attention" if padding_free else "sdpa")
    per_tok = tb.flops_per_token(model, args.seq, args.ckpt)
    data = Dataset.from_list([{"input_ids": r["input_ids"],
                               "completion_mask": [int(label != -100) for label in r["labels"]]} for r in rows])
    tokenizer = build_tokenizer(["bench"], 300)
    config = SFTConfig(
        output_dir=tempfile.mkdtemp(prefix="peer-bench-"), per_device_train_batch_size=args.peer_bs,
        max_steps=args.warmup + args.steps, learning_rate=1e-4, lr_scheduler_type="constant", bf16=True,
        logging_steps=10**6, save_strategy="no", report_to="none", disable_tqdm=True,
        use_liger_kernel=True, padding_free=padding_free, torch_compile=compiled, max_length=None,
        completion_only_loss=True, gradient_checkpointing=args.ckpt,  # rows are already at most --seq long
        gradient_checkpointing_kwargs={"use_reentrant": False}, include_num_input_tokens_seen="non_padding",
        dataloader_drop_last=True, dataset_num_proc=1,
        train_sampling_strategy="sequential" if args.rehearse else "random")
    marks: dict[int, tuple[float, int]] = {}
    peaks: dict = {}

    class Clock(TrainerCallback):
        def on_train_begin(self, a, state, control, **kw):
            tb.built(peaks)  # the model is on the GPU with its adapter: training's peak counts from here
            marks[-1] = (time.perf_counter(), 0)

        def on_step_end(self, a, state, control, **kw):
            if state.global_step in (args.warmup, args.warmup + args.steps):
                torch.cuda.synchronize()
                marks[state.global_step] = (time.perf_counter(), state.num_input_tokens_seen)

    trainer = SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer,
                         peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM",
                                                target_modules=tb.TARGETS), callbacks=[Clock()])
    trainer.train()
    (t0, n0), (t1, n1) = marks[args.warmup], marks[args.warmup + args.steps]
    step_s = (t1 - t0) / args.steps
    real = (n1 - n0) / args.steps
    name = f"trl-liger-{'compiled' if compiled else 'eager'}-{'padding-free' if padding_free else 'padded'}"
    out = tb.result(name, data_kind, args, step_s, real, real, per_tok, peaks) | {
        "bs": args.peer_bs, "warmup_s": round(t0 - marks[-1][0], 1)}
    del trainer, model
    return out


PEER_RUNS = {  # name -> (compiled, padding_free)
    "trl-liger-eager-padding-free": (False, True),
    "trl-liger-compiled-padding-free": (True, True),
    "trl-liger-eager-padded": (False, False),
    "trl-liger-compiled-padded": (True, False),
}


def one_run(args, run: str, ours: list[str], rows: list[dict]) -> dict:
    if run not in ours:
        return peer(args, rows, args.data, *PEER_RUNS[run])
    graphs = run == "tuneline-graphs"
    settings = {"compile_mode": "reduce-overhead" if graphs else "default",
                "pad_to_multiple": args.pad_to_multiple if graphs else 0,
                "regions": run == "tuneline-regions", "fused_lora": False if run == "tuneline-peft-lora" else "auto"}
    return tb.tuneline(argparse.Namespace(**(vars(args) | settings)), rows, args.data)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama-1b", choices=sorted(tb.SHAPES))
    ap.add_argument("--data", default="variable", choices=["fixed", "variable"])
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--bs", type=int, default=8)
    ap.add_argument("--ckpt", action="store_true", help="gradient checkpointing (both sides)")
    ap.add_argument("--warmup", type=int, default=6)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--peers", default=",".join(PEER_RUNS),
                    help="peer configurations to run (fixed-length rows need no padding-free variant)")
    ap.add_argument("--skip-ckpt-layers", type=int, default=0, help="train.checkpoint_skip_layers for Tuneline")
    ap.add_argument("--loss-chunk-tokens", type=int, default=512, help="train.loss_chunk_tokens for Tuneline")
    ap.add_argument("--batch-tokens", type=int, default=0,
                    help="train.batch_tokens for Tuneline (0: off); the peer then gets as many examples a step as "
                         "fill the same number of tokens on average")
    ap.add_argument("--ours", default="tuneline",
                    help="Tuneline runs, comma-separated: tuneline (its defaults), tuneline-regions "
                         "(train.compile_regions), tuneline-graphs (train.compile_mode reduce-overhead, CUDA graphs), "
                         "tuneline-peft-lora (train.fused_lora false: PEFT's LoRA forward)")
    ap.add_argument("--pad-to-multiple", type=int, default=256,
                    help="train.pad_to_multiple of the tuneline-graphs run: its steps come in fewer sizes")
    ap.add_argument("--rehearse", action="store_true",
                    help="warm up on the timed steps' own batches, in order (--warmup is then --steps)")
    ap.add_argument("--memory-peak", action="store_true",
                    help="record the allocator's history in each run and print what is live at its peak, by the "
                         "line that allocated it (bench/memory_peak.py; use few --steps)")
    ap.add_argument("--out", default=None, help="append results as JSON lines here")
    args = ap.parse_args()
    args.no_packing = args.no_chunked = args.no_compile = False  # train_bench's Tuneline run: its GPU defaults
    ours = [name for name in args.ours.split(",") if name]
    unknown = set(ours) - {"tuneline", "tuneline-regions", "tuneline-graphs", "tuneline-peft-lora"}
    if unknown:
        ap.error(f"--ours: unknown runs {sorted(unknown)}")
    if args.rehearse and args.batch_tokens:
        ap.error("--rehearse reads the rows in order; train.batch_tokens draws its own batches")
    if args.rehearse:
        args.warmup = args.steps
    print("torch", torch.__version__, torch.cuda.get_device_name(), flush=True)

    def emit(line: dict) -> None:
        line |= {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"),
                 "transformers": transformers.__version__}
        line |= {"rehearse": True} if args.rehearse else {}
        print(json.dumps(line), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(line) + "\n")

    vocab = tb.SHAPES[args.shape]["vocab_size"]
    mean_length = sum(len(r["input_ids"]) for r in tb.make_data(args.data, 1000, args.seq, vocab)) / 1000
    args.peer_bs = max(1, round(args.batch_tokens / mean_length)) if args.batch_tokens else args.bs
    if args.rehearse:  # the warm-up's batches are the timed ones: the rows twice, read in order
        timed = tb.make_data(args.data, args.steps * max(args.bs, args.peer_bs), args.seq, vocab)
        rows = timed + timed
    else:
        rows = tb.make_data(args.data, (args.warmup + args.steps + 2) * max(args.bs, args.peer_bs), args.seq, vocab)
    results = {}
    for run in [*ours, *filter(None, args.peers.split(","))]:
        recording = memory_peak.recorded() if args.memory_peak else contextlib.nullcontext({})
        rec: dict = {}
        try:
            with recording as rec:
                r = one_run(args, run, ours, rows)
        except Exception as e:  # one configuration failing (OOM, a kernel that won't compile) must not hide the rest
            r = {"engine": run, "shape": args.shape, "data": args.data, "failed": f"{type(e).__name__}: {str(e)[:300]}"}
            torch.cuda.empty_cache()
        if "snapshot" in rec:
            print(f"{run}: {memory_peak.report(rec.pop('snapshot'))}", flush=True)
        results[run] = r
        emit(r)
    mine = [results[name] for name in ours if "nonpad_tokens_per_s" in results[name]]
    peers = [r for name, r in results.items() if name not in ours and "nonpad_tokens_per_s" in r]
    if mine and peers:
        best, top = (max(rs, key=lambda r: r["nonpad_tokens_per_s"]) for rs in (peers, mine))
        emit({"ratio": "tuneline/best-peer", "shape": args.shape, "data": args.data, "best_peer": best["engine"],
              "tuneline": top["engine"], "batch_tokens": args.batch_tokens, "peer_bs": args.peer_bs,
              "speed": round(top["nonpad_tokens_per_s"] / best["nonpad_tokens_per_s"], 3),
              "memory": round(top["train_peak_mem_gib"] / best["train_peak_mem_gib"], 3)})


if __name__ == "__main__":
    main()
