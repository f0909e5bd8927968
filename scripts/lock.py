"""The locked install: write the lock files, check them against their inputs, check .venv against them.

    python scripts/lock.py            # make lock: resolve pyproject + scripts/lock/*.in again, keeping the
                                      # versions the locks pin where they still fit; write the locks
    python scripts/lock.py --upgrade  # make lock-upgrade: the same, taking the newest versions that fit
    python scripts/lock.py --check    # scripts/install.sh, first: fail if a lock is older than its inputs
    python scripts/lock.py --verify   # scripts/install.sh, last: fail unless .venv holds exactly the lock

Each lock starts with the sha256 of what it was resolved from (pyproject's dependency lists and the files in
scripts/lock/), so an edit there without `make lock` stops the install instead of installing a stale set.
Standard library only: it runs before .venv exists.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LOCK_DIR = REPO / "scripts" / "lock"
TARGET = ["--python-version", "3.11", "--python-platform", "x86_64-manylinux_2_28"]
WHEELS = "/opt/wheels"  # the machine's local CPU build of torch (scripts/lock/constraints.txt)
DIGEST = re.compile(r"^# inputs-sha256: ([0-9a-f]{64})$", re.M)
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)", re.M)

# lock file -> (what uv resolves, [pyproject extras])
LOCKS = {
    "requirements.lock": (["pyproject.toml", "scripts/lock/extra.in"], ["dev"]),
    "requirements-checkov.lock": (["scripts/lock/checkov.in"], []),
}
SHARED = ["scripts/lock/constraints.txt", "scripts/lock/overrides.txt"]


def digest(sources: list[str]) -> str:
    h = hashlib.sha256()
    for name in [*sources, *SHARED]:
        if name == "pyproject.toml":  # only what resolution reads: tool settings may change freely
            project = tomllib.loads((REPO / name).read_text(encoding="utf-8"))["project"]
            text = json.dumps([project.get("dependencies", []), project.get("optional-dependencies", {}),
                               project.get("requires-python")], sort_keys=True)
        else:
            text = (REPO / name).read_text(encoding="utf-8")
        h.update(f"{name}\0{text}\0".encode())
    return h.hexdigest()


def uv() -> str:
    local = REPO / ".venv" / "bin" / "uv"
    return str(local) if local.exists() else "uv"


def write_locks(upgrade: bool) -> None:
    for lock, (sources, extras) in LOCKS.items():
        # uv keeps the versions pinned in the output file it is given unless told to upgrade: adding one
        # dependency then moves nothing else.
        tmp = REPO / f".{lock}.tmp"
        tmp.write_text("" if upgrade or not (REPO / lock).exists() else (REPO / lock).read_text(encoding="utf-8"),
                       encoding="utf-8")
        cmd = [uv(), "pip", "compile", "--quiet", "--no-header", "--generate-hashes", *TARGET,
               "--find-links", WHEELS, "-c", SHARED[0], "--override", SHARED[1], "-o", str(tmp), *sources]
        cmd += [arg for extra in extras for arg in ("--extra", extra)]
        subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, text=True)
        body = tmp.read_text(encoding="utf-8")
        header = (f"# inputs-sha256: {digest(sources)}\n# Written by `make lock` (scripts/lock.py) from "
                  f"{', '.join(sources)}; installed by scripts/install.sh. Do not edit.\n")
        tmp.write_text(header + body, encoding="utf-8")
        os.replace(tmp, REPO / lock)
        print(f"lock: {lock}: {len(PIN.findall(body))} packages")


def check() -> int:
    stale = []
    for lock, (sources, _) in LOCKS.items():
        path = REPO / lock
        found = DIGEST.search(path.read_text(encoding="utf-8")) if path.exists() else None
        if not found or found.group(1) != digest(sources):
            stale.append(f"{lock} (from {', '.join(sources)})")
    if stale:
        print(f"lock: out of date with its inputs: {'; '.join(stale)}. Run `make lock` and commit the lock "
              "with the change.", file=sys.stderr)
        return 1
    return 0


def normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


# Tuneline itself (editable, from the tree) and the pip that `python -m venv` seeds, which installs uv.
SEEDS = {"tuneline", "pip"}


def verify(lock: str, python: str) -> int:
    """The distributions installed for `python`, against the lock's pins (Tuneline itself aside)."""
    want = {normal(n): v for n, v in PIN.findall((REPO / lock).read_text(encoding="utf-8"))}
    listing = subprocess.run([python, "-c", "import importlib.metadata as m, json; print(json.dumps("
                              "[(d.metadata['Name'], d.version) for d in m.distributions()]))"],
                             check=True, capture_output=True, text=True).stdout
    have = {normal(n): v for n, v in json.loads(listing) if normal(n) not in SEEDS}
    diff = sorted(f"{n}: lock {want.get(n, '-')}, installed {have.get(n, '-')}"
                  for n in want.keys() | have.keys() if want.get(n) != have.get(n))
    if diff:
        print(f"lock: {python} differs from {lock}:\n  " + "\n  ".join(diff), file=sys.stderr)
        return 1
    print(f"lock: {python} holds exactly {lock} ({len(want)} packages)")
    return 0


if __name__ == "__main__":
    args = sys.argv[1:]
    if args == ["--check"]:
        sys.exit(check())
    if args == ["--verify"]:
        sys.exit(verify("requirements.lock", ".venv/bin/python")
                 or verify("requirements-checkov.lock", ".venv/checkov/bin/python"))
    if args not in ([], ["--upgrade"]):
        sys.exit(__doc__)
    write_locks(upgrade=bool(args))
