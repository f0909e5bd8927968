"""The project code each stage runs, derived from its imports: what dvc.yaml must list as its code deps.

    .venv/bin/python scripts/stage_code.py           # prints each stage's code deps, as dvc.yaml lists them
    .venv/bin/python scripts/stage_code.py --write   # puts them into dvc.yaml (its other deps stay)

A stage runs its own module (or sub-package), the stage runner (tasks/__init__.py, tasks/__main__.py) and
every project module these import, directly or not, at the top of a module or inside a function (grimp
reads both), with the __init__.py of each package on the way. A folder stands for all of its modules when
the stage runs each of them. tests/unit/test_layers.py checks that dvc.yaml's code deps equal these, so
neither DVC nor the Prefect flow's cache (which reads dvc.yaml) can miss an edit to code a stage runs.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import grimp

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("tasks", "tuneline", "serving", "flows")


def _file(module: str) -> Path:
    path = REPO / module.replace(".", "/")
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def _compress(files: set[Path]) -> list[str]:
    """Files -> paths relative to the repo, a folder for each package all of whose modules are there."""
    out = set(files)
    for package in sorted({p.parent for p in files}, key=lambda p: len(p.parts)):
        modules = {p for p in package.rglob("*.py") if "__pycache__" not in p.parts}
        if modules and modules <= files and package != REPO / "tasks":
            out = {p for p in out if package not in p.parents} | {package}
    return sorted(str(p.relative_to(REPO)) for p in out if not any(q in p.parents for q in out if q.is_dir()))


def stage_code(stages: list[str]) -> dict[str, list[str]]:
    graph = grimp.build_graph(*PACKAGES, cache_dir=None)
    runner = {"tasks", "tasks.__main__"}
    deps = {}
    for stage in stages:
        own = {f"tasks.{stage}"} | graph.find_descendants(f"tasks.{stage}")
        modules = set()
        for module in own | runner:
            modules |= {module} | graph.find_upstream_modules(module)
        # Importing a module runs its packages' __init__.py first.
        modules |= {".".join(m.split(".")[:i]) for m in modules for i in range(1, m.count(".") + 1)}
        deps[stage] = _compress({_file(m) for m in modules})
    return deps


def dvc_code_deps(text: str) -> dict[str, list[str]]:
    """The code deps (the literal ones, without ${...}) of each stage of a dvc.yaml's text."""
    import yaml

    stages = yaml.safe_load(text)["stages"]
    return {name: [str(d) for d in stage.get("deps", []) if "${" not in str(d)] for name, stage in stages.items()}


def write_dvc_yaml(path: Path, deps: dict[str, list[str]]) -> None:
    """Replace each stage's code deps in dvc.yaml, keeping its data deps, comments and layout."""
    text = path.read_text(encoding="utf-8")
    for stage, paths in deps.items():
        block = re.compile(rf"(^  {stage}:\n(?:    (?!deps:).*\n)*    deps:\n)((?:      - .*\n)*)", re.M)
        found = block.search(text)
        data = [line for line in found.group(2).splitlines(keepends=True) if "${" in line]
        code = [f"      - {p}\n" for p in paths]
        text = text[:found.start(2)] + "".join(code + data) + text[found.end(2):]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    from tasks import ALL_STAGES

    derived = stage_code(ALL_STAGES)
    if sys.argv[1:] == ["--write"]:
        write_dvc_yaml(REPO / "dvc.yaml", derived)
    else:
        for name, paths in derived.items():
            print(f"{name}:\n" + "".join(f"      - {p}\n" for p in paths))
