"""`tuneline estimate`: GPU-hours and cost of the train stage, before running it.

Tokens come from the tokenize report (or, with train.max_steps, from the step
count); the speed is `cost.tokens_per_s_per_gpu`, else the one the last
training run measured (reports/train.json).
"""

from __future__ import annotations

from tuneline.atomic import read_json
from tuneline.config import Params
from tuneline.errors import TunelineError
from tuneline.training import distributed


def estimate(params: Params) -> dict:
    path = params.report("tokenize.json")
    if not path.exists():
        raise TunelineError(f"{path}: not found; run `tuneline stage tokenize` first to count the tokens")
    train = read_json(path)["train"]
    gpus = distributed.plan(params).world_size
    t = params.train
    if t.max_steps > 0:
        mean_len = train["tokens"] / max(train["examples"], 1)
        tokens = t.max_steps * t.batch_size * t.grad_accum * gpus * mean_len
    else:
        tokens = train["tokens"] * t.epochs
    speed, source = params.cost.tokens_per_s_per_gpu, "cost.tokens_per_s_per_gpu"
    last = params.report("train.json")
    if speed is None and last.exists():
        measured = read_json(last)
        speed = measured["tokens_per_s"] / max(measured.get("world_size", 1), 1)
        source = f"measured by the last run ({last}, on {'GPU' if measured.get('gpu_hours') else 'CPU'})"
    if speed is None:
        raise TunelineError("no training speed known: set cost.tokens_per_s_per_gpu, or train once")
    hours = tokens / (speed * gpus) / 3600
    return {"tokens": int(tokens), "gpus": gpus, "tokens_per_s_per_gpu": round(speed, 1), "speed_from": source,
            "wall_hours": round(hours, 4), "gpu_hours": round(hours * gpus, 4),
            "cost_usd": round(hours * gpus * params.cost.gpu_hour_usd, 2)}
