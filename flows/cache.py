"""What each stage reads and writes, taken from dvc.yaml: the flow's cache keys come from here.

dvc.yaml already declares, per stage, its code and data dependencies, the params it
reads and its outputs. The flow reuses that declaration instead of keeping a second
one, so `dvc repro` and the Prefect flow agree on when a stage is up to date:

- cache key = hash of (stage name, the code files dvc.yaml lists for it: every module
  it imports, scripts/stage_code.py keeps them in step; the params it lists; the content
  of every data dependency);
- a cached result counts only while the stage's outputs are still the ones that
  run wrote (size and mtime of every file, recorded in the persisted result).

`${...}` in dvc.yaml is resolved against the run's Params (overrides included), by DVC's
own interpolation.
Paths that come from params are relative to the working directory (the project
root); literal paths (the code) to the folder of dvc.yaml.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from tuneline.config import Params

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class StageSpec:
    name: str
    code: tuple[str, ...]  # literal deps (code), relative to dvc.yaml's folder
    deps: tuple[str, ...]  # templated deps (data, models, reports), resolved against params
    params: tuple[str, ...]  # dotted keys or whole sections
    outs: tuple[str, ...]  # outs, metrics and plots, templated


def dvc_yaml() -> Path:
    """The project's dvc.yaml: the working directory's, else the one beside this package."""
    here = Path("dvc.yaml")
    return here.resolve() if here.exists() else REPO / "dvc.yaml"


@lru_cache(maxsize=4)
def _load(path: str, mtime_ns: int) -> dict[str, StageSpec]:
    import yaml

    stages = yaml.safe_load(Path(path).read_text(encoding="utf-8"))["stages"]
    specs = {}
    for name, stage in stages.items():
        deps = [str(d) for d in stage.get("deps", [])]
        outs = [next(iter(o)) if isinstance(o, dict) else str(o)
                for key in ("outs", "metrics", "plots") for o in stage.get(key, [])]
        params = [next(iter(p)) if isinstance(p, dict) else str(p) for p in stage.get("params", [])]
        specs[name] = StageSpec(name, tuple(d for d in deps if "${" not in d),
                                tuple(d for d in deps if "${" in d), tuple(params), tuple(outs))
    return specs


def specs() -> dict[str, StageSpec]:
    """Every stage of dvc.yaml, in order."""
    path = dvc_yaml()
    return _load(str(path), path.stat().st_mtime_ns)


def _lookup(tree: dict, dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        node = node[part]
    return node


def resolve(template: str, tree: dict) -> str | None:
    """`${data.train_path}` -> its value in params, interpolated by DVC itself; None for a null value."""
    from dvc.parsing.context import Context

    value = Context(tree).resolve_str(template)
    return None if value is None else str(value)


def _params_tree(params: Params) -> dict:
    return params.model_dump(mode="json", by_alias=True)


# md5 of a file, remembered by (path, size, mtime, inode): hashing the same file twice in a
# process (the flow computes a key, Prefect computes it again) costs one stat.
_MD5: dict[tuple, str] = {}


def file_md5(path: Path) -> str:
    st = path.stat()
    memo = (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)
    if memo not in _MD5:
        h = hashlib.md5()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _MD5[memo] = h.hexdigest()
    return _MD5[memo]


def _files(path: Path) -> list[Path]:
    """The files of a folder, without Python's bytecode (.dvcignore leaves it out of DVC's hashes too)."""
    return sorted(p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc")


def content_hash(path: Path) -> str:
    """md5 of a file; of a folder, md5 over (relative path, md5) of every file in it; 'missing'."""
    if path.is_file():
        return file_md5(path)
    if path.is_dir():
        listing = [(str(p.relative_to(path)), file_md5(p)) for p in _files(path)]
        return hashlib.md5(json.dumps(listing).encode()).hexdigest()
    return "missing"


def _local(dep: str) -> Path:
    """A dependency as a local path: an s3:// URI is its cached copy (tuneline/s3.py fetches it)."""
    if "://" in dep:
        from tuneline import s3

        return Path(s3.local_path(dep))
    return Path(dep)


def data_hash(params: Params) -> str | None:
    """The run's input data: DVC's md5 of data.train_path (and data.eval_path); None if not there yet."""
    from tuneline import tracking

    paths = [str(p) for p in (params.data.train_path, params.data.eval_path) if p is not None]
    if any("://" in p for p in paths):
        local = [_local(p) for p in paths]
    else:
        local = [Path(p) for p in paths]
    if not all(p.is_file() for p in local):
        return None
    return tracking.file_md5(*local)


def cache_key(name: str, params: Params) -> str:
    """The stage's cache key: its code, the params it reads and the content of its inputs."""
    spec = specs()[name]
    tree = _params_tree(params)
    base = dvc_yaml().parent
    code = {c: content_hash(base / c) for c in sorted(spec.code)}
    values = {}
    for key in spec.params:
        try:
            values[key] = _lookup(tree, key)
        except (KeyError, TypeError):
            values[key] = "<absent>"
    deps = {}
    for template in spec.deps:
        dep = resolve(template, tree)
        if dep is not None:
            deps[dep] = content_hash(_local(dep))
    blob = json.dumps({"stage": name, "code": code, "params": values, "deps": deps}, sort_keys=True, default=str)
    return f"tuneline-{name}-{hashlib.sha256(blob.encode()).hexdigest()[:32]}"


def outputs(name: str, params: Params) -> dict[str, Any]:
    """Fingerprint of the stage's outputs: (size, mtime) of each file; None for a missing output."""
    tree = _params_tree(params)
    out: dict[str, Any] = {}
    for template in specs()[name].outs:
        path = resolve(template, tree)
        if path is None:
            continue
        p = Path(path)
        if p.is_file():
            st = p.stat()
            out[path] = [st.st_size, st.st_mtime_ns]
        elif p.is_dir():
            out[path] = [[str(f.relative_to(p)), *_stat(f)] for f in _files(p)]
        else:
            out[path] = None
    return out


def _stat(path: Path) -> list[int]:
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns]
