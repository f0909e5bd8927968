"""What a job's folder tells: per-step training metrics, checkpoints, tokens, the gate and the model.

Read from the files the stages write (reports/train_log.csv, train.json, gate.json, merge.json; while
training runs, the health journal beside its checkpoints), so they are true whichever process asks.
"""

from __future__ import annotations

import csv
import io
import json
from typing import Any

from tuneline.atomic import read_json
from tuneline.config import Params

HEALTH = ("loss", "learning_rate", "grad_norm", "tokens_per_s")


def _number(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def train_rows(params: Params) -> list[dict[str, Any]]:
    """One row per logged step: the finished log, else the journal of the training in progress."""
    done = params.report("train_log.csv")
    if done.exists():
        return [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(io.StringIO(done.read_text()))]
    journal = params.train.checkpoint_dir / "train_log.jsonl"
    if journal.exists():
        lines = journal.read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines if line.strip().endswith("}")]  # a line being written waits
    return []


def metrics_csv(rows: list[dict[str, Any]]) -> str:
    """The result file: step, train_loss and the other health figures of each logged step."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["step", "train_loss", "learning_rate", "grad_norm", "tokens_per_s", "epoch"])
    for r in rows:
        writer.writerow([int(r["step"]), r.get("loss"), r.get("learning_rate"), r.get("grad_norm"),
                         r.get("tokens_per_s"), r.get("epoch")])
    return buf.getvalue()


def health_lines(rows: list[dict[str, Any]], spike_factor: float) -> list[tuple[str, str]]:
    """(level, message) per logged step, a warning where the loss spiked over its running mean (as train warns)."""
    lines, total, seen = [], 0.0, 0
    for r in rows:
        loss = _number(r.get("loss"))
        figures = ", ".join(f"{k} {r[k]:.4g}" for k in HEALTH if _number(r.get(k)) is not None)
        lines.append(("info", f"step {int(r['step'])}: {figures}"))
        if loss is not None and seen and loss > spike_factor * (total / seen):
            lines.append(("warn", f"step {int(r['step'])}: loss spike, {loss:.4f} is over {spike_factor}x the "
                                  f"running mean {total / seen:.4f}"))
        if loss is not None:
            total, seen = total + loss, seen + 1
    return lines


def checkpoints(params: Params, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The steps training saved a checkpoint at (every train.save_steps, and the last), newest first."""
    if not rows:
        return []
    last = int(rows[-1]["step"])
    saved = [r for r in rows if int(r["step"]) % params.train.save_steps == 0 or int(r["step"]) == last]
    return [{"step": int(r["step"]), "metrics": {"step": int(r["step"]), "train_loss": r.get("loss")}}
            for r in reversed(saved)]


def fraction_done(params: Params, rows: list[dict[str, Any]]) -> float | None:
    if not rows:
        return None
    t = params.train
    if t.max_steps > 0:
        return min(1.0, float(rows[-1]["step"]) / t.max_steps)
    epoch = _number(rows[-1].get("epoch"))
    return min(1.0, epoch / t.epochs) if epoch else None


def outcome(params: Params) -> dict[str, Any]:
    """After the run: trained tokens, the gate's decision and reasons, and the registered version if any."""
    out: dict[str, Any] = {"trained_tokens": None, "decision": None, "reasons": [], "model_name": None,
                           "version": None}
    if params.report("train.json").exists():
        out["trained_tokens"] = read_json(params.report("train.json")).get("tokens_seen")
    if params.report("gate.json").exists():
        gate = read_json(params.report("gate.json"))
        out["decision"], out["reasons"] = gate.get("decision"), [str(r) for r in gate.get("reasons") or []]
    if out["decision"] == "promote" and params.report("merge.json").exists():
        merge = read_json(params.report("merge.json"))
        out["model_name"], out["version"] = merge.get("model_name"), merge.get("version")
    return out
