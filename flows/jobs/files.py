"""`/v1/files`: uploads stored once per content hash, written atomically, their JSON Lines format checked.

An upload streams into a temp file beside its final place while it is hashed and counted (over
`jobs.max_file_bytes` it stops at once), is checked line by line with validate's own record checks
(format guessed from the first record), then renamed to `<sha256>.jsonl` under `jobs.files_dir`. The
same content uploaded twice, by anyone, is one file on disk and two file ids. Deleting an id removes
the content once no id refers to it.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from flows.jobs.store import Store, now
from flows.jobs.wire import APIProblem, file_object, not_found, page
from tasks.validate.records import check_file
from tuneline import s3
from tuneline.atomic import write_text
from tuneline.config import Jobs, Validate
from tuneline.errors import DataError, TunelineError
from tuneline.formats import FIELDS

UPLOAD_PURPOSES = {"fine-tune"}
RESULTS_PURPOSE = "fine-tune-results"

CHUNK = 1 << 20


class TooLarge(TunelineError):
    def __init__(self, limit: int):
        super().__init__(f"the file is over this server's limit of {limit} bytes (jobs.max_file_bytes)")


def guess_format(first_line: bytes) -> str | None:
    """The format whose required fields the first record has, chat and preference first (their keys are
    the most telling); None when no format fits, and check_file then says what is wrong."""
    try:
        record = json.loads(first_line.decode("utf-8-sig"))
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(record, dict):
        return None
    for fmt in ("chat", "preference", "instruction", "completion"):
        if all(name in record for name, (required, _) in FIELDS[fmt].items() if required):
            return fmt
    return None


class FileStore:
    """Content-addressed files in one folder, or under an S3 prefix (`s3://bucket/prefix`): then the folder
    is that prefix's local cache (tuneline/s3.py), each file is uploaded once checked (S3 stores an object
    whole or not at all), and a process that lacks one fetches it."""

    def __init__(self, root: Path | str):
        self.uri = root if s3.is_remote(root) else None
        self.root = s3.cache_path(str(root)) if self.uri else Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, blob: str) -> Path:
        """The file on this machine (fetched from S3 when it is not here)."""
        local = self.root / blob
        return local if local.exists() or not self.uri else s3.fetch(self.location(blob))

    def location(self, blob: str) -> Path | str:
        """Where a job's flow run reads it: the local file, or its s3:// URI."""
        return f"{self.uri.rstrip('/')}/{blob}" if self.uri else self.root / blob

    def _publish(self, blob: str) -> None:
        if self.uri:
            bucket, key = s3.split_uri(str(self.location(blob)))
            s3.client().upload_file(str(self.root / blob), bucket, key)

    def put(self, chunks: Iterable[bytes], filename: str, limit: int, cfg: Validate) -> dict:
        """Store an upload; {blob, bytes, format, records}. TooLarge over `limit`; DataError (naming
        `filename`, the line and the field) when it is not JSON Lines of a known format."""
        tmp = self.root / f".upload.tmp-{os.getpid()}-{os.urandom(6).hex()}"
        digest, size = hashlib.sha256(), 0
        try:
            with open(tmp, "wb") as out:
                for chunk in chunks:
                    size += len(chunk)
                    if size > limit:
                        raise TooLarge(limit)
                    digest.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            fmt, records = self._check(tmp, filename, cfg)
            blob = f"{digest.hexdigest()}.jsonl"
            os.replace(tmp, self.root / blob)  # the same bytes, if already there: replacing them changes nothing
            self._publish(blob)
        finally:
            tmp.unlink(missing_ok=True)
        return {"blob": blob, "bytes": size, "format": fmt, "records": records}

    def put_text(self, text: str, suffix: str) -> str:
        """A file the server makes (a job's metrics CSV); its blob name."""
        blob = f"{hashlib.sha256(text.encode()).hexdigest()}{suffix}"
        write_text(self.root / blob, text)
        self._publish(blob)
        return blob

    @staticmethod
    def _check(path: Path, filename: str, cfg: Validate) -> tuple[str, int]:
        with open(path, "rb") as f:
            first = f.readline().strip()
        fmt = guess_format(first) or "instruction"
        try:
            return fmt, len(check_file(path, fmt, cfg))
        except DataError as e:
            raise DataError(filename, e.line, e.field, e.rule) from None

    def read(self, blob: str) -> bytes:
        return self.path(blob).read_bytes()

    def remove(self, blob: str) -> None:
        (self.root / blob).unlink(missing_ok=True)
        if self.uri:
            bucket, key = s3.split_uri(str(self.location(blob)))
            s3.client().delete_object(Bucket=bucket, Key=key)


class Files:
    """The `/v1/files` of each tenant: its rows in the store, their content in the FileStore."""

    def __init__(self, store: Store, blobs: FileStore, cfg: Jobs, validate: Validate):
        self.store, self.blobs, self.cfg, self.validate = store, blobs, cfg, validate

    def upload(self, tenant: str, filename: str, purpose: str, chunks: Iterable[bytes]) -> dict[str, Any]:
        if purpose not in UPLOAD_PURPOSES:
            raise APIProblem(400, f"purpose {purpose!r} is not supported here; use 'fine-tune'", "purpose")
        try:
            stored = self.blobs.put(chunks, filename, self.cfg.max_file_bytes, self.validate)
        except DataError as e:
            raise APIProblem(400, f"invalid file: {e}", "file", "invalid_file") from None
        used, limit = self.store.tenant_bytes(tenant), self.cfg.max_tenant_bytes
        if used + stored["bytes"] > limit:
            if not self.store.blob_in_use(stored["blob"]):
                self.blobs.remove(stored["blob"])
            raise APIProblem(429, f"upload limit reached: this tenant stores {used} bytes, and {stored['bytes']} "
                                  f"more would pass its limit of {limit} (jobs.max_tenant_bytes); delete files first",
                             "file", "upload_limit_exceeded")
        return file_object(self._add(tenant, filename, purpose, stored))

    def add_result(self, tenant: str, filename: str, text: str) -> str:
        """A file the server made for a tenant (a job's metrics CSV); its id."""
        blob = self.blobs.put_text(text, ".csv")
        stored = {"blob": blob, "bytes": self.blobs.path(blob).stat().st_size, "format": "csv", "records": None}
        return self._add(tenant, filename, RESULTS_PURPOSE, stored)["id"]

    def _add(self, tenant: str, filename: str, purpose: str, stored: dict[str, Any]) -> dict[str, Any]:
        row = {"id": f"file-{secrets.token_hex(12)}", "tenant": tenant, "filename": filename, "purpose": purpose,
               "created_at": now(), **stored}
        self.store.add_file(row)
        return row

    def get(self, tenant: str, file_id: str, param: str | None = None) -> dict[str, Any]:
        row = self.store.file(tenant, file_id)
        if row is None:
            raise not_found("file", file_id, param)
        return row

    def list(self, tenant: str, purpose: str | None, after: str | None, limit: int) -> dict[str, Any]:
        return page([file_object(r) for r in self.store.files(tenant, purpose)], after, limit)

    def delete(self, tenant: str, file_id: str) -> dict[str, Any]:
        row = self.get(tenant, file_id)
        self.store.delete_file(file_id)
        if not self.store.blob_in_use(row["blob"]):
            self.blobs.remove(row["blob"])
        return {"id": file_id, "object": "file", "deleted": True}

    def content(self, tenant: str, file_id: str) -> bytes:
        return self.blobs.read(self.get(tenant, file_id)["blob"])

    def path(self, row: dict[str, Any]) -> Path:
        return self.blobs.path(row["blob"])

    def location(self, row: dict[str, Any]) -> Path | str:
        return self.blobs.location(row["blob"])
