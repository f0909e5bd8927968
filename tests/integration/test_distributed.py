"""Distributed and resumable training on CPU: the real torchrun path, kills, SIGTERM, NaN.

Tolerances: a 2-process DDP run (gloo) with the same global batch and seed
must match the 1-process loss curve within 1e-4 relative (measured: 1e-7);
a run killed with SIGKILL and resumed must end at the same step count with a
final loss within 1e-3 relative of an uninterrupted run (the resumed run
restores optimizer, scheduler, RNG and data position).
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from support.project import REPO, tiny_params

from tasks import run_stage
from tuneline.atomic import read_json

STEPS = 40


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    params = tiny_params(root)
    for name in ("bootstrap", "validate", "tokenize"):
        run_stage(name, params)
    return root


def params_file(root: Path, name: str, **overrides) -> Path:
    settings = {"train__max_steps": STEPS, "train__save_steps": 5, "train__logging_steps": 1,
                "train__save_total_limit": 3, **overrides}
    params = tiny_params(root, **settings)
    params = params.model_copy(update={
        "reports_dir": root / f"reports-{name}",
        "train": params.train.model_copy(update={"output_dir": root / f"adapter-{name}",
                                                 "checkpoint_dir": root / f"ckpt-{name}"})})
    path = root / f"params-{name}.yaml"
    path.write_text(yaml.safe_dump(params.model_dump(mode="json", by_alias=True)))
    return path


def train_cmd(path: Path) -> list[str]:
    return [sys.executable, "-m", "tasks", "train", "--params", str(path)]


def env(**extra: str) -> dict[str, str]:
    e = {**os.environ, "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1", **extra}
    return e


def losses(root: Path, name: str) -> list[float]:
    rows = csv.DictReader((root / f"reports-{name}" / "train_log.csv").open())
    return [float(r["loss"]) for r in rows]


def start_and_wait_for(root: Path, name: str, path: Path, checkpoint: str, **extra: str) -> subprocess.Popen:
    proc = subprocess.Popen(train_cmd(path), cwd=root, env=env(**extra), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (root / f"ckpt-{name}" / checkpoint).exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no checkpoint within 300 s"
        time.sleep(0.05)
    return proc


def test_ddp_two_processes_match_one(project):
    one = params_file(project, "one", train__batch_size=8, train__max_steps=10)
    two = params_file(project, "two", train__batch_size=4, train__max_steps=10,
                      distributed__strategy="ddp", distributed__nproc_per_node=2)
    for path in (one, two):
        proc = subprocess.run(train_cmd(path), cwd=project, env=env(), capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert read_json(project / "reports-two" / "train.json")["world_size"] == 2
    a, b = losses(project, "one"), losses(project, "two")
    assert len(a) == len(b) == 10
    assert b == pytest.approx(a, rel=1e-4)


def test_kill_9_then_resume_finishes_like_an_uninterrupted_run(project):
    straight = params_file(project, "straight")
    subprocess.run(train_cmd(straight), cwd=project, env=env(), check=True, capture_output=True, timeout=600)

    killed = params_file(project, "killed")
    proc = start_and_wait_for(project, "killed", killed, "checkpoint-15")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (project / "adapter-killed").exists()
    complete = sorted(p.name for p in (project / "ckpt-killed").glob("checkpoint-*"))
    assert complete and all((project / "ckpt-killed" / c / "trainer_state.json").exists() for c in complete)

    again = subprocess.run(train_cmd(killed), cwd=project, env=env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from" in again.stdout
    summary = read_json(project / "reports-killed" / "train.json")
    assert summary["steps"] == STEPS and summary["resumed_from"]
    resumed, uninterrupted = losses(project, "killed"), losses(project, "straight")
    assert len(resumed) == len(uninterrupted) == STEPS
    assert resumed[-1] == pytest.approx(uninterrupted[-1], rel=1e-3)
    assert not (project / "ckpt-killed").exists()  # a finished run drops its checkpoints


def test_sigterm_saves_a_checkpoint_and_exits(project):
    path = params_file(project, "term", train__save_steps=1000)
    proc = subprocess.Popen(train_cmd(path), cwd=project, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    journal = project / "ckpt-term" / "train_log.jsonl"
    deadline = time.monotonic() + 300
    while not (journal.exists() and journal.read_text().count("\n") >= 3):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1
    assert "stopped on SIGTERM at step" in err
    step = int(err.split("stopped on SIGTERM at step ")[1].split(";")[0])
    assert (project / "ckpt-term" / f"checkpoint-{step}" / "adapter_model.safetensors").exists()
    assert not (project / "adapter-term").exists()


def test_nan_loss_stops_cleanly_and_keeps_the_last_checkpoint(project):
    path = params_file(project, "nan")
    proc = subprocess.run(train_cmd(path), cwd=project, env=env(TUNELINE_FAULT_NAN_AT_STEP="12"),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1
    assert "loss is nan at step 12" in proc.stderr and "Traceback" not in proc.stderr
    assert "ckpt-nan/checkpoint-10" in proc.stderr
    assert (project / "ckpt-nan" / "checkpoint-10").is_dir()
    assert not (project / "adapter-nan").exists()


def test_estimate_uses_the_measured_speed(project):
    path = project / "params-estimate.yaml"
    params = tiny_params(project, train__batch_size=8, train__max_steps=10)
    path.write_text(yaml.safe_dump(params.model_dump(mode="json", by_alias=True)))
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "estimate", "--params", str(path),
                           "--set", "cost.tokens_per_s_per_gpu=1000", "--set", "cost.gpu_hour_usd=3.6"],
                          cwd=project, env=env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = dict(line.split(": ", 1) for line in proc.stdout.splitlines())
    tokens = int(out["tokens"])
    assert tokens > 0 and out["gpus"] == "1"
    assert float(out["cost_usd"]) == pytest.approx(tokens / 1000 / 3600 * 3.6, abs=0.01)
