"""A tiny model on disk, merged as the merge stage writes one: what the serving tests serve."""

from __future__ import annotations

import random
from pathlib import Path

from tasks.bootstrap.data import generate_records
from tasks.bootstrap.tiny import build_model, build_tokenizer
from tuneline.config import TinyModel
from tuneline.formats import ALPACA_HEADER

TINY = TinyModel(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, vocab_size=320,
                 max_position_embeddings=256)


def save_tiny_model(path: Path, seed: int = 0) -> Path:
    """A random-init Llama and its BPE tokenizer, saved as a merged HF model directory."""
    records = generate_records(200, random.Random(seed), set())
    corpus = [ALPACA_HEADER] + [f"{r['instruction']}\n\n{r['input']}\n\n{r['output']}" for r in records]
    tokenizer = build_tokenizer(corpus, TINY.vocab_size)
    model = build_model(TINY, tokenizer, seed)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path
