"""Caches that cannot go stale: DVC and the Prefect flow both see every line of code a stage runs.

In a copy of the repo on the tiny project: after one run, with nothing edited, `dvc status` and a second
`tuneline run` both say up to date; after an edit to a helper the train stage imports (the chunked loss,
tuneline/training/loss.py), both say train must run again while bootstrap, validate and tokenize stay as they
are. The stages after train then run again where train's outputs changed (an edit that changes nothing the
model learns leaves the adapter byte for byte the same, and both tools rightly keep evaluate's result).
DVC and the flow each get their own copy: each rewrites outputs the other then sees as changed.
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
from support.project import REPO, tiny_params

from tasks import ALL_STAGES

CODE = ["tasks", "tuneline", "serving", "flows", "dvc.yaml", ".dvcignore"]
HELPER = Path("tuneline/training/loss.py")
AFTER_TRAIN = ALL_STAGES[ALL_STAGES.index("train"):]


def _copy(root: Path) -> Path:
    root.mkdir(parents=True)
    for name in CODE:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, root / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, root / name)
    # gate.min_rouge_l 1.0: the gate rejects, so merge and deploy do nothing (no registry, no Ray)
    params = tiny_params(root, gate__min_rouge_l=1.0, orchestration__results_dir=str(root / ".prefect-results"))
    (root / "params.yaml").write_text(yaml.safe_dump(params.model_dump(mode="json", by_alias=True), sort_keys=False))
    for cmd in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"]):
        subprocess.run(cmd, cwd=root, check=True, capture_output=True)
    return root


def _run(*cmd: str, cwd: Path, timeout: int = 600) -> str:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(HF_HUB_OFFLINE="1", PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


def _edit_helper(root: Path) -> None:
    with open(root / HELPER, "a", encoding="utf-8") as f:
        f.write("\n# an edit: the code the train stage runs is no longer the code its outputs came from\n")


def _dvc_stale(root: Path) -> list[str]:
    """The stages `dvc repro --dry` would run, in order."""
    out = _run(sys.executable, "-m", "dvc", "repro", "--dry", cwd=root)
    return re.findall(r"Running stage '(\w+)'", out)


def _flow(root: Path) -> tuple[list[str], list[str]]:
    """`tuneline run`: (stages it ran, stages that came from the cache), from its closing line."""
    out = _run(sys.executable, "-m", "flows.cli", "run", cwd=root)
    line = next(x for x in out.splitlines() if x.startswith("pipeline done in"))
    ran, cached = (re.search(rf"{word}: ([^;]+);", line).group(1) for word in ("ran", "cached"))
    return ([] if ran == "none" else ran.split(", ")), ([] if cached == "none" else cached.split(", "))


@pytest.mark.slow
def test_dvc_sees_an_edit_to_code_the_train_stage_imports(tmp_path):
    root = _copy(tmp_path / "dvc")
    _run(sys.executable, "-m", "dvc", "repro", cwd=root)
    assert "Data and pipelines are up to date" in _run(sys.executable, "-m", "dvc", "status", cwd=root)
    assert _dvc_stale(root) == []

    _edit_helper(root)
    status = _run(sys.executable, "-m", "dvc", "status", cwd=root)
    # train's deps changed (the folder dvc.yaml lists for the helper, or the helper itself) ...
    assert re.findall(r"^(\w+):$", status, re.M) == ["train"], status
    assert re.search(rf"modified:\s+({HELPER.parent}|{HELPER})\n", status), status
    assert _dvc_stale(root)[0] == "train"
    ran = re.findall(r"Running stage '(\w+)'", _run(sys.executable, "-m", "dvc", "repro", cwd=root))
    assert ran[0] == "train" and set(ran) <= set(AFTER_TRAIN), ran


@pytest.mark.slow
def test_the_flow_sees_an_edit_to_code_the_train_stage_imports(tmp_path):
    root = _copy(tmp_path / "prefect")
    ran, _ = _flow(root)
    assert ran == ALL_STAGES
    assert _flow(root) == ([], ALL_STAGES)

    _edit_helper(root)
    ran, cached = _flow(root)
    assert ran[0] == "train" and set(ran) <= set(AFTER_TRAIN), ran
    assert cached[:3] == ["bootstrap", "validate", "tokenize"], cached
