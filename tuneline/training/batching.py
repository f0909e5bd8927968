"""Batches of packed (padding-free) rows: token budgets, and steps of few sizes.

Token-budget batches (`train.batch_tokens`): a step holds up to N tokens, not N examples.

With packed (padding-free) rows a step's cost is its token count. Batches of a fixed number of
examples then swing with the lengths drawn (on variable-length data a step of 8 held 600 to
5,000 tokens), and small steps leave a GPU waiting on kernel launches. Here each epoch shuffles
the examples (seeded: a resumed run sees the same batches) and fills batches greedily up to the
budget; an example longer than the budget is a batch of its own. Every example is seen once per
epoch, as with Trainer's own sampler.

Padded packing (`train.pad_to_multiple`): a packed row is padded up to a multiple of M tokens, so steps
come in a few sizes rather than one per token count: CUDA graphs (`train.compile_mode: reduce-overhead`)
record one graph per size. The padding is an example of its own (positions restart at 0, so it attends to
itself only) whose labels are -100: the loss and every gradient are those of the unpadded row. Its size
travels in the batch under PADDING (a host int), for the trainer to count only real tokens as seen.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence

import torch

PADDING = "num_padding_tokens"  # not a model input: the trainer takes it out (supervision.py)


class TokenBudgetBatches:
    """A batch sampler: lists of example indices whose lengths sum to at most `budget` tokens."""

    def __init__(self, lengths: Sequence[int], budget: int, seed: int):
        self.lengths, self.budget, self.seed = list(lengths), budget, seed
        self.epoch = 0
        self._cached: tuple[int, list[list[int]]] | None = None

    def set_epoch(self, epoch: int) -> None:  # Trainer and accelerate call it at each epoch's start
        self.epoch = epoch

    def _batches(self) -> list[list[int]]:
        if self._cached and self._cached[0] == self.epoch:
            return self._cached[1]
        order = list(range(len(self.lengths)))
        random.Random(self.seed + self.epoch).shuffle(order)
        batches: list[list[int]] = []
        batch: list[int] = []
        tokens = 0
        for i in order:
            if batch and tokens + self.lengths[i] > self.budget:
                batches.append(batch)
                batch, tokens = [], 0
            batch.append(i)
            tokens += self.lengths[i]
        if batch:
            batches.append(batch)
        self._cached = (self.epoch, batches)
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self._batches())

    def __len__(self) -> int:
        return len(self._batches())


def example_lengths(dataset) -> list[int]:
    """Token count per example of a tokenized dataset (a `datasets.Dataset` or a list of rows)."""
    column = dataset["input_ids"] if hasattr(dataset, "column_names") else [row["input_ids"] for row in dataset]
    return [len(ids) for ids in column]


class PaddedPacking:
    """A packing collator whose rows are padded up to a multiple of `multiple` tokens."""

    def __init__(self, collator: Callable[[list[dict]], dict], multiple: int, pad_id: int):
        self.collator, self.multiple, self.pad_id = collator, multiple, pad_id

    def __call__(self, features: list[dict]) -> dict:
        batch = self.collator(features)
        extra = -batch["input_ids"].shape[1] % self.multiple
        if extra:
            filler = {"input_ids": torch.full((1, extra), self.pad_id), "labels": torch.full((1, extra), -100),
                      "position_ids": torch.arange(extra)[None]}
            for key, pad in filler.items():
                batch[key] = torch.cat([batch[key], pad.to(batch[key].dtype)], dim=1)
        batch[PADDING] = extra
        return batch


def packed_collator(multiple: int, tokenizer) -> Callable[[list[dict]], dict]:
    """Padding-free batches: one row, position ids restarting per example (transformers builds the
    block-diagonal causal mask from them); padded up to a multiple of `multiple` tokens unless 0."""
    from transformers import DataCollatorWithFlattening

    collator = DataCollatorWithFlattening(return_position_ids=True, separator_id=-100)
    if not multiple:
        return collator
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return PaddedPacking(collator, multiple, pad_id)
