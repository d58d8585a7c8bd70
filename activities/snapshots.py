"""Session status snapshots in Redis (issue 15): written by sessions, read by clients.

A session's workflow writes its status here as it changes (``write_session_snapshot``, a local
activity); ``AgentSessions.status`` reads it, and asks the workflow only when there is none, so
a reader never waits for the session's worker. One key per session,
``keel:session:{tenant}:{session ID}``, replaced on every write and expiring after the session
could have ended. Imports nothing but redis: the client path (which never loads a model SDK)
uses it too.
"""

from __future__ import annotations

from keel.activities.redis_client import KeelRedis

__all__ = ["SessionSnapshots", "snapshot_key"]

SESSION_ID_PREFIX = "agent-session-"


def snapshot_key(tenant: str, session_id: str) -> str:
    """The snapshot's key; refuses a session ID that is not one of ``tenant``'s.

    Raises:
        ValueError: ``tenant`` is not an identifier, or the session is another tenant's.
    """
    # A ':' in the tenant would let one tenant's keys collide with another's.
    if not tenant or ":" in tenant or not session_id.startswith(f"{SESSION_ID_PREFIX}{tenant}:"):
        raise ValueError(f"not a session of tenant {tenant!r}: {session_id!r}")
    return f"keel:session:{tenant}:{session_id}"


class SessionSnapshots:
    """Read and write sessions' status snapshots (JSON) through a Redis client."""

    def __init__(self, client: KeelRedis) -> None:
        self._redis = client

    async def put(self, tenant: str, session_id: str, status_json: str, ttl_seconds: int) -> None:
        """Replace the session's snapshot; it expires after ``ttl_seconds``."""
        await self._redis.set(snapshot_key(tenant, session_id), status_json, ex=ttl_seconds)

    async def get(self, tenant: str, session_id: str) -> str | None:
        """The session's latest snapshot, or None when there is none."""
        value = await self._redis.get(snapshot_key(tenant, session_id))
        if value is None:
            return None
        return value.decode("utf-8") if isinstance(value, bytes) else str(value)
