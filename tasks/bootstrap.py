"""Stage 0, bootstrap: the embedded default's data and base model, made offline.

Writes a generated instruction dataset (word-list transformations, so exact
match and ROUGE both mean something: an answer is right, or partly right word
by word) and a small random-init Llama with a BPE tokenizer trained on that
corpus. Deterministic for a given seed. Asked for (bootstrap.preference_*),
also preference pairs for DPO: the right answer chosen, a wrong one rejected.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from tasks.atomic import atomic_dir, write_text
from tasks.config import Bootstrap, Params, TinyModel
from tasks.formats import ALPACA_HEADER, CHATML_JINJA, CHATML_SPECIAL, to_messages

CATEGORIES = {
    "animal": "tiger falcon raven rabbit dragon horse eagle otter".split(),
    "fruit": "apple lemon banana mango olive cherry peach grape".split(),
    "color": "silver violet copper crimson amber indigo teal scarlet".split(),
    "place": "river forest ocean island desert meadow harbor jungle".split(),
    "tool": "piano rocket candle mirror anchor kettle lantern saddle".split(),
}
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven"]


def _draw(rng: random.Random) -> tuple[str, str, list[str]]:
    """One task: (kind, category, words). Answers come from `answer`."""
    kind = rng.choice(["which", "list", "count"])
    cat = rng.choice(sorted(CATEGORIES))
    others = [w for c, ws in sorted(CATEGORIES.items()) if c != cat for w in ws]
    if kind == "which":  # exactly one word of the category among distractors
        words = rng.sample(others, rng.randint(2, 4)) + [rng.choice(CATEGORIES[cat])]
    elif kind == "list":
        words = rng.sample(others, rng.randint(1, 3)) + rng.sample(CATEGORIES[cat], rng.randint(1, 3))
    else:
        words = rng.sample(others + CATEGORIES[cat], rng.randint(2, 6))
    rng.shuffle(words)
    return kind, cat, words


def answer(kind: str, cat: str, words: list[str]) -> str:
    if kind == "count":
        return NUMBER_WORDS[len(words)]
    return " ".join(w for w in words if w in CATEGORIES[cat])


INSTRUCTIONS = {
    "which": "Which word is {article} {cat}?",
    "list": "List every {cat}, in order.",
    "count": "How many words are there?",
}


def _tasks(n: int, rng: random.Random, taken: set[str]) -> list[tuple[dict, str, str, list[str]]]:
    """n (instruction record, kind, category, words), none of whose (instruction, input) is in `taken`; adds theirs."""
    out: list[tuple[dict, str, str, list[str]]] = []
    while len(out) < n:
        kind, cat, words = _draw(rng)
        article = "an" if cat[0] in "aeiou" else "a"
        record = {"instruction": INSTRUCTIONS[kind].format(cat=cat, article=article), "input": " ".join(words),
                  "output": answer(kind, cat, words)}
        key = f"{record['instruction']}|{record['input']}"
        if key not in taken:
            taken.add(key)
            out.append((record, kind, cat, words))
    return out


def generate_records(n: int, rng: random.Random, taken: set[str]) -> list[dict]:
    """n instruction records, none of whose (instruction, input) is in `taken`; adds theirs."""
    return [record for record, *_ in _tasks(n, rng, taken)]


def wrong_answer(kind: str, cat: str, words: list[str], rng: random.Random) -> str:
    """A wrong answer as long in words as the right one, so that log-probabilities compare answers, not lengths."""
    right = answer(kind, cat, words)
    if kind == "count":
        return rng.choice([w for w in NUMBER_WORDS[1:] if w != right])
    distractors = [w for w in words if w not in CATEGORIES[cat]]
    picked = right.split()  # which: the one word; list: every word of the category, one of them swapped
    picked[rng.randrange(len(picked))] = rng.choice(distractors)
    return " ".join(picked)


def preference_records(n: int, rng: random.Random, taken: set[str]) -> list[dict]:
    """n DPO pairs: the user's message as the prompt, the right answer chosen, a wrong one rejected."""
    return [{"prompt": to_messages(record, "instruction")[0]["content"], "chosen": record["output"],
             "rejected": wrong_answer(kind, cat, words, rng)} for record, kind, cat, words in _tasks(n, rng, taken)]


def pretraining_text(rng: random.Random) -> str:
    """Plain text of the same world, in no instruction format: what the base model knows."""
    kind, cat, words = _draw(rng)
    label = {"which": f"the {cat}", "list": f"each {cat}", "count": "count"}[kind]
    return f"{' '.join(words)} | {label} = {answer(kind, cat, words)} ."


def _write_jsonl(path: Path, records: list[dict]) -> None:
    write_text(path, "".join(json.dumps(r) + "\n" for r in records))


def tokenizer_corpus(train: list[dict], seed: int) -> list[str]:
    """The text the default tokenizer learns its merges from: the template, the train records, plain text."""
    text_rng = random.Random(seed + 2)
    corpus = [ALPACA_HEADER, "### Instruction:\n### Response:\n"]
    corpus += [f"{r['instruction']}\n\n{r['input']}\n\n{r['output']}" for r in train]
    return corpus + [pretraining_text(text_rng) for _ in range(2000)]


def build_tokenizer(corpus: list[str], vocab_size: int):
    """A byte-level BPE tokenizer trained on the corpus, wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>", *CHATML_SPECIAL]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    # Like Llama's tokenizer: BOS in front of every encoded text with special tokens on.
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    fast.chat_template = CHATML_JINJA
    return fast


def build_model(shape: TinyModel, tokenizer, seed: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_heads,
        max_position_embeddings=shape.max_position_embeddings,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return LlamaForCausalLM(cfg)


def pretrain(model, tokenizer, cfg: Bootstrap) -> float:
    """A short causal-LM pre-training on `pretraining_text`; returns the final loss."""
    import torch
    from tqdm import tqdm

    rng = random.Random(cfg.seed + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.pretrain_lr)
    # One-cycle (5% warm-up from lr/25, cosine down): the schedule the default's quality was measured with.
    # Short runs get at least two warm-up steps, which the schedule needs.
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.pretrain_lr, total_steps=cfg.pretrain_steps,
                                                pct_start=max(0.05, 2 / cfg.pretrain_steps))
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in tqdm(range(cfg.pretrain_steps), desc="bootstrap: pre-training the base model", unit="step"):
        texts = [pretraining_text(rng) for _ in range(cfg.pretrain_batch)]
        batch = tokenizer([tokenizer.bos_token + t + tokenizer.eos_token for t in texts],
                          return_tensors="pt", padding=True, add_special_tokens=False)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    return loss.item()


# They only add files beside the data: asking for pairs must not rebuild the base model.
PREFERENCE_KNOBS = {"preference_train_records", "preference_eval_records"}


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

    with atomic_dir(cfg.data_dir) as tmp:
        _write_jsonl(tmp / "train.jsonl", train)
        _write_jsonl(tmp / "eval.jsonl", evals)

    tokenizer = build_tokenizer(tokenizer_corpus(train, cfg.seed), cfg.model.vocab_size)
    model = build_model(cfg.model, tokenizer, cfg.seed)
    loss = pretrain(model, tokenizer, cfg)
    with atomic_dir(cfg.model_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "bootstrap.json").write_text(_stamp(cfg), encoding="utf-8")
    n_params = sum(p.numel() for p in model.parameters())
    return {"train_records": len(train), "eval_records": len(evals), "model_params": n_params,
            "vocab_size": len(tokenizer), "pretrain_loss": round(loss, 4), **write_preference(cfg)}


if __name__ == "__main__":
    from tasks.stage import main

    main("bootstrap")
