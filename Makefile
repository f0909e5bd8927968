# The two set-up commands of README.md. Both install first (idempotent, seconds when done).
.PHONY: install lock lock-upgrade run test test-fast lint

install:
	./scripts/install.sh

# Resolve pyproject.toml and scripts/lock/*.in again; commit the lock files with the change that needed it.
lock:
	[ -x .venv/bin/uv ] || { python3 -m venv .venv && .venv/bin/python -m pip install --quiet uv; }
	.venv/bin/python scripts/lock.py

# The same, taking the newest releases that fit pyproject's ranges (make lock keeps the pinned ones).
lock-upgrade:
	[ -x .venv/bin/uv ] || { python3 -m venv .venv && .venv/bin/python -m pip install --quiet uv; }
	.venv/bin/python scripts/lock.py --upgrade

run: install
	PATH="$(CURDIR)/.venv/bin:$$PATH" tuneline run

# Everything (CI runs this): the layer contracts, then unit, integration and end-to-end tests.
test: install
	.venv/bin/lint-imports
	PATH="$(CURDIR)/.venv/bin:$$PATH" pytest

# The fast lane for development: the contracts and tests/unit (no services, no training), in about 25 s.
test-fast: install
	.venv/bin/lint-imports
	PATH="$(CURDIR)/.venv/bin:$$PATH" pytest tests/unit

lint: install
	.venv/bin/ruff check .
	.venv/bin/lint-imports
