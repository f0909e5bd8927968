"""The locked install: the lock files match their inputs, and the environment under test holds exactly them."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from support.project import REPO

LOCK = [sys.executable, str(REPO / "scripts" / "lock.py")]
installed = pytest.mark.skipif(not (REPO / ".venv" / "checkov").exists(), reason="needs scripts/install.sh's .venv")


def test_locks_match_pyproject_and_their_inputs():
    proc = subprocess.run([*LOCK, "--check"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


@installed
def test_installed_set_equals_the_lock():
    proc = subprocess.run([*LOCK, "--verify"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "holds exactly requirements.lock" in proc.stdout


@installed
def test_the_install_compiled_the_bytecode_of_what_every_stage_imports():
    """Where PYTHONDONTWRITEBYTECODE is set, a module without bytecode is compiled from source in every process."""
    missing = [name for name in ("torch", "transformers", "peft")
               if not Path(importlib.util.cache_from_source(importlib.util.find_spec(name).origin)).exists()]
    assert not missing, f"no bytecode for {missing}: scripts/install.sh syncs with --compile-bytecode"


def test_an_edited_dependency_list_is_caught(tmp_path):
    """A copy of the repo whose pyproject gained a dependency: --check names the lock and says what to run."""
    for name in ("pyproject.toml", "requirements.lock", "requirements-checkov.lock"):
        (tmp_path / name).write_bytes((REPO / name).read_bytes())
    shutil.copytree(REPO / "scripts", tmp_path / "scripts")
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace('"pyyaml>=6",', '"pyyaml>=6",\n    "six>=1",'))
    proc = subprocess.run([sys.executable, "scripts/lock.py", "--check"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 1
    assert "requirements.lock (from pyproject.toml, scripts/lock/extra.in)" in proc.stderr
    assert "requirements-checkov.lock" not in proc.stderr and "make lock" in proc.stderr
