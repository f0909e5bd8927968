"""Prefect events of Tuneline: `tuneline.data.updated` starts `finetune/finetune-on-new-data` (prefect.yaml)."""

from __future__ import annotations

from pathlib import Path

from tuneline.errors import TunelineError

DATA_UPDATED = "tuneline.data.updated"


def data_resource(path: str) -> dict[str, str]:
    """The event's resource: `tuneline.data.<path>` (the deployment trigger matches `tuneline.data.*`)."""
    return {"prefect.resource.id": f"tuneline.data.{path}", "prefect.resource.name": path}


def emit_data_updated(path: str, data_hash: str, project: Path | None = None) -> str | None:
    """Emit `tuneline.data.updated` with the data hash in its payload, and wait until it is sent.

    Goes to PREFECT_API_URL if configured, else to the server `tuneline prefect up` started
    for this project. Returns that URL, or None when there is no server to tell (Prefect's
    ephemeral server would start just for the event and forget it).
    """
    from prefect.events import emit_event
    from prefect.events.worker import EventsWorker
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.local import local_api_url

    url = PREFECT_API_URL.value() or local_api_url(project)
    if not url:
        return None
    with temporary_settings({PREFECT_API_URL: url}):
        event = emit_event(event=DATA_UPDATED, resource=data_resource(path),
                           payload={"data_hash": data_hash, "path": path})
        EventsWorker.drain_all(timeout=30)
    if event is None:
        raise TunelineError(f"could not emit {DATA_UPDATED} to {url}")
    return url
