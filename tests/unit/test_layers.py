"""The layout's rules, checked: import contracts, the code deps of each DVC stage, module size."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from support.project import REPO

from tasks import ALL_STAGES

sys.path.insert(0, str(REPO / "scripts"))
import stage_code  # noqa: E402  (scripts/ is a folder of commands, not a package)

LAYERS = ("tuneline", "serving", "tasks", "flows")
MAX_LINES = 300


def test_import_contracts_hold():
    """Layers point down, stages are independent, no cycles, no underscore name crosses a module."""
    proc = subprocess.run([str(Path(sys.executable).parent / "lint-imports")], cwd=REPO, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert "0 broken" in proc.stdout


def test_dvc_yaml_lists_every_module_each_stage_runs():
    """DVC (and the Prefect flow, which keys its cache on dvc.yaml's deps) see any edit to a stage's code."""
    derived = stage_code.stage_code(ALL_STAGES)
    listed = stage_code.dvc_code_deps((REPO / "dvc.yaml").read_text(encoding="utf-8"))
    assert listed == derived, "dvc.yaml's code deps differ from what the stages import: run " \
                              "`.venv/bin/python scripts/stage_code.py --write`"


def test_modules_stay_small():
    sizes = {str(p.relative_to(REPO)): len(p.read_text(encoding="utf-8").splitlines())
             for layer in LAYERS for p in (REPO / layer).rglob("*.py") if "__pycache__" not in p.parts}
    assert {path: n for path, n in sizes.items() if n > MAX_LINES} == {}
