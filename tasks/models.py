"""Loading base models and tokenizers the same way in every stage.

Safetensors only, and `trust_remote_code` only when params say so: a model
directory is code as much as data.
"""

from __future__ import annotations

from pathlib import Path

from tasks import remote
from tasks.config import Params
from tasks.errors import TunelineError


def _source(params: Params) -> tuple[str, dict]:
    spec = params.model
    if remote.is_remote(spec.base):  # s3://bucket/prefix: a local copy of the folder (tasks/remote.py)
        if spec.revision:
            raise TunelineError(f"model.revision: for Hugging Face ids only, not for {spec.base!r}")
        return str(remote.local_path(spec.base)), {"trust_remote_code": spec.trust_remote_code}
    if not Path(spec.base).exists() and (spec.base.startswith((".", "/", "~")) or spec.base.count("/") > 1):
        raise TunelineError(f"model.base: no folder {spec.base!r}, and it is no Hugging Face id (org/name)")
    kwargs: dict = {"trust_remote_code": spec.trust_remote_code}
    if spec.revision:
        kwargs["revision"] = spec.revision
    return spec.base, kwargs


def load_tokenizer(params: Params, path: str | Path | None = None):
    from transformers import AutoTokenizer

    name, kwargs = _source(params) if path is None else (str(path), {"trust_remote_code": False})
    try:
        tok = AutoTokenizer.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as e:
        raise TunelineError(f"model.base: cannot load a tokenizer from {name!r}: {e}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(params: Params, path: str | Path | None = None, dtype=None, attn_implementation: str | None = None):
    """A causal LM from model.base (or an explicit local path), weights from safetensors only."""
    import torch
    from transformers import AutoModelForCausalLM

    name, kwargs = _source(params) if path is None else (str(path), {"trust_remote_code": False})
    if dtype is None:
        dtype = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16,
                 "float16": torch.float16}[params.model.dtype]
    try:
        if attn_implementation:
            kwargs["attn_implementation"] = attn_implementation
        return AutoModelForCausalLM.from_pretrained(name, dtype=dtype, use_safetensors=True, **kwargs)
    except (OSError, ValueError) as e:
        raise TunelineError(f"model.base: cannot load {name!r} (safetensors weights required): {e}") from None


def encode_prompt(tokenizer, prompt: str, template: str) -> list[int]:
    """Prompt token ids; a chat template from the tokenizer already carries its BOS."""
    return tokenizer(prompt, add_special_tokens=template != "tokenizer")["input_ids"]
