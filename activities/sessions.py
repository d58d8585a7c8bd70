"""Session activities (issue 15): status snapshots, and a session's stored outputs end with it.

Not workflow code: they touch Redis. Idempotent, so Temporal may run each twice.
"""

from __future__ import annotations

import structlog
from pydantic import BaseModel
from temporalio import activity

from keel.activities.snapshots import SessionSnapshots
from keel.activities.store import KeelStore

__all__ = ["SessionActivities", "SessionOutputs", "SessionSnapshot"]

log = structlog.get_logger(__name__)


class SessionOutputs(BaseModel):
    """Input of ``expire_session_outputs``: whose turns' outputs to expire."""

    tenant: str
    job_prefix: str
    """The turns' job IDs start with it (``agent-job-{tenant}:{key}.t``)."""


class SessionSnapshot(BaseModel):
    """Input of ``write_session_snapshot``: the session's status as its query would answer."""

    tenant: str
    session_id: str
    status_json: str
    ttl_seconds: int


class SessionActivities:
    """The session activities, bound to the store."""

    def __init__(self, store: KeelStore) -> None:
        self._store = store
        self._snapshots = SessionSnapshots(store.redis)

    @activity.defn(name="expire_session_outputs")
    async def expire_session_outputs(self, inp: SessionOutputs) -> int:
        """Delete the stored outputs of an ended session's turns; returns how many."""
        info = activity.info()
        with structlog.contextvars.bound_contextvars(job_id=info.workflow_id, tenant=inp.tenant):
            expired = await self._store.expire_blobs(inp.tenant, inp.job_prefix)
            log.info("session.outputs_expired", outputs=expired)
        return expired

    @activity.defn(name="write_session_snapshot")
    async def write_session_snapshot(self, inp: SessionSnapshot) -> None:
        """Replace the session's status snapshot in Redis (readers fall back to the query)."""
        await self._snapshots.put(inp.tenant, inp.session_id, inp.status_json, inp.ttl_seconds)
