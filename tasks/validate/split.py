"""Train and eval: the prompt key that defines overlap, the seeded hold-out, the index of train's prompts.

Two records overlap when they ask the same thing (`prompt_side`), whatever they answer: a hold-out
moves whole prompt groups, so it never overlaps train.
"""

from __future__ import annotations

import json
import random
from typing import Any


def prompt_side(record: dict[str, Any], fmt: str) -> str:
    """What the model is asked, whitespace-collapsed and casefolded: the key of the overlap check."""
    if fmt == "instruction":
        parts = [record["instruction"], record["input"]]
    elif fmt == "chat":
        parts = [f"{m['role']}: {m['content']}" for m in record["messages"][:-1]]
    else:
        parts = [record["prompt"]]
    return json.dumps([" ".join(p.split()).casefold() for p in parts], ensure_ascii=False)


def first_lines(keys: list[str], lines: list[int]) -> dict[str, int]:
    """key -> the first line that has it."""
    first: dict[str, int] = {}
    for key, line in zip(keys, lines, strict=True):
        first.setdefault(key, line)
    return first


def hold_out(records: list[dict], fmt: str, fraction: float, seed: int) -> list[int] | None:
    """Sorted indices of a seeded eval hold-out; whole prompt groups move, so it never overlaps train."""
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        groups.setdefault(prompt_side(r, fmt), []).append(i)
    order = list(groups.values())
    random.Random(seed).shuffle(order)
    want, held = max(1, round(len(records) * fraction)), []
    for group in order:
        if len(held) >= want:
            break
        held += group
    return sorted(held) if len(held) < len(records) else None  # None: too few distinct prompts


def prompt_lines(records: list[dict], fmt: str, lines: list[int]) -> dict[str, int]:
    """prompt -> the first line that asks it: what the overlap check looks eval prompts up in."""
    return first_lines([prompt_side(r, fmt) for r in records], lines)
