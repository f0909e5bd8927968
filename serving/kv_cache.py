"""The KV cache of the continuous-batching engine (serving/decoding.py): one preallocated row ("slot") per
running request, and the attention that reads it.

`SlotCache` stands where a transformers model expects its cache (`model(..., cache=...)` calls
`cache.update(keys, values, layer)` in every attention layer), so any decoder model of transformers runs on it
unchanged. Its buffers never move or grow, which is what lets a decode step be captured once as a CUDA graph
and replayed. Before each forward the engine says what the step is:

- `prefill(slots)`: a right-padded batch of new prompts. Their keys and values go to positions 0.. of their
  slots, and the prompts attend only to themselves (causal attention: no mask needed, the padding is at the
  end). What the padding writes is never read: a row's decode steps overwrite those positions before reading.
- `decode(rows, positions, length)`: one new token per row at its own position. Rows are slots 0..rows-1
  (the engine keeps running requests in the lowest slots), so the keys of the step are a view of the buffers,
  `length` positions long: attention reads that many, masked per row at its position.
- `decode(..., slots=)`: the same for any subset of slots (adapter groups of the eager path): a gather.

`ATTENTION` ("tuneline_slots") is the attention function the model is switched to: scaled-dot-product
attention with grouped query heads, without copying keys for each query head. A decode step of a
grouped-query model folds a key head's query heads into its query length, so one kernel serves them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AttentionInterface

ATTENTION = "tuneline_slots"
# Not cuDNN's attention for a prefill: it builds a plan for each new shape, and prompts come in every length. On an
# H200 one-token requests over prompts of varying lengths took 61 ms at p50 and 12 ms at best with it
# (bench/results/decode_profile_h200.txt); bench/prefill_ttft.py measures both kernels side by side.
PREFILL_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


class SlotCache:
    """Keys and values of `slots` requests up to `length` positions, for each layer of a model."""

    def __init__(self, config, slots: int, length: int, dtype: torch.dtype, device: torch.device):
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        # One position more than a step attends: a step's keys are then never the whole buffer, whose view is
        # contiguous where a shorter one is not, which torch.compile would compile apart (serving/cuda_graphs.py).
        shape = (slots, heads, length + 1, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(text.num_hidden_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(text.num_hidden_layers)]
        self.slots, self.length = slots, length
        self.bytes = 2 * sum(k.numel() * k.element_size() for k in self.keys)
        self._mode: tuple = ("prefill", None)

    def prefill(self, slots: torch.Tensor) -> None:
        self._mode = ("prefill", slots)

    def decode(self, rows: int, positions: torch.Tensor, length: int, slots: torch.Tensor | None = None) -> None:
        self._mode = ("decode", rows, positions, length, slots)

    def update(self, keys: torch.Tensor, values: torch.Tensor, layer: int, *args, **kwargs):
        if self._mode[0] == "prefill":
            slots = self._mode[1]
            n = keys.shape[2]
            self.keys[layer][slots, :, :n] = keys
            self.values[layer][slots, :, :n] = values
            return keys, values
        _, rows, positions, length, slots = self._mode
        index = torch.arange(rows, device=keys.device) if slots is None else slots
        self.keys[layer][index, :, positions] = keys[:, :, 0]
        self.values[layer][index, :, positions] = values[:, :, 0]
        if slots is None:
            return self.keys[layer][:rows, :, :length], self.values[layer][:rows, :, :length]
        return self.keys[layer][slots, :, :length], self.values[layer][slots, :, :length]


def decode_mask(positions: torch.Tensor, length: int) -> torch.Tensor:
    """[rows, 1, 1, length]: each row sees its positions up to its current one."""
    return (torch.arange(length, device=positions.device)[None, :] <= positions[:, None])[:, None, None, :]


def slot_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention over SlotCache's keys: causal within a prefill (no mask), or one query per row over the masked
    cache in a decode step. Returns [batch, query length, heads, head dim], as transformers expects."""
    batch, heads, q_len, dim = query.shape
    kv_heads = key.shape[1]
    if q_len > 1:
        with sdpa_kernel(PREFILL_BACKENDS):
            out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling,
                                                 enable_gqa=kv_heads != heads)
        return out.transpose(1, 2).contiguous(), None
    group = heads // kv_heads  # the query heads of one key head become that head's "query length"
    out = F.scaled_dot_product_attention(query.view(batch, kv_heads, group, dim), key, value,
                                         attn_mask=attention_mask, scale=scaling)
    return out.reshape(batch, heads, 1, dim).transpose(1, 2), None


AttentionInterface.register(ATTENTION, slot_attention)
