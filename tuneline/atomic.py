"""Atomic outputs: every file and folder is written beside its target, then renamed.

A failed or killed stage therefore leaves either the previous output or the new
one, never a half-written mix. A kill leaves its temp copy behind (named with the
dead process's id); the next write of the same output removes it. Running out of
space while writing becomes an OutOfSpace error that names the output.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tuneline.errors import raise_if_out_of_space

# Fault injection for tests and drills: SIGKILL this process just before the output of this name
# (a file or folder name, e.g. `tokenized`) is renamed into place, its new content complete beside it.
FAULT_KILL_ENV = "TUNELINE_FAULT_KILL_BEFORE"


def _tmp_sibling(path: Path, tag: str) -> Path:
    return path.parent / f".{path.name}.{tag}-{os.getpid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _clear_leftovers(path: Path) -> None:
    """Remove the temp copies of `path` that killed processes left (a live writer's are kept)."""
    for tag in ("tmp", "old"):
        for stale in path.parent.glob(f".{glob.escape(path.name)}.{tag}-*"):
            pid = stale.name.rsplit("-", 1)[1]
            if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
                if stale.is_dir():
                    shutil.rmtree(stale, ignore_errors=True)
                else:
                    stale.unlink(missing_ok=True)


def _publish(path: Path) -> None:
    if os.environ.get(FAULT_KILL_ENV) == path.name:
        os.kill(os.getpid(), signal.SIGKILL)


@contextmanager
def atomic_dir(path: Path | str) -> Iterator[Path]:
    """Yield an empty temp folder; on success it replaces `path`, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _clear_leftovers(path)
    tmp = _tmp_sibling(path, "tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise_if_out_of_space(e, path)
        raise
    replace_dir(tmp, path)


def replace_dir(src: Path | str, dst: Path | str) -> None:
    """Put the finished folder `src` in place of `dst` by renames (same filesystem)."""
    src, dst = Path(src), Path(dst)
    _clear_leftovers(dst)
    _publish(dst)
    old = _tmp_sibling(dst, "old")
    if dst.exists():
        os.replace(dst, old)
    os.replace(src, dst)
    shutil.rmtree(old, ignore_errors=True)


def write_text(path: Path | str, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _clear_leftovers(path)
    tmp = _tmp_sibling(path, "tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        _publish(path)
        os.replace(tmp, path)
    except OSError as e:
        raise_if_out_of_space(e, path)
        raise
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_json(path: Path | str, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: Path | str) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))
