"""Stage 2, tokenize: validated JSONL -> prompt-templated token ids, saved with `datasets`.

Labels are -100 on every prompt token, so the loss covers the response only.
Examples longer than data.max_seq_length lose the end of their response
(counted as truncated); an example whose prompt alone fills the window has no
response token left and is dropped (counted too).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from tuneline.atomic import atomic_dir, write_json
from tuneline.config import Params
from tuneline.models import encode, load_tokenizer


def tokenize_split(path: Path, params: Params, tokenizer):
    from datasets import load_dataset

    ds = load_dataset("json", data_files=str(path), split="train")
    # Fingerprints from what decides the tokens, not from hashing the functions: datasets hashes a function
    # by disassembling it into captured stdout, which Prefect's print capture turns into pages of bytecode.
    key = hashlib.sha256(json.dumps([ds._fingerprint, params.section("data"), params.section("model"),
                                     tokenizer.name_or_path, len(tokenizer)], sort_keys=True).encode()).hexdigest()
    ds = ds.map(lambda r: encode(r, params, tokenizer), remove_columns=ds.column_names,
                desc=f"tokenize {path.name}", new_fingerprint=f"{key[:32]}-map")
    stats = {
        "records": len(ds),
        "truncated": int(sum(ds["truncated"])),
        "dropped_prompt_too_long": int(len(ds) - sum(ds["trainable"])),
        "max_length": int(max(ds["length"])) if len(ds) else 0,
        "mean_length": round(sum(ds["length"]) / max(len(ds), 1), 1),
    }
    ds = ds.filter(lambda r: r["trainable"], new_fingerprint=f"{key[:32]}-filter").remove_columns(
        ["truncated", "trainable", "length"])
    stats["examples"] = len(ds)
    stats["tokens"] = int(sum(len(x) for x in ds["input_ids"]))
    return ds, stats


def run(params: Params) -> dict:
    from datasets import DatasetDict

    tokenizer = load_tokenizer(params)
    src = params.data.validated_dir
    splits, report = {}, {}
    for split in ("train", "eval"):
        splits[split], report[split] = tokenize_split(src / f"{split}.jsonl", params, tokenizer)
    with atomic_dir(params.data.tokenized_dir) as tmp:
        DatasetDict(splits).save_to_disk(str(tmp))
    report["template"] = params.data.template
    report["max_seq_length"] = params.data.max_seq_length
    write_json(params.report("tokenize.json"), report)
    for split in ("train", "eval"):
        if report[split]["truncated"]:
            print(f"tokenize: {report[split]['truncated']} {split} examples were truncated to "
                  f"{params.data.max_seq_length} tokens (data.max_seq_length)")
    return {"train_examples": report["train"]["examples"], "eval_examples": report["eval"]["examples"],
            "train_tokens": report["train"]["tokens"], "truncated": report["train"]["truncated"]}
