"""Files, jobs and job events in a SQL database: SQLite in the project by default, PostgreSQL by URL.

The database holds what the API decided (who owns what, the job's inputs, errors found while validating,
the Prefect flow run it started); what happened after that is read back from Prefect and the job's folder
(service.py), so a restarted API process, or one killed mid-job, shows the truth.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    func,
    select,
)
from sqlalchemy.engine import Engine

metadata = MetaData()

files = Table(
    "tuneline_files", metadata,
    Column("id", String(64), primary_key=True),
    Column("tenant", String(128), nullable=False, index=True),
    Column("filename", Text, nullable=False),
    Column("purpose", String(64), nullable=False),
    Column("bytes", BigInteger, nullable=False),
    Column("blob", String(80), nullable=False, index=True),  # its content's name in files.FileStore
    Column("format", String(32)),
    Column("records", Integer),
    Column("created_at", Integer, nullable=False),
    Column("created_ns", BigInteger, nullable=False),  # the list's order: two made in one second keep theirs
)

jobs = Table(
    "tuneline_jobs", metadata,
    Column("id", String(64), primary_key=True),
    Column("tenant", String(128), nullable=False, index=True),
    Column("created_at", Integer, nullable=False),
    Column("created_ns", BigInteger, nullable=False),  # the list's order, newest first, as OpenAI's
    Column("status", String(32), nullable=False),
    Column("model", Text, nullable=False),
    Column("training_file", String(64), nullable=False),
    Column("validation_file", String(64)),
    Column("suffix", String(64)),
    Column("seed", BigInteger, nullable=False),
    Column("metadata", JSON),
    Column("method", JSON, nullable=False),
    Column("flow_run_id", String(64)),
    Column("cancel_requested", Integer, nullable=False, default=0),
    Column("error", JSON),
    Column("result", JSON),  # filled once the job is final: fine_tuned_model, tokens, result files
    Column("finished_at", Integer),
)

events = Table(
    "tuneline_events", metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("job_id", String(64), nullable=False, index=True),
    Column("created_at", Float, nullable=False),  # to the microsecond: events interleave with Prefect's
    Column("level", String(16), nullable=False),
    Column("message", Text, nullable=False),
)


def database_url(url: str, project: Path) -> str:
    """A relative SQLite path is the project's: the API runs in a Serve replica, in some other folder."""
    prefix = "sqlite:///"
    if url.startswith(prefix) and not url.startswith(prefix + "/"):
        return prefix + str((project / url.removeprefix(prefix)).resolve())
    return url


def engine_for(url: str) -> Engine:
    if url.startswith("sqlite"):
        # The routes run in a thread pool and the validation in threads of its own; SQLite waits for its lock.
        return create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
    return create_engine(url, pool_pre_ping=True)


def now() -> int:
    return int(time.time())


class Store:
    """The three tables, created when missing; every method is one short transaction."""

    def __init__(self, url: str):
        self.engine = engine_for(url)
        metadata.create_all(self.engine)

    def _one(self, query) -> dict[str, Any] | None:
        with self.engine.connect() as c:
            row = c.execute(query).mappings().first()
        return dict(row) if row else None

    def _all(self, query) -> list[dict[str, Any]]:
        with self.engine.connect() as c:
            return [dict(r) for r in c.execute(query).mappings()]

    def _write(self, statement) -> None:
        with self.engine.begin() as c:
            c.execute(statement)

    # ------------------------------------------------------------ files

    def add_file(self, row: dict[str, Any]) -> None:
        self._write(files.insert().values(**row, created_ns=time.time_ns()))

    def file(self, tenant: str, file_id: str) -> dict[str, Any] | None:
        return self._one(select(files).where(files.c.id == file_id, files.c.tenant == tenant))

    def files(self, tenant: str, purpose: str | None = None) -> list[dict[str, Any]]:
        query = select(files).where(files.c.tenant == tenant)
        if purpose:
            query = query.where(files.c.purpose == purpose)
        return self._all(query.order_by(files.c.created_ns.desc()))

    def tenant_bytes(self, tenant: str) -> int:
        with self.engine.connect() as c:
            return int(c.execute(select(func.coalesce(func.sum(files.c.bytes), 0)).where(
                files.c.tenant == tenant)).scalar_one())

    def delete_file(self, file_id: str) -> None:
        self._write(files.delete().where(files.c.id == file_id))

    def blob_in_use(self, blob: str) -> bool:
        return self._one(select(files.c.id).where(files.c.blob == blob)) is not None

    # ------------------------------------------------------------ jobs

    def add_job(self, row: dict[str, Any]) -> None:
        self._write(jobs.insert().values(**row, created_ns=time.time_ns()))

    def job(self, tenant: str | None, job_id: str) -> dict[str, Any] | None:
        query = select(jobs).where(jobs.c.id == job_id)
        if tenant is not None:
            query = query.where(jobs.c.tenant == tenant)
        return self._one(query)

    def jobs(self, tenant: str | None = None, statuses: set[str] | None = None) -> list[dict[str, Any]]:
        query = select(jobs)
        if tenant is not None:
            query = query.where(jobs.c.tenant == tenant)
        if statuses:
            query = query.where(jobs.c.status.in_(statuses))
        return self._all(query.order_by(jobs.c.created_ns.desc()))

    def update_job(self, job_id: str, **values: Any) -> None:
        self._write(jobs.update().where(jobs.c.id == job_id).values(**values))

    # ------------------------------------------------------------ events

    def add_event(self, job_id: str, message: str, level: str = "info") -> None:
        self._write(events.insert().values(job_id=job_id, created_at=time.time(), level=level, message=message))

    def events(self, job_id: str) -> list[dict[str, Any]]:
        return self._all(select(events).where(events.c.job_id == job_id).order_by(events.c.seq))

