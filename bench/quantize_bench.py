"""Quantized export on one GPU: size, decoding speed and quality of int8 and int4 copies of a 1B Llama.

There is no model hub here, so the model is the 1B Llama shape of bench/train_bench.py (hidden 2048,
16 layers, vocabulary 128,256) with tied embeddings as in Llama 3.2 1B, trained from random init on the
embedded default's task until it answers: tasks.bootstrap's records and tokenizer, tuneline.models.encode's
response-only labels. It is saved in bf16 as the merge stage saves a merged model. Each quantized copy is
made by tuneline.quantize (torchao weight-only, quantized while loading, saved as safetensors, loaded back
from disk) and scored by the evaluate stage's own score_model (perplexity of the eval answers, greedy answers
to the eval prompts, ROUGE-L, exact match) on the same records as the full model. Retention = ROUGE-L(copy) /
ROUGE-L(full); the perplexity ratio shows the smaller losses that do not change a greedy answer.

Decoding speed: greedy, 128 new tokens per row (EOS ignored) after an eval prompt, batch 1 and 16, eager
(dynamic KV cache); and batch 1 compiled (static KV cache, which transformers compiles). Tokens/s counts
new tokens over all rows.

    python bench/quantize_bench.py --out bench/results/quantize_h200.jsonl    # one GPU, about 6 minutes
    python bench/quantize_bench.py --shape tiny --kinds int8 --steps 30      # CPU smoke run
Prints one JSON line per model and one with the retentions. Needs, besides torch and transformers:
torchao, and the evaluate stage's scorers rouge-score and sacrebleu (on a bare GPU machine, from wheels).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.train_bench import SHAPES  # noqa: E402

NEW_TOKENS = 128


def task_data(n_train: int, n_eval: int, seed: int = 1234):
    """The embedded default's train and eval records and tokenizer, as bootstrap makes them."""
    from tasks.bootstrap.data import generate_records
    from tasks.bootstrap.tiny import build_tokenizer, tokenizer_corpus

    rng, taken = random.Random(seed), set()
    train, evals = generate_records(n_train, rng, taken), generate_records(n_eval, rng, taken)
    return train, evals, build_tokenizer(tokenizer_corpus(train, seed), 1024)


def train_from_scratch(args, tokenizer, rows: list[dict], device: str):
    """The model shape trained on the task's examples (fp32 weights, bf16 autocast on a GPU)."""
    from tqdm import tqdm
    from transformers import DataCollatorForSeq2Seq, LlamaConfig, LlamaForCausalLM

    shape = {**SHAPES[args.shape], "vocab_size": max(SHAPES[args.shape]["vocab_size"], len(tokenizer))}
    cfg = LlamaConfig(**shape, max_position_embeddings=512, tie_word_embeddings=True,
                      pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    collate = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=args.steps, pct_start=0.1)
    g = torch.Generator().manual_seed(0)
    model.train()
    for step in tqdm(range(args.steps), desc="training the 1B model from scratch", unit="step"):
        pick = torch.randint(len(rows), (args.batch,), generator=g).tolist()
        batch = collate([{k: rows[i][k] for k in ("input_ids", "attention_mask", "labels")} for i in pick])
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = model(**batch.to(device)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % 100 == 0 or step + 1 == args.steps:
            print(json.dumps({"train_step": step + 1, "loss": round(loss.item(), 4)}), flush=True)
    return model.eval()


def weight_mib(model) -> float:
    """Memory the loaded weights hold: torchao tensors counted by their inner (quantized) tensors, ties once."""
    def nbytes(t) -> int:
        if hasattr(t, "__tensor_flatten__"):
            return sum(nbytes(getattr(t, name)) for name in t.__tensor_flatten__()[0])
        return t.numel() * t.element_size()

    seen = {id(p): p for p in model.parameters()}  # parameters() yields a tied weight once
    seen.update({id(b): b for b in model.buffers()})
    return round(sum(nbytes(t.data if isinstance(t, torch.nn.Parameter) else t) for t in seen.values()) / 2**20, 1)


def decode_speed(model, ids: list[int], batch: int, compiled: bool, reps: int = 3) -> float:
    """New tokens per second of greedy decoding, EOS ignored."""
    inputs = torch.tensor([ids] * batch, device=model.device)
    kwargs = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                  attention_mask=torch.ones_like(inputs), pad_token_id=model.config.pad_token_id)
    if compiled:
        kwargs["cache_implementation"] = "static"
    for _ in range(2):  # compile, then record the CUDA graphs
        model.generate(inputs, **kwargs)
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        model.generate(inputs, **kwargs)
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    return round(batch * NEW_TOKENS * reps / (time.perf_counter() - start), 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama-1b", choices=sorted(SHAPES))
    ap.add_argument("--kinds", default="int8,int4", help="merge.quantize values to export (int4 needs CUDA)")
    ap.add_argument("--steps", type=int, default=800, help="training steps from random init")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--eval-records", type=int, default=200)
    ap.add_argument("--no-compile", action="store_true", help="skip the compiled batch-1 decoding figure")
    ap.add_argument("--out", default=None, help="append results as JSON lines here")
    args = ap.parse_args()

    from tuneline import quantize, scoring
    from tuneline.config import Params
    from tuneline.models import encode, encode_prompt, load_model

    device = quantize.device()
    print("torch", torch.__version__, torch.cuda.get_device_name() if device == "cuda" else "cpu", flush=True)
    work = Path(tempfile.mkdtemp(prefix="quantize-bench-"))
    params = Params.model_validate({
        "data": {"format": "instruction", "template": "alpaca", "max_seq_length": 160},
        "evaluate": {"metrics": ["perplexity", "rouge", "exact_match"], "num_samples": args.eval_records},
        "merge": {"output_dir": str(work / "merged")}})
    train, evals, tokenizer = task_data(2000, args.eval_records)
    model = train_from_scratch(args, tokenizer, [encode(r, params, tokenizer) for r in train], device)
    full_dir = params.merge.output_dir
    model.to(torch.bfloat16).save_pretrained(str(full_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(full_dir))
    del model

    prompts, references = scoring.prompts_and_references(evals, params, tokenizer)
    examples = [{k: e[k] for k in ("input_ids", "attention_mask", "labels")}
                for e in (encode(r, params, tokenizer) for r in evals)]
    speed_ids = encode_prompt(tokenizer, prompts[0], params.data.template)
    results = {}
    for kind in ["full", *args.kinds.split(",")]:
        if kind == "full":
            path, model = full_dir, load_model(params, path=full_dir, dtype=torch.bfloat16).to(device)
        else:
            path = full_dir.with_name(f"{full_dir.name}-{kind}")
            quantize.load_quantized(full_dir, kind).save_pretrained(str(path), safe_serialization=True)
            model = quantize.load_quantized(path)
        scores, predictions = scoring.score_model(model, tokenizer, params, prompts, references, examples)
        r = {"model": kind, "shape": args.shape, "size_mib": quantize.size_mib(path),
             "loaded_weights_mib": weight_mib(model), **scores,
             "decode_tok_s_bs1_eager": decode_speed(model, speed_ids, 1, compiled=False),
             "decode_tok_s_bs16_eager": decode_speed(model, speed_ids, 16, compiled=False)}
        if not args.no_compile:
            r["decode_tok_s_bs1_compiled"] = decode_speed(model, speed_ids, 1, compiled=True)
        if kind != "full":
            full = results["full"]
            r["retention"] = quantize.retention(full["rouge_l"], r["rouge_l"])
            r["perplexity_vs_full"] = round(r["perplexity"] / full["perplexity"], 4)
            r["same_answers_as_full"] = sum(a == b for a, b in zip(predictions, full["predictions"], strict=True)) \
                / len(predictions)
        results[kind] = {**r, "predictions": predictions}
        print(json.dumps(r), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(r) + "\n")
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
    print(json.dumps({"shape": args.shape, "eval_prompts": len(prompts),
                      **{f"{k}_retention": results[k]["retention"] for k in results if k != "full"},
                      **{f"{k}_size_vs_full": round(results[k]["size_mib"] / results["full"]["size_mib"], 3)
                         for k in results if k != "full"}}), flush=True)


if __name__ == "__main__":
    main()
