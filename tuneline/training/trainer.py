"""How every training run (SFT, DPO, sweep trials, benches) is built and run around transformers' Trainer.

transformers' Trainer runs the loop (schedule, clipping, data order); PEFT adds LoRA or
DoRA (nothing for `lora.method: full`); supervision.py adds atomic checkpoints, preemption
handling and the health monitor; loss.py the chunked cross-entropy. Only rank 0 writes
outputs and talks to MLflow.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass

from tuneline import run_view, tracking
from tuneline.atomic import read_json, replace_dir, write_json, write_text
from tuneline.config import Params
from tuneline.errors import TunelineError
from tuneline.models import load_model
from tuneline.training import distributed, lora_matmul, loss, supervision
from tuneline.training.batching import packed_collator

LOG_FIELDS = ["step", "epoch", "loss", "learning_rate", "grad_norm", "tokens_per_s", "mfu", "peak_mem_gib"]
SERIES_SUMMARIES = {"steps", "train_loss", "final_loss", "tokens_per_s"}  # in train.json, not MLflow metrics


def with_adapter(model, params: Params):
    """Wrap the base model in a PEFT adapter (over a 4-bit base for `qlora`), or train all of it for `full`."""
    if params.lora.method == "full":
        return model
    from peft import LoraConfig, get_peft_model

    lora = params.lora
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=lora.target_modules, use_dora=lora.method == "dora",
                        task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def _on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def _auto(value, default: bool) -> bool:
    return default if value == "auto" else bool(value)


def compiled(params: Params) -> bool:
    """torch.compile on a GPU; QLoRA stays eager: its 4-bit matmuls are bitsandbytes kernels the compiler can't fuse."""
    return _auto(params.train.compile, _on_gpu() and params.lora.method != "qlora")


def packed(params: Params) -> bool:
    """Padding-free rows: on a GPU with flex attention, fast and small only compiled; on a CPU with SDPA (README)."""
    return _auto(params.train.packing, compiled(params) or not _on_gpu())


def attention(params: Params) -> str | None:
    """The attention kernel: packed rows need one that skips the blocks between examples."""
    if params.model.attn_implementation != "auto":
        return params.model.attn_implementation
    return "flex_attention" if _on_gpu() and packed(params) else None


def cpu_bf16() -> bool:
    """A CPU with AVX-512 BF16 runs bf16 autocast natively: LoRA steps on SmolLM2 measured 25% faster."""
    import torch

    return bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)())


def load_base(params: Params):
    """The base model as every training run loads it: the attention kernel the speed paths need, 4-bit for qlora."""
    return load_model(params, attn_implementation=attention(params), quantize=params.lora.method == "qlora")


def training_args(params: Params, has_eval: bool, args_class=None, **extra):
    """TrainingArguments from params; `args_class` a subclass (TRL's DPOConfig) that takes `extra` too."""
    import torch
    from transformers import TrainingArguments

    t = params.train
    gpu = _on_gpu()
    return (args_class or TrainingArguments)(
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
        bf16=_auto(t.bf16, torch.cuda.is_bf16_supported() if gpu else cpu_bf16()),
        gradient_checkpointing=_auto(t.gradient_checkpointing, gpu),
        gradient_checkpointing_kwargs={"use_reentrant": False},  # LoRA needs no input grads: drop_input_grad_hooks
        torch_compile=compiled(params),
        torch_compile_mode=t.compile_mode if compiled(params) else None,
        use_cpu=not gpu,
        include_num_input_tokens_seen="non_padding",
        average_tokens_across_devices=True,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,
        report_to="none",
        disable_tqdm=False,
        **distributed.trainer_kwargs(params),
        **extra,
    )


def _csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=LOG_FIELDS)
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _prior_reports(params: Params, logged: set[str]) -> dict[str, float]:
    """Validate and tokenize metrics, so the run holds every stage even under `dvc repro`; not those the run
    has already (a pipeline run's validate logged its own: a second point would make them a history)."""
    metrics: dict[str, float] = {}
    for stage, name in (("validate", "validation.json"), ("tokenize", "tokenize.json")):
        path = params.report(name)
        if path.exists():
            metrics.update(tracking.numeric(read_json(path), f"{stage}."))
    return {key: value for key, value in metrics.items() if key not in logged}


def resume_key(params: Params, data_fingerprint: str) -> str:
    """What a checkpoint must have been trained on to be resumed from."""
    sections = {name: params.section(name) for name in ("model", "lora", "train")}
    for volatile in ("resume", "save_steps", "save_total_limit", "logging_steps"):
        sections["train"].pop(volatile)
    blob = json.dumps([sections, data_fingerprint], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def build_trainer(params: Params, args, model, tokenizer, train_data, eval_data=None, callbacks=()):
    """The Trainer every training run uses (the bench too): collator, loss and checkpointing from params.

    Returns (trainer, restore): `restore` puts back the vocabulary head the chunked loss took over.
    """
    from transformers import DataCollatorForSeq2Seq

    for key in ("batch_tokens", "pad_to_multiple"):
        if getattr(params.train, key) and not packed(params):
            raise TunelineError(f"train.{key} needs packed rows; set train.packing: true (packing is off by "
                                "default on a GPU when the model is not compiled)")
    if packed(params):
        model.config.use_cache = False  # the packed rows' mask comes from position ids, with no KV cache
        args.include_num_input_tokens_seen = "all"  # no mask to count by; pad_to_multiple's: supervision.py
        collator = packed_collator(params.train.pad_to_multiple, tokenizer)
    else:
        collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    if lora_matmul.wanted(params, _on_gpu()):
        lora_matmul.install(model)
    loss_func, restore = (loss.install(model, params.train.loss_chunk_tokens, compiled(params))
                          if _auto(params.train.chunked_loss, True) else (None, lambda: None))
    return supervision.TunelineTrainer(
        model=model, args=args, train_dataset=train_data, eval_dataset=eval_data, data_collator=collator,
        callbacks=list(callbacks), compute_loss_func=loss_func, batch_tokens=params.train.batch_tokens,
        compile_regions=params.train.compile_regions, dynamic=packed(params),
        skip_checkpointing=params.train.checkpoint_skip_layers), restore


@dataclass
class Supervision:
    """What watches one training run: the checkpoint it resumes, its health log, its SIGTERM handler."""

    resume_from: str | None
    rows: list[dict]
    monitor: supervision.HealthMonitor
    preemption: supervision.PreemptionHandler

    @property
    def callbacks(self) -> list:
        return [self.monitor, self.preemption]


def supervise(params: Params, args, model, data_fingerprint: str, seq_len: int) -> Supervision:
    """Supervision for a run on data with this fingerprint, sequences up to seq_len tokens (for the MFU)."""

    with args.main_process_first(desc="checkpoint lookup"):
        resume_from = supervision.checkpoint_to_resume(params.train.checkpoint_dir,
                                                       resume_key(params, data_fingerprint),
                                                       params.train.resume, distributed.rank() == 0)
    rows: list[dict] = []
    preemption = supervision.PreemptionHandler()
    monitor = supervision.HealthMonitor(rows, supervision.flops_per_token(model, seq_len, args.gradient_checkpointing),
                                   params.train.loss_spike_factor, args.world_size,
                                   journal=params.train.checkpoint_dir / "train_log.jsonl")
    return Supervision(resume_from, rows, monitor, preemption)


def fit(params: Params, args, trainer, model, tokenizer, watch: Supervision,
        after_train=lambda: None, extra=lambda trainer: {}) -> dict:
    """Train, in rank 0's new MLflow run (a pipeline run's run, renamed for the data now known); save the adapter.
    Rank 0 returns the summary (plus `extra(trainer)`), the others {}. `after_train` runs as soon as training
    ends, also when it fails."""

    is_main = distributed.rank() == 0
    name = run_view.run_name(params) if is_main else None
    with tracking.pipeline_run(params, new=True, run_name=name) if is_main else nullcontext() as run:
        if is_main:
            _log_run_start(params)
        if watch.resume_from:
            print(f"train: resuming from {watch.resume_from}")
        start = time.perf_counter()
        try:
            result = trainer.train(resume_from_checkpoint=watch.resume_from)
        finally:
            after_train()
        seconds = time.perf_counter() - start
        if watch.preemption.requested_at is not None:
            raise supervision.Preempted(f"train: stopped on SIGTERM at step {trainer.state.global_step}; a checkpoint "
                                   f"is in {params.train.checkpoint_dir}. Run again to resume.")
        save_adapter(params, trainer, tokenizer, is_main)
        if not is_main:
            return {}
        return _finish(params, trainer, result, model, watch.rows, seconds, args.world_size, run.info.run_id,
                       watch.resume_from, extra(trainer))


def save_adapter(params: Params, trainer, tokenizer, is_main: bool) -> None:
    """Every rank takes part (FSDP and ZeRO-3 gather the weights); rank 0 writes and renames."""
    out = params.train.output_dir
    staging = out.parent / f".{out.name}.staging"
    if is_main:
        shutil.rmtree(staging, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(str(staging))
    if is_main:
        # Trainer adds its arguments as a pickle; outputs hold safetensors and JSON only.
        (staging / "training_args.bin").unlink(missing_ok=True)
        tokenizer.save_pretrained(str(staging))
        replace_dir(staging, out)


def _log_run_start(params: Params) -> None:
    import mlflow

    mlflow.set_tags({"tuneline.git_commit": tracking.git_commit(), "tuneline.data_hash": run_view.data_hash(params),
                     "tuneline.params_hash": tracking.params_hash(params)})
    tracking.log_section_params(params, "model", "data", "lora", "train", "distributed")
    run_view.log_dataset("train", params.data.train_path)
    logged = set(mlflow.get_run(mlflow.active_run().info.run_id).data.metrics)
    mlflow.log_metrics(_prior_reports(params, logged))


def _finish(params, trainer, result, model, rows, seconds, world, run_id, resumed_from, extra=None) -> dict:
    """Rank 0: the log and the summary; drop the checkpoints of this finished run."""
    gpus = world if _on_gpu() else 0
    gpu_hours = seconds * gpus / 3600
    tokens = int(trainer.state.num_input_tokens_seen)
    summary = {
        "mlflow_run_id": run_id,
        "method": params.lora.method,
        "strategy": params.distributed.strategy,
        "world_size": world,
        "steps": result.global_step,
        "resumed_from": resumed_from,
        "train_loss": round(result.training_loss, 4),
        "final_loss": rows[-1]["loss"] if rows else None,
        "seconds": round(seconds, 1),
        "tokens_seen": tokens,
        "tokens_per_s": round(tokens / seconds, 1),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "total_params": sum(p.numel() for p in model.parameters()),
        "gpu_hours": round(gpu_hours, 4),
        "cost_usd": round(gpu_hours * params.cost.gpu_hour_usd, 4),
        **(extra or {}),
    }
    # The loss and the speed are the per-step series of the health log (train.loss, train.tokens_per_s):
    # their run averages stay in train.json, not as a second name or a step-0 point of the same quantity.
    tracking.log_metrics({f"train.{k}": float(v) for k, v in summary.items()
                          if isinstance(v, int | float) and k not in SERIES_SUMMARIES})
    write_text(params.report("train_log.csv"), _csv(rows))
    write_json(params.report("train.json"), summary)
    tracking.log_files(params.report("train.json"), params.report("train_log.csv"))
    shutil.rmtree(params.train.checkpoint_dir, ignore_errors=True)
    return summary
