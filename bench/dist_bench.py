"""Distributed training bench: Tuneline's train engine on a 1B Llama shape, 1 vs N GPUs.

Runs the code path `tasks/train` uses (the TrainingArguments it builds, FSDP or
DeepSpeed settings from params `distributed`, TunelineTrainer, the adapter
save) on random-init weights and Zipf-distributed tokens (so the loss falls),
and prints one JSON line per run: tokens/s, loss at start and end, peak memory.

    torchrun --nproc-per-node 2 bench/dist_bench.py --strategy fsdp --steps 150 --out run.json
    python bench/dist_bench.py --merge-check ADAPTER_DIR     # one GPU: load + merge the saved adapter

bench/run_dist.sh runs the whole matrix (every strategy on 1 and 2 GPUs).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256)
SEED = 1234


def base_model(seq: int):
    from transformers import LlamaForCausalLM

    torch.manual_seed(SEED)  # the same weights in every process, and again in --merge-check
    return LlamaForCausalLM(base_model_config(seq)).to(torch.bfloat16)


class ZipfTokens(torch.utils.data.Dataset):
    """Sequences over a Zipf-shaped vocabulary: learnable statistics, so the loss visibly falls."""

    def __init__(self, n: int, seq: int, vocab: int = 32000):
        g = torch.Generator().manual_seed(0)
        probs = 1.0 / torch.arange(1, vocab + 1, dtype=torch.float64)
        self.ids = torch.multinomial(probs / probs.sum(), n * seq, replacement=True, generator=g).view(n, seq)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        ids = self.ids[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def params_for(args, root: Path):
    from tuneline.config import Params

    config_dir = root / f"base-config-{os.environ.get('RANK', '0')}"
    base_model_config(args.seq).save_pretrained(config_dir)  # FSDP reads the layer class from it
    return Params.model_validate({
        "model": {"base": str(config_dir)},
        "train": {"batch_size": args.bs, "max_steps": args.steps, "learning_rate": 2e-4, "logging_steps": 1,
                  "save_steps": 10**6, "gradient_checkpointing": False, "bf16": True, "warmup_ratio": 0.0,
                  "lr_scheduler": "constant", "output_dir": str(root / "adapter"),
                  "checkpoint_dir": str(root / "ckpt")},
        "lora": {"r": 16, "alpha": 32},
        "distributed": {"strategy": args.strategy, "deepspeed": {"stage": args.zero_stage}},
    })


def base_model_config(seq: int):
    from transformers import LlamaConfig

    return LlamaConfig(**LLAMA_1B, max_position_embeddings=seq, attn_implementation="sdpa")


def tiny_tokenizer():
    from tasks.bootstrap.tiny import build_tokenizer

    return build_tokenizer(["a bench needs a tokenizer to save beside the adapter"], 300)


def bench(args) -> dict:
    from transformers import TrainerCallback

    from tuneline.training import supervision
    from tuneline.training.trainer import save_adapter, training_args, with_adapter

    root = Path(args.workdir)
    params = params_for(args, root)
    targs = training_args(params, has_eval=False)
    model = with_adapter(base_model(args.seq), params)
    losses, marks = [], {}

    class Clock(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            if state.global_step in (args.warmup, args.steps):
                torch.cuda.synchronize()
                marks[state.global_step] = time.perf_counter()

        def on_log(self, a, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    torch.cuda.reset_peak_memory_stats()
    trainer = supervision.TunelineTrainer(model=model, args=targs,
                                     train_dataset=ZipfTokens(args.steps * args.bs * 8, args.seq),
                                     callbacks=[Clock()])
    trainer.train()
    world = targs.world_size
    seconds = marks[args.steps] - marks[args.warmup]
    tokens_per_s = (args.steps - args.warmup) * args.bs * args.seq * world / seconds
    save_adapter(params, trainer, tiny_tokenizer(), is_main=targs.process_index == 0)
    return {"strategy": args.strategy if args.strategy != "deepspeed" else f"zero{args.zero_stage}",
            "gpus": world, "seq": args.seq, "bs_per_gpu": args.bs, "steps": args.steps,
            "tokens_per_s": round(tokens_per_s), "tokens_per_s_per_gpu": round(tokens_per_s / world),
            "loss_first": round(sum(losses[:5]) / 5, 3), "loss_last": round(sum(losses[-5:]) / 5, 3),
            "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1),
            "adapter": str(params.train.output_dir)}


def merge_check(adapter_dir: str, seq: int) -> dict:
    """On one GPU: the saved adapter loads onto the base, merges, and the logits agree."""
    from peft import PeftModel
    from safetensors.torch import load_file

    weights = load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))
    trained = max(float(w.abs().max()) for k, w in weights.items() if "lora_B" in k)
    model = PeftModel.from_pretrained(base_model(seq), adapter_dir).cuda().eval()
    x = torch.randint(0, 32000, (2, 256), device="cuda")
    with torch.no_grad():
        before = model(input_ids=x).logits.float()
        merged = model.merge_and_unload()
        after = merged(input_ids=x).logits.float()
    return {"adapter": adapter_dir, "lora_B_max_abs": trained, "max_logit_diff": float((after - before).abs().max()),
            "merged": trained > 0 and float((after - before).abs().max()) < 0.5}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--strategy", default="ddp", choices=["ddp", "fsdp", "deepspeed"])
    p.add_argument("--zero-stage", type=int, default=2, choices=[2, 3])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--bs", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--workdir", default=None)
    p.add_argument("--out", default=None, help="append the JSON result to this file (rank 0)")
    p.add_argument("--merge-check", metavar="ADAPTER_DIR")
    args = p.parse_args()
    if args.merge_check:
        print(json.dumps(merge_check(args.merge_check, args.seq)), flush=True)
        return
    args.workdir = args.workdir or tempfile.mkdtemp(prefix="dist-bench-")
    result = bench(args)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(result), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
