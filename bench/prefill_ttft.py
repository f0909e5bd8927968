"""Time to first token by the prefill's attention kernel: cuDNN's, or the ones serving/kv_cache.py keeps.

The serve bench's model (random-init Llama-3.2-1B shape, bf16) in the engine as a replica runs it by default
(plain prefill, decode steps in CUDA graphs). One-token requests, one at a time, over prompts of 200 words whose
lengths vary: each pass takes 16 prompts not seen before, since cuDNN builds a plan per new shape and keeps it.
Passes alternate: kept kernels, cuDNN first, kept, cuDNN, then each again on lengths already seen.

    python bench/prefill_ttft.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from torch.nn.attention import SDPBackend

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import serve_bench as sb  # noqa: E402 - the same model and prompts
from decode_profile import first_tokens  # noqa: E402

from serving import kv_cache  # noqa: E402

KEPT = kv_cache.PREFILL_BACKENDS
CUDNN = [SDPBackend.CUDNN_ATTENTION, *KEPT]


def main() -> None:
    from serving.generation import Engine

    model_dir = sb.build_model("llama-1b", Path(tempfile.mkdtemp(prefix="prefill-ttft-")) / "model")
    texts = sb.prompts(64, 200)
    engine = Engine(str(model_dir), "alpaca", 128, 512, max_batch_size=32)
    for i, (name, backends) in enumerate([("kept", KEPT), ("cudnn", CUDNN)] * 2):
        kv_cache.PREFILL_BACKENDS = backends
        print(f"{name:5} new lengths:  ", end="")
        first_tokens(engine, texts[16 * i:16 * (i + 1)])
    for name, backends, seen in [("kept", KEPT, 32), ("cudnn", CUDNN, 48)]:
        kv_cache.PREFILL_BACKENDS = backends
        print(f"{name:5} seen lengths: ", end="")
        first_tokens(engine, texts[seen:seen + 16])
    engine.close()


if __name__ == "__main__":
    main()
