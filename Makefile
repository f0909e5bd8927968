# The two set-up commands of README.md. Both install first (idempotent, seconds when done).
.PHONY: install run test lint

install:
	./scripts/install.sh

run: install
	PATH="$(CURDIR)/.venv/bin:$$PATH" tuneline run

test: install
	PATH="$(CURDIR)/.venv/bin:$$PATH" pytest

lint: install
	.venv/bin/ruff check .
