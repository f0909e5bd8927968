"""`tuneline data push|pull`: data versioned by DVC, stored in the DVC remote (S3 or a folder).

The default remote is set in `.dvc/config`: a local folder beside the clone in the embedded
default, `s3://bucket/path` in production (`dvc remote add -d storage s3://...`, see README).
An S3 remote reads its endpoint, region and credentials from the environment, the same
variables as boto3 (`AWS_ENDPOINT_URL_S3`/`AWS_ENDPOINT_URL`, `AWS_DEFAULT_REGION`,
`AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`), or from `.dvc/config.local`, which git ignores.

DVC is run as a command (`python -m dvc`, the interpreter's own), its stable interface.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import yaml

from tasks.errors import TunelineError


def dvc(*args: str, repo: Path | str = ".") -> str:
    """Run `dvc ARGS` in `repo`; its stdout, or a TunelineError with DVC's own message."""
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
        detail = "\n".join(lines[-15:]) or f"exit code {proc.returncode}"
        raise TunelineError(f"dvc {' '.join(args)} failed in {Path(repo).resolve()}:\n{detail}")
    return proc.stdout


def out_hash(dvc_file: Path | str) -> str:
    """The content hash DVC recorded in a `.dvc` file (md5; `<md5>.dir` for a folder)."""
    outs = (yaml.safe_load(Path(dvc_file).read_text(encoding="utf-8")) or {}).get("outs") or []
    if len(outs) != 1 or "md5" not in outs[0]:
        raise TunelineError(f"{dvc_file}: expected one output with an md5 hash")
    return str(outs[0]["md5"])


def data_hash(repo: Path | str = ".") -> str:
    """One digest of every output DVC tracks in `repo` (its `.dvc` files and `dvc.lock`)."""
    from dvc.repo import Repo

    with Repo(str(repo)) as r:
        outs = sorted(f"{o.def_path}:{o.hash_info.value}" for o in r.index.outs if o.use_cache and o.hash_info)
    return hashlib.md5("\n".join(outs).encode()).hexdigest()


def push(path: Path | str | None = None, *, remote: str | None = None, repo: Path | str = ".") -> str:
    """`dvc add PATH` (when given), then `dvc push` (PATH's data, else all tracked data).

    Returns the data hash: PATH's DVC md5 (what `PATH.dvc` records), else `data_hash(repo)`.
    Commit `PATH.dvc` with git afterwards: it is what a clone pulls by.
    """
    remote_args = ["--remote", remote] if remote else []
    if path is None:
        dvc("push", *remote_args, repo=repo)
        return data_hash(repo)
    target = Path(path)
    dvc("add", str(target), repo=repo)
    dvc_file = target.with_name(target.name + ".dvc")
    dvc("push", *remote_args, str(dvc_file), repo=repo)
    return out_hash(Path(repo) / dvc_file)


def pull(*, remote: str | None = None, repo: Path | str = ".") -> str:
    """`dvc pull`: fetch every tracked output from the remote into the workspace; DVC's summary."""
    return dvc("pull", *(["--remote", remote] if remote else []), repo=repo).strip()
