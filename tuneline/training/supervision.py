"""What watches a training run: safe checkpoints, a health monitor, preemption.

- Checkpoints are written into a staging folder and renamed into place, so a
  kill at any moment leaves only complete `checkpoint-N` folders behind.
- A non-finite loss stops training at once, keeping the last good checkpoint.
- SIGTERM (a spot preemption notice) saves a checkpoint at the end of the
  current step and stops; the next run resumes from it.
- Every logged step reports loss, learning rate, grad norm, tokens/s, an MFU
  estimate and peak GPU memory to MLflow and to the CSV log; a loss spike over
  `train.loss_spike_factor` times the running mean is flagged.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import time
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import get_last_checkpoint, rotate_checkpoints

from tuneline import tracking
from tuneline.errors import TunelineError
from tuneline.training.batching import PADDING

log = logging.getLogger("tuneline")

# Fault injection for tests and drills: the loss of this optimizer step becomes NaN.
FAULT_NAN_ENV = "TUNELINE_FAULT_NAN_AT_STEP"
# bf16 dense peak of the GPUs MFU is quoted against; override with TUNELINE_PEAK_TFLOPS.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0}


class NonFiniteLoss(TunelineError):
    pass


class Preempted(TunelineError):
    pass


class TunelineTrainer(Trainer):
    """Trainer with atomic checkpoints, a stop on non-finite loss, token-budget batches (`batch_tokens`),
    regional compilation (`compile_regions`) and the last layers out of checkpointing (`skip_checkpointing`)."""

    def __init__(self, *args, batch_tokens: int = 0, compile_regions: bool = False, dynamic: bool = False,
                 skip_checkpointing: int = 0, **kwargs):
        self.compile_regions, self.dynamic = compile_regions, dynamic  # read while Trainer builds its Accelerator
        super().__init__(*args, **kwargs)
        if self.args.torch_compile and self.args.gradient_checkpointing:
            # transformers' attention forward (through the `kernels` package it requires) sets and resets a
            # context variable: a side effect Dynamo refuses inside a checkpointed layer unless the recompute
            # need not replay it (it need not: the value is back on return). Refused, the decoder stack fell
            # back to eager (an H100, 8B checkpointed: 7,579 tokens/s against 11,540; bench/results/peer_h100.txt).
            torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
        self.batch_tokens, self.skip_checkpointing = batch_tokens, skip_checkpointing
        self.checkpointing_set = False  # skip_checkpointing and drop_input_grad_hooks applied
        self.padding = 0  # of the last batch prepared (train.pad_to_multiple)

    def _build_accelerator_args(self, **kwargs):
        # Trainer hands accelerate a TorchDynamoPlugin with no say over regional or dynamic compilation.
        # Regional: one decoder layer compiles and the others reuse it, instead of one graph of the whole model.
        # Dynamic from the first step (`dynamic`: packed rows, whose length changes every step): automatic dynamic
        # shapes would compile a static graph first and again at step two. For the regions, one compile (an H100:
        # 107 s); the whole model stays automatic, since one dynamic compile of it took as long as both (250 s).
        args = super()._build_accelerator_args(**kwargs)
        plugin = args.get("dynamo_plugin")
        if plugin is not None and self.compile_regions:
            plugin.use_regional_compilation = True
            plugin.dynamic = True if self.dynamic else plugin.dynamic
        return args

    def get_train_dataloader(self):
        if not self.batch_tokens:
            return super().get_train_dataloader()
        from torch.utils.data import DataLoader

        from tuneline.training.batching import TokenBudgetBatches, example_lengths

        batches = TokenBudgetBatches(example_lengths(self.train_dataset), self.batch_tokens, self.args.seed)
        loader = DataLoader(self.train_dataset, batch_sampler=batches, collate_fn=self.data_collator,
                            num_workers=self.args.dataloader_num_workers, pin_memory=self.args.dataloader_pin_memory)
        return self.accelerator.prepare(loader)

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.args.gradient_checkpointing and not self.checkpointing_set:
            # On the model that runs, once Trainer has turned checkpointing on: regional compilation runs
            # copies of the layers, which the model Trainer hands its callbacks does not hold.
            skip_checkpointing(model, self.skip_checkpointing)
            drop_input_grad_hooks(model)
            self.checkpointing_set = True
        loss = super().training_step(model, inputs, num_items_in_batch)
        step = self.state.global_step + 1
        if os.environ.get(FAULT_NAN_ENV) == str(step):
            loss = loss * float("nan")
        if not torch.isfinite(loss):
            last = get_last_checkpoint(self.args.output_dir) if os.path.isdir(self.args.output_dir) else None
            raise NonFiniteLoss(f"train: loss is {loss.item()} at step {step}; training stopped. "
                                f"Last good checkpoint: {last or 'none yet'}. Lower train.learning_rate "
                                "or check the data, then run again (it resumes from that checkpoint).")
        return loss

    def _prepare_inputs(self, inputs):
        self.padding = inputs.pop(PADDING, 0)  # not a model input
        return super()._prepare_inputs(inputs)

    def _track_num_input_tokens(self, inputs):
        # A packed row is counted whole (trainer.py), its padding (train.pad_to_multiple) included.
        super()._track_num_input_tokens(inputs)
        if self.padding and self.args.include_num_input_tokens_seen != "no":
            padding = torch.tensor(self.padding, device=self.args.device)
            self.state.num_input_tokens_seen -= int(self.accelerator.gather(padding).sum())

    def _save_checkpoint(self, model, trial):
        if self.state.global_step >= self.state.max_steps:
            # The output is saved right after the last step, and transformers trains one step too many when
            # resumed from a checkpoint at max_steps: a run killed in between resumes from the one before.
            return
        final = self.args.output_dir
        name = f"checkpoint-{self.state.global_step}"
        staging = os.path.join(final, f".staging-{name}")
        self.args.output_dir = staging
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.output_dir = final
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            target = os.path.join(final, name)
            shutil.rmtree(target, ignore_errors=True)
            os.replace(os.path.join(staging, name), target)
            shutil.rmtree(staging, ignore_errors=True)
            rotate_checkpoints(output_dir=final, save_total_limit=self.args.save_total_limit, use_mtime=False)
        self.accelerator.wait_for_everyone()


def skip_checkpointing(model, layers: int) -> None:
    """Take the last `layers` decoder layers of `model` out of gradient checkpointing.

    Backward recomputes the forward of every checkpointed layer; memory the fused loss
    freed can hold some layers' activations instead (train.checkpoint_skip_layers).
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    checkpointed = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    for layer in checkpointed[max(0, len(checkpointed) - layers):]:
        layer.gradient_checkpointing = False


def drop_input_grad_hooks(model) -> None:
    """Remove the hooks that make the input embeddings' output require grad.

    transformers adds them whenever checkpointing is turned on: reentrant checkpointing drops the gradients
    of a layer whose inputs need none. Tuneline checkpoints non-reentrantly (trainer.training_args), which
    does not, so they only cost a backward into the first layer's input and, under torch.compile, a graph
    break (their `requires_grad_`) at the embeddings.
    """
    from transformers import PreTrainedModel

    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            module.disable_input_require_grads()


class PreemptionHandler(TrainerCallback):
    """On SIGTERM: finish the step, save a checkpoint, stop."""

    def __init__(self):
        self.requested_at: float | None = None
        signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame):
        self.requested_at = time.time()

    def on_step_end(self, args, state, control, **kwargs):
        if self.requested_at is not None:
            control.should_save = True
            control.should_training_stop = True


def flops_per_token(model, seq_len: int, checkpointing: bool) -> float:
    """Matmul FLOPs per trained token, as the baseline bench counts them (frozen weights: forward +
    input-gradient backward; trainable weights add the weight gradient; recompute adds a forward)."""
    cfg = model.config
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    embed = model.get_input_embeddings().weight.numel()
    layers, hidden = cfg.num_hidden_layers, cfg.hidden_size
    attention = 2 * 2 * layers * seq_len * hidden / 2
    recompute = 2 if checkpointing else 0
    return (4 + recompute) * (total - embed) + 2 * trainable + (4 + recompute / 2) * attention


def peak_flops() -> float | None:
    if not torch.cuda.is_available():
        return None
    if os.environ.get("TUNELINE_PEAK_TFLOPS"):
        return float(os.environ["TUNELINE_PEAK_TFLOPS"]) * 1e12
    name = torch.cuda.get_device_name()
    return next((tf * 1e12 for key, tf in PEAK_TFLOPS.items() if key in name), None)


class HealthMonitor(TrainerCallback):
    """Per logged step: the health figures, into `rows`, MLflow (rank 0) and warnings."""

    def __init__(self, rows: list[dict], flops_per_tok: float, spike_factor: float, world_size: int,
                 journal: Path):
        # The journal keeps the rows of earlier attempts, so a resumed run's log is whole.
        self.rows, self.flops_per_tok, self.spike_factor = rows, flops_per_tok, spike_factor
        self.journal = journal
        self.peak = peak_flops()
        self.world = world_size
        self.mean_loss: float | None = None
        self.last = (time.perf_counter(), 0)

    def on_train_begin(self, args, state, control, **kwargs):
        self.last = (time.perf_counter(), state.num_input_tokens_seen)
        if state.is_world_process_zero and self.journal.exists():
            earlier = [json.loads(line) for line in self.journal.read_text().splitlines()]
            self.rows.extend(r for r in earlier if r["step"] <= state.global_step)
            self.journal.write_text("".join(json.dumps(r) + "\n" for r in self.rows), encoding="utf-8")
            for row in self.rows:  # this attempt's MLflow run gets them too, so its history is whole
                tracking.log_metrics(_metrics(row), step=row["step"])

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "loss" not in logs or not state.is_world_process_zero:
            return
        now, tokens = time.perf_counter(), state.num_input_tokens_seen
        rate = (tokens - self.last[1]) / max(now - self.last[0], 1e-9)
        self.last = (now, tokens)
        loss = float(logs["loss"])
        row = {"step": state.global_step, "epoch": round(state.epoch or 0, 3), "loss": loss,
               "learning_rate": logs.get("learning_rate"), "grad_norm": logs.get("grad_norm"),
               "tokens_per_s": round(rate, 1)}
        if self.peak:
            row["mfu"] = round(rate / self.world * self.flops_per_tok / self.peak, 4)
            row["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        self.rows.append(row)
        with open(self.journal, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        tags = None
        if self.mean_loss is not None and loss > self.spike_factor * self.mean_loss:
            log.warning(f"train: loss spike at step {state.global_step}: {loss:.4f} is over "
                        f"{self.spike_factor}x the running mean {self.mean_loss:.4f}")
            tags = {"tuneline.loss_spike": f"step {state.global_step}: {loss:.4f}"}
        # Through tracking's outbox: a tracking server outage does not stop training.
        tracking.log_metrics(_metrics(row), step=state.global_step, tags=tags)
        self.mean_loss = loss if self.mean_loss is None else 0.9 * self.mean_loss + 0.1 * loss


def _metrics(row: dict) -> dict[str, float]:
    return {f"train.{k}": float(v) for k, v in row.items() if k not in ("step", "epoch") and v is not None}


def checkpoint_to_resume(checkpoint_dir: Path, key: str, resume: str, is_main: bool) -> str | None:
    """The newest complete checkpoint of this very configuration, or None (then the folder is reset)."""
    key_file = checkpoint_dir / "resume_key"
    same = key_file.exists() and key_file.read_text() == key
    latest = get_last_checkpoint(str(checkpoint_dir)) if checkpoint_dir.is_dir() else None
    if resume == "auto" and same and latest:
        return latest
    if is_main:
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
        checkpoint_dir.mkdir(parents=True)
        key_file.write_text(key)
    return None
