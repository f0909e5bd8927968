"""Supervised fine-tuning (`train.method: sft`): the tokenized data and the base model -> a PEFT adapter."""

from __future__ import annotations

from tuneline.config import Params
from tuneline.models import load_tokenizer
from tuneline.training.trainer import build_trainer, fit, load_base, supervise, training_args, with_adapter


def train(params: Params) -> dict:
    """Train in this process (one of the torchrun workers, or the only process)."""
    from datasets import load_from_disk
    from transformers import set_seed

    set_seed(params.train.seed)
    data = load_from_disk(str(params.data.tokenized_dir))
    tokenizer = load_tokenizer(params)
    has_eval = params.train.eval_steps > 0
    args = training_args(params, has_eval)  # also joins the process group under torchrun
    model = with_adapter(load_base(params), params)
    seq = min(params.data.max_seq_length, max(len(x) for x in data["train"]["input_ids"]))
    watch = supervise(params, args, model, data["train"]._fingerprint, seq)
    trainer, restore_head = build_trainer(params, args, model, tokenizer, data["train"],
                                          data["eval"] if has_eval else None, watch.callbacks)
    return fit(params, args, trainer, model, tokenizer, watch, after_train=restore_head)
