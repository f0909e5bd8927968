"""Stage 3, train: the tokenized data and the base model -> a PEFT adapter (safetensors).

transformers' Trainer runs the loop (checkpoints, schedule, clipping); PEFT adds
LoRA or DoRA (or nothing, for `lora.method: full`). A callback writes each
logged step (loss, learning rate, grad norm, tokens/s) to MLflow and to
reports/train_log.csv, which dvc.yaml declares as a plot.
"""

from __future__ import annotations

import csv
import io
import time

from tasks import tracking
from tasks.atomic import atomic_dir, read_json, write_json, write_text
from tasks.config import Params
from tasks.models import load_model, load_tokenizer

LOG_FIELDS = ["step", "epoch", "loss", "learning_rate", "grad_norm", "tokens_per_s"]


def with_adapter(model, params: Params):
    """Wrap the base model in a PEFT adapter, or train all of it for `full`."""
    if params.lora.method == "full":
        return model
    from peft import LoraConfig, get_peft_model

    lora = params.lora
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=lora.target_modules, use_dora=lora.method == "dora",
                        task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def _log_callback(rows: list[dict]):
    """A TrainerCallback that collects log rows and mirrors them to the active MLflow run."""
    import mlflow
    from transformers import TrainerCallback

    class StepLog(TrainerCallback):
        def __init__(self):
            self.last = (time.perf_counter(), 0)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or "loss" not in logs:
                return
            now, tokens = time.perf_counter(), state.num_input_tokens_seen
            rate = (tokens - self.last[1]) / max(now - self.last[0], 1e-9)
            self.last = (now, tokens)
            row = {"step": state.global_step, "epoch": round(state.epoch or 0, 3), "loss": logs["loss"],
                   "learning_rate": logs.get("learning_rate"), "grad_norm": logs.get("grad_norm"),
                   "tokens_per_s": round(rate, 1)}
            rows.append(row)
            mlflow.log_metrics({f"train.{k}": float(v) for k, v in row.items()
                                if k not in ("step", "epoch") and v is not None}, step=state.global_step)

    return StepLog()


def _csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=LOG_FIELDS)
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _training_args(params: Params, has_eval: bool):
    import torch
    from transformers import TrainingArguments

    t = params.train
    gpu = torch.cuda.is_available()
    return TrainingArguments(
        output_dir=str(t.checkpoint_dir),
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        seed=t.seed,
        data_seed=t.seed,
        logging_steps=t.logging_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=t.eval_steps or None,
        bf16=gpu and torch.cuda.is_bf16_supported(),
        use_cpu=not gpu,
        include_num_input_tokens_seen="non_padding",
        remove_unused_columns=False,
        dataloader_num_workers=0,
        report_to="none",
        disable_tqdm=False,
    )


def _prior_reports(params: Params) -> dict[str, float]:
    """Validate and tokenize metrics, so the run holds every stage even under `dvc repro`."""
    metrics: dict[str, float] = {}
    for stage, name in (("validate", "validation.json"), ("tokenize", "tokenize.json")):
        path = params.report(name)
        if path.exists():
            metrics.update(tracking.numeric(read_json(path), f"{stage}."))
    return metrics


def run(params: Params) -> dict:
    import mlflow
    from datasets import load_from_disk
    from transformers import DataCollatorForSeq2Seq, Trainer, set_seed

    set_seed(params.train.seed)
    data = load_from_disk(str(params.data.tokenized_dir))
    tokenizer = load_tokenizer(params)
    model = with_adapter(load_model(params), params)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    has_eval = params.train.eval_steps > 0

    rows: list[dict] = []
    with tracking.pipeline_run(params, new=True, run_name=f"finetune-{params.registry.model_name}") as run:
        mlflow.set_tags({"tuneline.git_commit": tracking.git_commit(),
                         "tuneline.params_hash": tracking.params_hash(params)})
        tracking.log_section_params(params, "model", "data", "lora", "train")
        mlflow.log_metrics(_prior_reports(params))
        trainer = Trainer(
            model=model,
            args=_training_args(params, has_eval),
            train_dataset=data["train"],
            eval_dataset=data["eval"] if has_eval else None,
            data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100),
            callbacks=[_log_callback(rows)],
        )
        start = time.perf_counter()
        result = trainer.train()
        seconds = time.perf_counter() - start

        with atomic_dir(params.train.output_dir) as tmp:
            model.save_pretrained(str(tmp), safe_serialization=True)
            tokenizer.save_pretrained(str(tmp))
        summary = {
            "mlflow_run_id": run.info.run_id,
            "method": params.lora.method,
            "steps": result.global_step,
            "train_loss": round(result.training_loss, 4),
            "final_loss": rows[-1]["loss"] if rows else None,
            "seconds": round(seconds, 1),
            "tokens_seen": int(trainer.state.num_input_tokens_seen),
            "tokens_per_s": round(trainer.state.num_input_tokens_seen / seconds, 1),
            "trainable_params": trainable,
            "total_params": total,
        }
        mlflow.log_metrics({f"train.{k}": float(v) for k, v in summary.items()
                            if isinstance(v, int | float) and k != "steps"})
        write_text(params.report("train_log.csv"), _csv(rows))
        write_json(params.report("train.json"), summary)
    return {k: summary[k] for k in ("steps", "train_loss", "seconds", "tokens_per_s")}


if __name__ == "__main__":
    from tasks.stage import main

    main("train")
