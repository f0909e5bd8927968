"""API keys and the tenants they belong to: from the environment (`jobs.keys_env`, `tenant:key,tenant:key`)
and a key file (`jobs.keys_file`, one `tenant: key` per line, `#` comments), never from the repo.

Only the keys' SHA-256 digests travel to the Serve replicas (Ray writes what it is handed into its logs).
With no key configured at all the API is open and everything belongs to the tenant `default`, as the
serving endpoint is open without `serving.api_key_env`.
"""

from __future__ import annotations

import os
from pathlib import Path

from serving.ingress import key_digest, tenant_of
from tuneline.config import Jobs
from tuneline.errors import TunelineError

OPEN_TENANT = "default"


def _pairs(text: str, sep: str, where: str) -> dict[str, str]:
    found: dict[str, str] = {}
    for n, item in enumerate(text.replace(",", "\n").splitlines() if sep == ":" else text.splitlines(), 1):
        item = item.split("#", 1)[0].strip()
        if not item:
            continue
        tenant, colon, key = item.partition(":")
        if not colon or not tenant.strip() or not key.strip():
            raise TunelineError(f"{where}: item {n}: expected `tenant: key`")
        found[key_digest(key.strip())] = tenant.strip()
    return found


def key_digests(cfg: Jobs, project: Path) -> dict[str, str]:
    """{sha256 of a key: its tenant}; empty when no key is configured (an open API)."""
    keys = _pairs(os.environ.get(cfg.keys_env, ""), ":", f"${cfg.keys_env}")
    if cfg.keys_file is not None:
        path = cfg.keys_file if cfg.keys_file.is_absolute() else project / cfg.keys_file
        if not path.is_file():
            raise TunelineError(f"jobs.keys_file: {path} not found")
        keys.update(_pairs(path.read_text(encoding="utf-8"), "\n", str(path)))
    return keys


def tenant(authorization: str | None, digests: dict[str, str]) -> str | None:
    """The tenant of a `Bearer <key>` header; None for no key or a wrong one."""
    return tenant_of(authorization, digests) if digests else OPEN_TENANT
