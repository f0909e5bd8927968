"""train.fused_lora on a CPU: one LoRA training step (forward and backward, eager, as the train stage runs on a
CPU) with PEFT's forward and with tuneline/training/lora_matmul.py's, interleaved, on the same model and batch.

    python bench/fused_lora_cpu.py [MODEL] [--rows 8] [--tokens 380] [--reps 4]   # MODEL: default models/base

Prints each step's seconds and the medians, and appends one JSON line to bench/results/fused_lora_cpu.jsonl.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import train_bench as tb  # noqa: E402 - LoRA's target projections, as the other training benches use them

from tuneline.training import lora_matmul  # noqa: E402
from tuneline.training.trainer import cpu_bf16  # noqa: E402 - bf16 autocast where the train stage uses it


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default="models/base")
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=380)
    ap.add_argument("--reps", type=int, default=4)
    ap.add_argument("--out", default="bench/results/fused_lora_cpu.jsonl")
    args = ap.parse_args()
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=tb.TARGETS)
    plain = get_peft_model(base, config).train()
    fused = copy.deepcopy(plain)
    lora_matmul.install(fused)
    ids = torch.randint(0, base.config.vocab_size, (args.rows, args.tokens))
    bf16 = cpu_bf16()

    def step(model) -> float:
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return time.perf_counter() - start

    times: dict[str, list[float]] = {"plain": [], "fused": []}
    for model in (plain, fused):  # warm-up
        step(model)
    for _ in range(args.reps):
        for name, model in (("plain", plain), ("fused", fused)):
            times[name].append(round(step(model), 3))
    line = {"model": args.model, "rows": args.rows, "tokens": args.tokens, "bf16_autocast": bf16,
            "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d"),
            **{f"{k}_step_s": v for k, v in times.items()},
            **{f"{k}_median_s": statistics.median(v) for k, v in times.items()}}
    line["fused_over_plain"] = round(line["fused_median_s"] / line["plain_median_s"], 3)
    print(json.dumps(line))
    with open(args.out, "a") as f:
        f.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
