"""The model's forwards over the slot cache (serving/kv_cache.py), for the decoder's loop (serving/decoding.py):
a prefill of new prompts, and a decode step of the running rows.

A decode step reads its inputs from fixed device buffers (each slot's next token, its position, whether it may
end on EOS) and writes its greedy tokens back as the next step's inputs, so its CUDA graph
(serving/cuda_graphs.py) replays with nothing else launched for a greedy batch: the host only copies the
positions in and the tokens out. Sampling rows are drawn after it (serving/sampling.py) and overwrite theirs.

A prefill cannot be a graph (its shapes are the prompts'), and eager it is hundreds of launches, which
on a GPU take longer than its arithmetic: with `compile` it goes through torch.compile, warmed at start
for one row and for several (serving/compiled.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from serving.compiled import Compiled
from serving.kv_cache import ATTENTION, SlotCache, decode_mask
from serving.sampling import greedy, sample

Index = slice | torch.Tensor  # rows 0..n-1, or any slots


class Forward:
    """One model, its slot cache and a decode step's device-side inputs."""

    def __init__(self, model, slots: int, length: int, pad_id: int, eos_ids: list[int], compile: bool = False):
        self.model, self.slots, self.pad_id = model, slots, pad_id
        self.device = next(model.parameters()).device
        model.set_attn_implementation(ATTENTION)
        self.cache = SlotCache(model.config, slots, length, next(model.parameters()).dtype, self.device)
        self.next_ids = torch.full((slots,), pad_id, dtype=torch.long, device=self.device)
        self.positions = torch.zeros(slots, dtype=torch.long, device=self.device)
        self.ban_eos = torch.zeros(slots, dtype=torch.bool, device=self.device)
        self.eos = torch.tensor(eos_ids, device=self.device)
        self.compiled_prefill = Compiled(self._prefill, "prefill") if compile else None

    def warm_up(self) -> None:
        """Compile the prefill for one row and for several, on scratch prompts in the first slots."""
        if self.compiled_prefill is not None:
            for rows in sorted({1, min(3, self.slots)}):
                self.prefill(torch.full((rows, 8), self.pad_id), [8] * rows, list(range(rows)), [False] * rows,
                             [None] * rows)
            self.compiled_prefill.warm()

    def prefill(self, ids: torch.Tensor, lengths: list[int], slots: list[int], ban_eos: list[bool],
                jobs: list) -> torch.Tensor:
        """Right-padded prompts `ids` [rows, width] (on the host) into `slots`: each row's first token."""
        if self.compiled_prefill is not None and ids.shape[1] == 1:  # a width of 1: a compilation of its own
            ids = F.pad(ids, (0, 1), value=self.pad_id)
        slot_t = torch.tensor(slots, device=self.device)
        last = torch.tensor([n - 1 for n in lengths], device=self.device)
        logits = (self.compiled_prefill or self._prefill)(ids.to(self.device, non_blocking=True), slot_t, last)
        self.ban_eos[slot_t] = torch.tensor(ban_eos, device=self.device)
        return self.sample(logits, self.greedy(logits, slot_t), jobs, slot_t)

    def _prefill(self, ids: torch.Tensor, slots: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        self.cache.prefill(slots)
        hidden = self.model.get_decoder()(input_ids=ids, cache=self.cache, use_cache=True,
                                          position_ids=torch.arange(ids.shape[1], device=ids.device)[None]
                                          ).last_hidden_state
        return self.model.get_output_embeddings()(hidden[torch.arange(ids.shape[0], device=ids.device), last])

    def step(self, n: int, length: int, slots: torch.Tensor | None = None) -> torch.Tensor:
        """One decode forward: logits [rows, vocab] of rows 0..n-1 (or of `slots`) at their positions."""
        index = slice(None, n) if slots is None else slots
        positions = self.positions[index]
        self.cache.decode(n, positions, length, slots)
        out = self.model(input_ids=self.next_ids[index][:, None], position_ids=positions[:, None],
                         attention_mask=decode_mask(positions, length), cache=self.cache, use_cache=True,
                         logits_to_keep=1)
        return out.logits[:, -1]

    def pick(self, n: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A decode step of rows 0..n-1 and their greedy tokens, set as their next inputs: what a graph captures."""
        logits = self.step(n, length)
        return logits, self.greedy(logits, slice(None, n))

    def greedy(self, logits: torch.Tensor, index: Index) -> torch.Tensor:
        tokens = greedy(logits, self.ban_eos[index], self.eos)
        self.next_ids[index] = tokens.clamp(min=0)
        return tokens

    def sample(self, logits: torch.Tensor, tokens: torch.Tensor, jobs: list, index: Index) -> torch.Tensor:
        """The rows' tokens with the sampling rows' drawn (serving/sampling.py), set as their next inputs."""
        sampled = sample(logits, tokens, jobs)
        if sampled is not tokens:
            self.next_ids[index] = sampled.clamp(min=0)
        return sampled
