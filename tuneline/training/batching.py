"""Token-budget batches (`train.batch_tokens`): a step holds up to N tokens, not N examples.

With packed (padding-free) rows a step's cost is its token count. Batches of a fixed number of
examples then swing with the lengths drawn (on variable-length data a step of 8 held 600 to
5,000 tokens), and small steps leave a GPU waiting on kernel launches. Here each epoch shuffles
the examples (seeded: a resumed run sees the same batches) and fills batches greedily up to the
budget; an example longer than the budget is a batch of its own. Every example is seen once per
epoch, as with Trainer's own sampler.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence


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
