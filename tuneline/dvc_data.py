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
import os
import subprocess
import sys
from pathlib import Path

import yaml

from tuneline.errors import TunelineError


def dvc(*args: str, repo: Path | str = ".") -> str:
    """Run `dvc ARGS` in `repo`; its stdout, or a TunelineError with DVC's own message."""
    # AWS's standard retry mode (3 attempts a request, and a retry quota that a dead endpoint soon uses up) makes a
    # push to an S3 remote that is gone fail in seconds; the legacy default retries each object 5 times, for minutes.
    env = {"AWS_RETRY_MODE": "standard", **os.environ}
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, capture_output=True, text=True, env=env)
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
    if path is None:
        _push(remote, repo)
        return data_hash(repo)
    target = Path(path)
    dvc("add", str(target), repo=repo)
    dvc_file = target.with_name(target.name + ".dvc")
    _push(remote, repo, str(dvc_file))
    return out_hash(Path(repo) / dvc_file)


def _push(remote: str | None, repo: Path | str, *targets: str) -> None:
    """`dvc push`; a failure names the remote and says what state it is left in."""
    try:
        dvc("push", *(["--remote", remote] if remote else []), *targets, repo=repo)
    except TunelineError as e:
        raise TunelineError(
            f"push to the DVC remote {remote_label(remote, repo)} failed, after the storage client's own retries "
            "(for S3: AWS_RETRY_MODE, standard unless set, and AWS_MAX_ATTEMPTS). On S3 an upload that breaks off "
            "stores nothing, so the remote holds no partial object; a push run again when the remote is back sends "
            f"what is missing.\n{e}") from e


def remote_label(remote: str | None, repo: Path | str = ".") -> str:
    """'NAME' (URL) of the remote a push or pull uses: the named one, else the default."""
    from dvc.repo import Repo

    with Repo(str(repo)) as r:
        name = remote or r.config["core"].get("remote")
        url = r.config["remote"].get(name, {}).get("url") if name else None
    if name is None:
        return "(none configured: `dvc remote add -d NAME URL`)"
    return f"'{name}' ({url})" if url else f"'{name}' (not defined in .dvc/config)"


def pull(*, remote: str | None = None, repo: Path | str = ".") -> str:
    """`dvc pull`: fetch every tracked output from the remote into the workspace; DVC's summary."""
    return dvc("pull", *(["--remote", remote] if remote else []), repo=repo).strip()
