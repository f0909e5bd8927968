"""The generated data of the embedded default: a word task, its DPO pairs, and general prompts.

The word task is a list of word-list transformations (which word is a fruit, list every animal,
count the words), so exact match and ROUGE both mean something: an answer is right, or partly
right word by word. General prompts are answered by the base model itself. Deterministic for a
given random generator.
"""

from __future__ import annotations

import random

from tuneline.formats import render_prompt, to_messages
from tuneline.models import generate_greedy

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
# categories occurs here, and France is left out: tests/e2e/test_pipeline.py asks the served model about it.
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
    prompts = general_prompts(n, random.Random(seed + 3))
    rendered = [render_prompt([{"role": "user", "content": p}], "tokenizer", tokenizer) for p in prompts]
    answers, ended = generate_greedy(model, tokenizer, rendered, "tokenizer", 64, 40,
                                     "bootstrap: the base model answers general prompts")
    return [{"instruction": p, "input": "", "output": a.strip()}
            for p, a, done in zip(prompts, answers, ended, strict=True) if done and a.strip()]
