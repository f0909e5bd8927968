#!/usr/bin/env bash
# Create .venv and install Tuneline with its whole stack (and the dev tools).
# torch goes first through pip: TORCH_SPEC pins the CPU build this project is
# tested with (override it on a GPU machine, e.g. TORCH_SPEC="torch==2.11.0").
# uv then resolves everything else in seconds, seeing torch as already satisfied.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check uv "$TORCH_SPEC"
.venv/bin/uv pip install --quiet --python .venv/bin/python -e ".[dev]"
# checkov (tests/test_infra.py) gets its own environment: it pins boto3, packaging and networkx to
# versions that clash with DVC's and Ray's, so it cannot share .venv's packages.
[ -x .venv/checkov/bin/checkov ] || { .venv/bin/uv venv --quiet --clear --python .venv/bin/python .venv/checkov \
  && .venv/bin/uv pip install --quiet --python .venv/checkov/bin/python "checkov==3.3.30"; }
echo "installed: $(.venv/bin/tuneline --help >/dev/null && echo tuneline) into .venv"
