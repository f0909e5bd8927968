"""Stage 3, train: the tokenized data and the base model -> a PEFT adapter (safetensors).

`train.method` picks the recipe: sft.py (supervised, on the answers only) or dpo.py (preference
tuning of an SFT adapter). Both run on the engine of tuneline/training/. With more than one
process (params `distributed`) the stage relaunches itself through torchrun and Trainer runs
DDP, FSDP or DeepSpeed ZeRO. A run that was killed resumes from its newest complete checkpoint
(`train.resume: auto`). Only rank 0 writes outputs.
"""

from __future__ import annotations

from tasks.train import dpo, sft
from tuneline.atomic import read_json
from tuneline.config import Params
from tuneline.training import distributed


def run(params: Params) -> dict:
    if distributed.plan(params).world_size > 1 and not distributed.is_worker():
        distributed.relaunch(params)
        summary = read_json(params.report("train.json"))
    else:
        if params.train.method == "dpo":
            summary = dpo.train(params)
        else:
            summary = sft.train(params)
        if not summary:  # a worker other than rank 0
            return {}
    return {k: summary[k] for k in ("steps", "train_loss", "seconds", "tokens_per_s")}
