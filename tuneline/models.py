"""Loading base models and tokenizers the same way in every stage.

Safetensors only, and `trust_remote_code` only when params say so: a model
directory is code as much as data. `check_base` enforces both, and that
data.max_seq_length fits the model, from config.json and file names alone,
before the first load (tokenize's tokenizer) reads any weights or runs any code.
"""

from __future__ import annotations

import json
from pathlib import Path

from tuneline import s3
from tuneline.config import Params
from tuneline.errors import TunelineError
from tuneline.formats import render

IGNORE = -100  # the label of a token the loss skips (the prompt's)

POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")  # torch.load unpickles: loading one can run code


def _source(params: Params) -> tuple[str, dict]:
    spec = params.model
    if s3.is_remote(spec.base):  # s3://bucket/prefix: a local copy of the folder (tuneline/s3.py)
        if spec.revision:
            raise TunelineError(f"model.revision: for Hugging Face ids only, not for {spec.base!r}")
        name, kwargs = str(s3.local_path(spec.base)), {"trust_remote_code": spec.trust_remote_code}
    else:
        if not Path(spec.base).exists() and (spec.base.startswith((".", "/", "~")) or spec.base.count("/") > 1):
            raise TunelineError(f"model.base: no folder {spec.base!r}, and it is no Hugging Face id (org/name)")
        name, kwargs = spec.base, {"trust_remote_code": spec.trust_remote_code}
        if spec.revision:
            kwargs["revision"] = spec.revision
    check_base(params, name)
    return name, kwargs


def _read_json(path: Path) -> dict:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise TunelineError(f"model.base: cannot read {path}: {e}") from None
    if not isinstance(config, dict):
        raise TunelineError(f"model.base: {path} must hold a JSON object")
    return config


def _configs(name: str, revision: str | None) -> dict[str, dict]:
    """{file: its JSON} of config.json and tokenizer_config.json; a folder's must be safetensors-only."""
    folder = Path(name)
    if folder.is_file():
        raise TunelineError(f"model.base: {folder} is a file; a local base model is a Hugging Face model folder")
    if not folder.exists():  # a Hugging Face id: config.json alone is fetched (or read from the cache)
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError

        try:
            return {f"{name}/config.json": _read_json(Path(hf_hub_download(name, "config.json", revision=revision)))}
        except (OSError, ValueError, EntryNotFoundError) as e:
            raise TunelineError(f"model.base: cannot fetch config.json of {name!r}: {e}") from None
    if not (folder / "config.json").is_file():
        raise TunelineError(f"model.base: {folder} has no config.json: not a Hugging Face model folder")
    files = sorted(p.name for p in folder.iterdir())
    if not any(f.endswith(".safetensors") for f in files):
        pickles = [f for f in files if f.endswith(PICKLE_SUFFIXES)]
        raise TunelineError(f"model.base: {folder} has no *.safetensors weights" + (
            f", only {', '.join(pickles)}" if pickles else "") + "; only safetensors are loaded (pickled weights "
            "can run code): convert them with save_pretrained(..., safe_serialization=True)")
    return {str(folder / f): _read_json(folder / f) for f in ("config.json", "tokenizer_config.json")
            if (folder / f).is_file()}


def check_base(params: Params, name: str) -> None:
    """Refuse the base model `name` (a local folder or a hub id) by params key and rule, before it loads."""
    root = params.model.root
    if root and not s3.is_remote(params.model.base) and Path(name).exists() \
            and not Path(name).resolve().is_relative_to(root.resolve()):
        raise TunelineError(f"model.base: {name} resolves to {Path(name).resolve()}, outside model.root "
                            f"{root.resolve()}")
    configs = _configs(name, params.model.revision)
    for file, config in configs.items():
        custom = sorted(config.get("auto_map") or {})
        if custom and not params.model.trust_remote_code:
            raise TunelineError(f"model.trust_remote_code: is false, and {name} needs code of its own ({file} "
                                f"auto_map: {', '.join(custom)}); set it to true only if you trust that code")
    file, config = next(iter(configs.items()))  # config.json comes first
    key = next((k for k in POSITION_KEYS if isinstance(config.get(k), int)), None)
    if key and params.data.max_seq_length > config[key]:
        raise TunelineError(f"data.max_seq_length: {params.data.max_seq_length} is above the base model's {key} "
                            f"{config[key]} ({file}); at most {config[key]}")


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


def load_model(params: Params, path: str | Path | None = None, dtype=None, attn_implementation: str | None = None,
               quantize: bool = False):
    """A causal LM from model.base (or an explicit local path), weights from safetensors only.

    `quantize`: the linear layers in 4-bit NF4 with double quantization (QLoRA's base), computing in
    bf16 where the device has it; embeddings and the vocabulary head stay as they are.
    """
    import torch
    from transformers import AutoModelForCausalLM

    name, kwargs = _source(params) if path is None else (str(path), {"trust_remote_code": False})
    if dtype is None:
        dtype = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16,
                 "float16": torch.float16}[params.model.dtype]
    if quantize:
        from transformers import BitsAndBytesConfig

        compute = torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
        dtype = compute if dtype == "auto" else dtype
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute)
    try:
        if attn_implementation:
            kwargs["attn_implementation"] = attn_implementation
        return AutoModelForCausalLM.from_pretrained(name, dtype=dtype, use_safetensors=True, **kwargs)
    except (OSError, ValueError) as e:
        raise TunelineError(f"model.base: cannot load {name!r} (safetensors weights required): {e}") from None


def encode_prompt(tokenizer, prompt: str, template: str) -> list[int]:
    """Prompt token ids; a chat template from the tokenizer already carries its BOS."""
    return tokenizer(prompt, add_special_tokens=template != "tokenizer")["input_ids"]


def generate_greedy(model, tokenizer, prompts: list[str], template: str, max_new_tokens: int, batch_size: int,
                    desc: str) -> tuple[list[str], list[bool]]:
    """Greedy completions of rendered prompts, batched with left padding, and whether each ended on EOS (rather
    than at max_new_tokens)."""
    import torch
    from tqdm import tqdm

    tokenizer.padding_side = "left"
    texts: list[str] = []
    ended: list[bool] = []
    for i in tqdm(range(0, len(prompts), batch_size), desc=desc, unit="batch", leave=False):
        ids = [encode_prompt(tokenizer, p, template) for p in prompts[i:i + batch_size]]
        batch = tokenizer.pad({"input_ids": ids}, return_tensors="pt").to(model.device)
        with torch.no_grad():
            gen = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        new = gen[:, batch["input_ids"].shape[1]:]
        texts += tokenizer.batch_decode(new, skip_special_tokens=True)
        ended += (new == tokenizer.eos_token_id).any(dim=1).tolist()
    return texts, ended


def encode(record: dict, params: Params, tokenizer) -> dict:
    """One record as token ids with labels on the answer only (-100 on the prompt), cut at data.max_seq_length."""
    prompt, response = render(record, params.data.format, params.data.template, tokenizer)
    prompt_ids = encode_prompt(tokenizer, prompt, params.data.template)
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    full = prompt_ids + response_ids
    limit = params.data.max_seq_length
    return {
        "input_ids": full[:limit],
        "attention_mask": [1] * min(len(full), limit),
        "labels": ([IGNORE] * len(prompt_ids) + response_ids)[:limit],
        "truncated": len(full) > limit,
        "trainable": len(prompt_ids) < limit,
        "length": len(full),
    }
