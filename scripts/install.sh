#!/usr/bin/env bash
# Create .venv and install exactly requirements.lock into it (Tuneline's whole stack, the dev tools, the
# default base model's package), then Tuneline itself, editable. Idempotent: seconds once done.
# The lock is for CPython 3.11 on Linux x86_64 with the machine's local CPU build of torch (/opt/wheels);
# elsewhere, `make lock` resolves a lock for the machine at hand (README: Installs are locked).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
UV_SPEC=$(grep -o "^uv==[^ ]*" requirements.lock)  # the lock's own, so that the sync keeps it
"$PYTHON" scripts/lock.py --check
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
[ -x .venv/bin/uv ] || .venv/bin/python -m pip install --quiet --disable-pip-version-check "$UV_SPEC"
sync() { .venv/bin/uv pip sync --quiet --require-hashes --find-links /opt/wheels --python "$1" "$2"; }
sync .venv/bin/python requirements.lock
.venv/bin/uv pip install --quiet --no-deps --python .venv/bin/python -e .
[ -x .venv/checkov/bin/python ] || .venv/bin/uv venv --quiet --python .venv/bin/python .venv/checkov
sync .venv/checkov/bin/python requirements-checkov.lock
.venv/bin/python scripts/lock.py --verify
