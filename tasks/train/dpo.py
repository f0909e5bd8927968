"""The train stage under `train.method: dpo`: preference tuning of an SFT adapter with TRL's DPOTrainer.

The adapter a previous SFT run wrote (`train.dpo_from`) trains on the validated
preference pairs (`data.format: preference`): for each prompt, the chosen
answer's log-probability rises against the rejected one's, measured relative to
a reference model. The reference is that same SFT adapter, frozen: TRL copies
it into a second adapter (`ref`) of the one PEFT model, so no second model is
loaded (the DPO paper's choice, pi_ref = pi_SFT; the bare base model would
credit the policy with everything SFT already learned).

The rest is the SFT stage's, reused from tuneline/training/ (trainer.py, supervision.py):
the training arguments, atomic checkpoints and resume, the health log, the
MLflow run, the adapter written as safetensors to `train.output_dir`. TRL's
preference figures of each logged step (rewards/accuracies, rewards/margins,
rewards/chosen, logps/rejected, ...) go to MLflow as `dpo.rewards.accuracies`
and so on; the last reward accuracy and margin go into reports/train.json.
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import TrainerCallback
from trl import DPOConfig, DPOTrainer

from tuneline import tracking
from tuneline.config import Params
from tuneline.errors import TunelineError
from tuneline.formats import render, to_messages, with_rejected_answer
from tuneline.models import load_tokenizer
from tuneline.training import supervision
from tuneline.training.trainer import fit, load_base, supervise, training_args


class DPOTunelineTrainer(supervision.TunelineTrainer, DPOTrainer):
    """TRL's DPO loss and data handling, with the engine's atomic checkpoints and stop on a non-finite loss."""


class RewardLog(TrainerCallback):
    """Each logged step's preference figures to MLflow: `rewards/margins` becomes `dpo.rewards.margins`.

    Through tracking's outbox, as the health log's: a tracking server outage does not stop training."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        figures = {f"dpo.{key.replace('/', '.')}": float(v) for key, v in (logs or {}).items() if "/" in key}
        if figures and state.is_world_process_zero:
            tracking.log_metrics(figures, step=state.global_step)


def row(record: dict, template: str) -> dict:
    """One pair as TRL takes it, prompt and answers rendered as SFT rendered them."""
    if template == "tokenizer":  # as messages: TRL applies the chat template itself, without a second BOS
        chosen, rejected = to_messages(record, "preference"), to_messages(with_rejected_answer(record), "preference")
        return {"prompt": chosen[:-1], "chosen": chosen[-1:], "rejected": rejected[-1:]}
    prompt, chosen = render(record, "preference", template)
    rejected = render(with_rejected_answer(record), "preference", template)[1]
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def preference_split(path: Path, template: str):
    """A validated preference file (data/validated/*.jsonl) as TRL's dataset."""
    from datasets import Dataset

    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    return Dataset.from_list([row(r, template) for r in records])


def sft_adapter(params: Params) -> Path:
    src = params.train.dpo_from
    if not (src / "adapter_config.json").is_file():
        raise TunelineError(f"train.dpo_from: no PEFT adapter in {src} (adapter_config.json); DPO starts from an "
                            "SFT adapter: train one first (train.method=sft), or point train.dpo_from at one")
    return src


def reward_summary(log_history: list[dict]) -> dict:
    """The last logged reward accuracy and margin (mean over the steps since the log before)."""
    logged = [entry for entry in log_history if "rewards/accuracies" in entry]
    if not logged:
        return {}
    return {"reward_accuracy": round(logged[-1]["rewards/accuracies"], 4),
            "reward_margin": round(logged[-1]["rewards/margins"], 4)}


def train(params: Params) -> dict:
    """DPO in this process (one of the torchrun workers, or the only process); the summary on rank 0."""
    from peft import PeftModel
    from transformers import set_seed

    set_seed(params.train.seed)
    src = sft_adapter(params)
    tokenizer = load_tokenizer(params)
    data, template, t = params.data.validated_dir, params.data.template, params.train
    has_eval = t.eval_steps > 0
    args = training_args(params, has_eval, DPOConfig, beta=t.dpo_beta, loss_type=[t.dpo_loss_type],
                          max_length=params.data.max_seq_length)
    base = load_base(params)
    model = PeftModel.from_pretrained(base, str(src), is_trainable=True)
    # A checkpoint resumes only onto the same pairs and the same SFT adapter.
    watch = supervise(params, args, model, tracking.file_md5(data / "train.jsonl", src / "adapter_model.safetensors"),
                      params.data.max_seq_length)
    trainer = DPOTunelineTrainer(
        model=model, args=args, processing_class=tokenizer,
        train_dataset=preference_split(data / "train.jsonl", template),
        eval_dataset=preference_split(data / "eval.jsonl", template) if has_eval else None,
        callbacks=[*watch.callbacks, RewardLog()])
    # TRL's frozen copy of the SFT adapter goes once training ends: the adapter written is the policy alone.
    return fit(params, args, trainer, model, tokenizer, watch, after_train=lambda: model.delete_adapter("ref"),
               extra=lambda done: {"dpo_from": str(src), **reward_summary(done.state.log_history)})
