"""merge.quantize: a torchao weight-only quantized copy of the merged model, and what it costs in quality.

The copy goes to `<merge.output_dir>-<quantize>` as safetensors (torchao's tensor subclasses serialize
there; nothing is pickled). It is scored with the evaluate stage's own scoring on the same eval records
as the full merged model, and reports/quantize.json records both models' sizes and metrics and the
retention, ROUGE-L(quantized) / ROUGE-L(full). The merge stage runs after evaluate and gate, so this
comparison lives here rather than in reports/eval.json.
"""

from __future__ import annotations

from pathlib import Path

from tuneline import scoring
from tuneline.atomic import atomic_dir, write_json
from tuneline.config import Params
from tuneline.errors import TunelineError

# torchao 0.18's int4 weight-only tensors need CUDA kernels: the default packing imports mslk (a GPU
# library), tile_packed_to_4d uses torch's tinygemm CUDA kernel, and there is no CPU packing.
INT4_GROUP_SIZE = 128


def device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def check(params: Params) -> None:
    """Fail before any work when the requested quantization cannot run or be scored here."""
    kind = params.merge.quantize
    if kind == "int4" and device() != "cuda":
        raise TunelineError("merge.quantize: int4 needs a CUDA GPU (torchao's int4 weight-only kernels have no CPU "
                            "path) and none is visible; use int8 or none on this machine")
    if kind != "none" and "rouge" not in params.evaluate.metrics:
        raise TunelineError(f"merge.quantize: {kind} is judged by ROUGE-L retention, but evaluate.metrics "
                            f"{params.evaluate.metrics} has no 'rouge'")


def quantized_dir(params: Params) -> Path:
    out = params.merge.output_dir
    return out.with_name(f"{out.name}-{params.merge.quantize}")


def torchao_config(kind: str):
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig
    from transformers import TorchAoConfig

    if kind == "int8":
        return TorchAoConfig(Int8WeightOnlyConfig())
    return TorchAoConfig(Int4WeightOnlyConfig(group_size=INT4_GROUP_SIZE, int4_packing_format="tile_packed_to_4d"))


def load_quantized(path: Path | str, kind: str | None = None):
    """The merged model at `path` quantized while loading (kind given), or a saved quantized copy (kind None)."""
    import torch
    from transformers import AutoModelForCausalLM

    kwargs = {} if kind is None else {"quantization_config": torchao_config(kind)}
    # tinygemm's int4 kernel takes bf16 activations only
    dtype = torch.bfloat16 if kind == "int4" else "auto"
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, device_map=device(), use_safetensors=True,
                                                **kwargs)


def retention(full: float, quantized: float) -> float | None:
    """ROUGE-L(quantized) / ROUGE-L(full); None for a full model that matches nothing (no quality to retain)."""
    return round(quantized / full, 4) if full > 0 else None


def size_mib(path: Path) -> float:
    return round(sum(f.stat().st_size for f in path.glob("*.safetensors")) / 2**20, 3)


def export(params: Params, tokenizer, merged) -> dict:
    """Write the quantized copy beside the merged model, score both, write reports/quantize.json.

    `merged` is the merged model the merge stage holds: it is scored on the copy's device, then put back
    where it was (registration logs it from there), before the copy loads."""
    kind, full_dir, out_dir = params.merge.quantize, params.merge.output_dir, quantized_dir(params)
    with atomic_dir(out_dir) as tmp:
        load_quantized(full_dir, kind).save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))

    records, examples = scoring.eval_inputs(params)
    prompts, references = scoring.prompts_and_references(records, params, tokenizer)

    def score(model) -> dict:
        return scoring.score_model(model, tokenizer, params, prompts, references, examples)[0]

    home = merged.device
    scores = {"full": score(merged.to(device()))}
    merged.to(home)
    scores["quantized"] = score(load_quantized(out_dir))
    full, quant = scores["full"]["rouge_l"], scores["quantized"]["rouge_l"]
    report = {"quantize": kind, "model_dir": str(out_dir), "num_samples": len(records),
              "size_mib": {"full": size_mib(full_dir), "quantized": size_mib(out_dir)},
              "rouge_l": {"full": full, "quantized": quant},
              "retention": retention(full, quant),
              "metrics": scores}
    write_json(params.report("quantize.json"), report)
    return report
