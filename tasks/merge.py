"""Stage 6, merge: fold the adapter into the base, prove it, register a model version.

PEFT's merge_and_unload gives a plain transformers model. Before it is saved,
its logits on a few eval prompts must equal the adapter model's within
merge.check_atol, or the stage fails: a bad merge never reaches the registry.
"""

from __future__ import annotations

import json

from tuneline import quantize, registry, run_view, s3, tracking
from tuneline.atomic import atomic_dir, read_json, write_json
from tuneline.config import Params
from tuneline.errors import TunelineError
from tuneline.formats import render
from tuneline.models import encode_prompt, load_model, load_tokenizer


def probe_batch(params: Params, tokenizer):
    """A few real eval prompts, padded into one batch."""
    lines = (params.data.validated_dir / "eval.jsonl").read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines[: params.merge.check_inputs]]
    ids = [encode_prompt(tokenizer, render(r, params.data.format, params.data.template, tokenizer)[0],
                         params.data.template) for r in records]
    tokenizer.padding_side = "right"
    return tokenizer.pad({"input_ids": ids}, return_tensors="pt")


def logits(model, batch):
    import torch

    with torch.no_grad():
        return model(**batch).logits.float()


def merged_model(params: Params, tokenizer):
    """(merged model, max |logit difference| against the adapter model)."""
    if params.lora.method == "full":
        return load_model(params, path=params.train.output_dir), 0.0
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_model(params), str(params.train.output_dir)).eval()
    batch = probe_batch(params, tokenizer)
    before = logits(model, batch)
    merged = model.merge_and_unload()
    mask = batch["attention_mask"].bool()
    diff = float((logits(merged, batch) - before).abs()[mask].max())
    if diff > params.merge.check_atol:
        raise TunelineError(f"merge: merged model's logits differ from the adapter model's by {diff:.2e}, "
                            f"over merge.check_atol {params.merge.check_atol}; nothing was registered")
    return merged, diff


def run(params: Params) -> dict:
    gate = read_json(params.report("gate.json"))
    if gate["decision"] != "promote":
        reason = "gate decision is reject: " + "; ".join(gate.get("failed", []))
        write_json(params.report("merge.json"), {"skipped": True, "reason": reason})
        print(f"merge: skipped ({reason})")
        return {"skipped": True}

    quantize.check(params)
    tokenizer = load_tokenizer(params)
    model, diff = merged_model(params, tokenizer)
    with atomic_dir(params.merge.output_dir) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
    quantized = quantize.export(params, tokenizer, model) if params.merge.quantize != "none" else None

    data_files = [s3.local_path(p) for p in (params.data.train_path, params.data.eval_path) if p is not None]
    tags = {"tuneline.git_commit": tracking.git_commit(),
            "tuneline.dvc_data_hash": tracking.file_md5(*data_files),
            "tuneline.params_hash": tracking.params_hash(params),
            registry.WEIGHTS_TAG: tracking.file_md5(*sorted(params.merge.output_dir.glob("*.safetensors")))}
    with tracking.pipeline_run(params) as run:
        tags["tuneline.mlflow_run_id"] = run.info.run_id
        version = registry.register(params, model, tokenizer, tags)
        import mlflow

        mlflow.log_metric("merge.max_logit_diff", diff)
        if quantized is not None and quantized["retention"] is not None:
            mlflow.log_metric(f"merge.{quantized['quantize']}.retention", quantized["retention"])
        mlflow.set_tag("tuneline.model_version", version)
        gate = read_json(params.report("gate.json"))
        run_view.set_outcome(f"promoted v{version}", [f"registered as `models:/{params.registry.model_name}/"
                                                      f"{version}`", *gate["passed"]])
    out = {"model_name": params.registry.model_name, "version": version,
           "model_uri": f"models:/{params.registry.model_name}/{version}",
           "model_dir": str(params.merge.output_dir), "max_logit_diff": diff, **tags}
    summary = {"version": version, "max_logit_diff": f"{diff:.1e}"}
    if quantized is not None:
        out["quantized"] = {k: quantized[k] for k in ("model_dir", "size_mib", "retention")}
        summary[f"{quantized['quantize']}_retention"] = quantized["retention"]
        print(f"merge: {quantized['quantize']} copy in {quantized['model_dir']}, {quantized['size_mib']['quantized']} "
              f"MiB (full {quantized['size_mib']['full']} MiB), ROUGE-L retention {quantized['retention']}")
    write_json(params.report("merge.json"), out)
    return summary
