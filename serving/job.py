"""One request as the decoder (serving/decoding.py) runs it: its tokens, limits and sampling, the callbacks that
turn tokens into text (serving/generation.py), and what it did while it ran."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch


class ModelError(RuntimeError):
    """The model itself failed (e.g. NaN logits from broken weights): a server error, not the client's."""


@dataclass(eq=False)
class Job:
    """One request, tokenized and checked: what a running row needs. `on_token(token)` returns True when the
    text is complete (a stop string); `on_end(reason, error)` is called once, from the decoding thread."""

    ids: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stops: list[str] = field(default_factory=list)
    seed: int | None = None
    ignore_eos: bool = False
    adapter: str | None = None  # the adapter key (serving/adapters.py); None: the model itself
    arrived: float = field(default_factory=time.perf_counter)
    on_token: Callable[[int], bool] = lambda token: False
    on_end: Callable[[str, Exception | None], None] = lambda reason, error: None
    cancelled: bool = False
    # Filled in while it runs:
    tokens: list[int] = field(default_factory=list)
    first_token_at: float | None = None
    ended: bool = False
    batch_rows: int = 0  # summed over its steps: its mean batch is batch_rows / steps
    steps: int = 0
    eos_seen: int = 0  # 1 if it ended on EOS: the EOS token counts as generated, though not in `tokens`
    generator: torch.Generator | None = None

    def cancel(self) -> None:
        """The client went away: the row stops at the next step (no more tokens, `on_end("cancelled")`)."""
        self.cancelled = True


def by_adapter(rows: list[tuple[int, Job]]) -> list[tuple[str | None, list[tuple[int, Job]]]]:
    """(slot, job) rows grouped by adapter, in order of first appearance."""
    groups: dict[str | None, list[tuple[int, Job]]] = {}
    for slot, job in rows:
        groups.setdefault(job.adapter, []).append((slot, job))
    return list(groups.items())
