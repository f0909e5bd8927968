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
sync() { .venv/bin/uv pip sync --quiet --require-hashes --find-links /opt/wheels --python "$@"; }
# Bytecode now (about a minute, once): where PYTHONDONTWRITEBYTECODE is set, as on these machines, every process
# would otherwise compile what it imports from source, some 6 s for torch, transformers and peft, and the
# pipeline and the tests start hundreds of such processes (stages, torchrun and Ray workers, servers).
sync .venv/bin/python --compile-bytecode requirements.lock
.venv/bin/uv pip install --quiet --no-deps --python .venv/bin/python -e .
[ -x .venv/checkov/bin/python ] || .venv/bin/uv venv --quiet --python .venv/bin/python .venv/checkov
sync .venv/checkov/bin/python requirements-checkov.lock
.venv/bin/python scripts/lock.py --verify
# The browser tests (tests/e2e/test_uis.py) drive Debian's chromium through Playwright; Playwright's own
# browser download needs a network this project does not assume.
if [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "install: Debian's chromium for the browser tests (apt-get, about 20 s)"
    apt-get install -y -qq chromium >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq chromium >/dev/null; }
  else
    echo "install: no /usr/bin/chromium; the browser tests need it (apt-get install chromium)" >&2
  fi
fi
