"""Keel's Redis store: blobs, idempotency records and notes. The one place Keel reaches Redis.

Every key starts with ``keel:`` and is scoped by tenant. Keys that one command or script uses
together carry the tenant as a Redis Cluster hash tag, in braces, so they share a hash slot
(issue 16); ``acme``'s blob is ``keel:blob:{acme}:...``:

- ``keel:blob:{tenant}:{suffix}``: full outputs too large for workflow history (7-day TTL);
  workflows carry the key as a ``ref`` instead of the text. The gateway's suffix is the call's
  op_key, ``{job ID}:{iteration}:{step id}``, and a blob is read only by the job it names. A
  job's blobs are read together (MGET), hence the tag.
- ``keel:idem:TENANT:{op_key}`` (no tag: every command on it is single-key, and keeping its
  pre-issue-16 name means no record is lost across an upgrade): the recorded ``ToolResult`` of a
  side-effecting tool call (30-day TTL), so a retried or rescheduled call replays the result
  instead of the effect.
- ``keel:note:{tenant}:{op_key}`` (hash) and ``keel:notes:{tenant}`` (list of op_keys in write
  order): the effect of ``write_note``, created atomically (one script) at most once per op_key.

Names from before the tags (``keel:blob:TENANT:...``, ``keel:note:TENANT:...``,
``keel:notes:TENANT``) are still read: refs to old blobs travel in running jobs' state, and notes
never expire, so an old note must still count as written and still be listed. Only a
single-server Redis can hold them (their scripts would cross slots on a cluster), so on
``RedisCluster`` the store does not look for them.

Session status snapshots (``keel:session:...``) are ``activities/snapshots.py``'s.

Not workflow code: every method performs network I/O and is called only from activities.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis
from redis.crc import key_slot
from temporalio import activity
from temporalio.exceptions import ApplicationError

from keel.activities.errors import REF_NOT_OWNED
from keel.activities.redis_client import KeelRedis, connect
from keel.activities.types import BLOB_REF_PREFIX, ToolResult, ref_belongs_to

__all__ = ["KEY_PREFIX", "KeelStore", "blob_ref", "note_keys", "notes_list_key"]

KEY_PREFIX = "keel:"
"""Prefix of every key Keel writes."""

_BLOB_PREFIX = BLOB_REF_PREFIX
_BLOB_TTL = 7 * 86400
_RECORD_TTL = 30 * 86400

# Creating the note and appending it to the tenant's list happen in one script, so a crash
# between the two can never leave a note that list_notes misses, or list it twice. KEYS: the
# note, the tenant's list, and on a single server the note's pre-issue-16 name, which counts as
# written too (a retry after an upgrade must not write the note a second time). Returns 1 when
# written, 0 when the note exists, 2 when it exists under its old name.
_WRITE_NOTE_ONCE = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
if KEYS[3] and redis.call('EXISTS', KEYS[3]) == 1 then
  return 2
end
redis.call('HSET', KEYS[1], 'title', ARGV[1], 'body', ARGV[2], 'job_id', ARGV[3], 'op_key', ARGV[4])
redis.call('RPUSH', KEYS[2], ARGV[4])
return 1
"""


def _text(value: Any) -> str:
    """A Redis reply as text, whether or not the client decodes responses."""
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _calling_job() -> str | None:
    """The job (workflow ID) of the activity this runs in, or None outside an activity."""
    return (activity.info().workflow_id or None) if activity.in_activity() else None


def _check_tenant(tenant: str) -> str:
    # Tenants are identifiers (workflows/types.py); a ':' would let one tenant's keys collide
    # with another's, and a brace would move its hash tag, so refuse them here rather than
    # trust every caller.
    if not tenant or any(c in tenant for c in ":{}"):
        raise ValueError(f"invalid tenant {tenant!r}")
    return tenant


def blob_ref(tenant: str, key_suffix: str) -> str:
    """The ref (Redis key) of ``tenant``'s blob ``key_suffix``: ``keel:blob:{tenant}:...``.

    Raises:
        ValueError: If ``tenant`` is not an identifier.
    """
    return f"{_BLOB_PREFIX}{{{_check_tenant(tenant)}}}:{key_suffix}"


def notes_list_key(tenant: str) -> str:
    """The list of ``tenant``'s notes' op_keys in write order: ``keel:notes:{tenant}``.

    Raises:
        ValueError: If ``tenant`` is not an identifier.
    """
    return f"{KEY_PREFIX}notes:{{{_check_tenant(tenant)}}}"


def note_keys(tenant: str, op_key: str) -> tuple[str, str]:
    """The note written for ``op_key`` and the tenant's list of notes (one hash slot).

    Raises:
        ValueError: If ``tenant`` is not an identifier.
    """
    return f"{KEY_PREFIX}note:{{{_check_tenant(tenant)}}}:{op_key}", notes_list_key(tenant)


def _legacy_note_keys(tenant: str, op_key: str) -> tuple[str, str]:
    """The names ``note_keys`` had before hash tags (issue 16), still read on a single server."""
    return f"{KEY_PREFIX}note:{tenant}:{op_key}", f"{KEY_PREFIX}notes:{tenant}"


def _one_slot(keys: list[str]) -> bool:
    return len({key_slot(key.encode("utf-8")) for key in keys}) <= 1


class KeelStore:
    """Tenant-scoped access to Keel's keys in Redis.

    The store does not retry: a Redis failure raises, and Temporal retries the activity.
    """

    def __init__(self, client: KeelRedis) -> None:
        self._redis = client
        self._write_note_once = client.register_script(_WRITE_NOTE_ONCE)
        # A cluster cannot hold names from before the hash tags (see the module docstring);
        # elsewhere the store reads them beside the current ones.
        self._legacy_names = not isinstance(client, aioredis.RedisCluster)

    @classmethod
    def from_url(cls, url: str, *, timeout_seconds: float = 5.0) -> KeelStore:
        """Build a store with its own client.

        Args:
            url: A Redis URL, or a cluster's (``keel.activities.redis_client.connect``).
            timeout_seconds: The longest wait to connect or for any reply. A Redis that hangs
                (a partition drops packets rather than refusing them) then fails the attempt,
                which Temporal retries, instead of holding it until its start-to-close timeout.

        Returns:
            A store whose client decodes responses as UTF-8; close it with ``aclose``.
        """
        client = connect(
            url,
            decode_responses=True,
            socket_connect_timeout=timeout_seconds,
            socket_timeout=timeout_seconds,
        )
        return cls(client)

    @property
    def redis(self) -> KeelRedis:
        """The client, for modules keeping their own keys beside the store's (snapshots)."""
        return self._redis

    async def aclose(self) -> None:
        """Close the underlying client and its connections."""
        await self._redis.aclose()

    async def ping(self) -> bool:
        """Check that Redis answers.

        Returns:
            True when Redis replied to PING.
        """
        return bool(await self._redis.ping())

    async def put_blob(
        self, tenant: str, key_suffix: str, data: str, ttl_seconds: int = _BLOB_TTL
    ) -> str:
        """Store a large text and return its reference.

        Writing the same suffix again overwrites it, so a retried activity stores the same ref.

        Args:
            tenant: Owner of the blob.
            key_suffix: Stable name within the tenant, usually the call's op_key.
            data: The full text.
            ttl_seconds: How long Redis keeps the blob.

        Returns:
            The ref: the full Redis key, ``blob_ref(tenant, key_suffix)``.
        """
        ref = blob_ref(tenant, key_suffix)
        await self._redis.set(ref, data, ex=ttl_seconds)
        return ref

    async def get_blob(
        self, ref: str, *, job_id: str | None = None, tenant: str | None = None
    ) -> str | None:
        """Read one blob of the calling job by the ref ``put_blob`` returned.

        Args:
            ref: A ``keel:blob:`` key.
            job_id: The job reading it; by default the calling activity's workflow ID.
            tenant: The job's tenant, checked against the ref when given.

        Returns:
            The text, or None when it has expired or never existed.

        Raises:
            ApplicationError: ``REF_NOT_OWNED`` (non-retryable) as ``get_blobs`` says.
        """
        [value] = await self.get_blobs([ref], job_id=job_id, tenant=tenant)
        return value

    async def expire_blobs(self, tenant: str, job_prefix: str, ttl_seconds: int = 0) -> int:
        """Expire every stored output of the jobs whose IDs start with ``job_prefix``.

        A session's turns are jobs ``{session job prefix}.t{N}``; when the session ends its
        outputs go with it. Idempotent: running it twice expires nothing more.

        Args:
            tenant: Whose outputs (the prefix must name one of its jobs).
            job_prefix: The start of the job IDs, e.g. ``agent-job-acme:chat-1.t``.
            ttl_seconds: Seconds they may live on; 0 deletes them now.

        Returns:
            How many outputs were expired.
        """
        tenant = _check_tenant(tenant)
        globbing = any(c in job_prefix for c in "*?[]\\")
        if not job_prefix.startswith(f"agent-job-{tenant}:") or globbing:
            raise ValueError(f"not a job prefix of tenant {tenant}: {job_prefix!r}")
        patterns = [blob_ref(tenant, f"{job_prefix}*")]
        if self._legacy_names:
            patterns.append(f"{_BLOB_PREFIX}{tenant}:{job_prefix}*")
        expired = 0
        for pattern in patterns:
            async for key in self._redis.scan_iter(match=pattern, count=500):
                if ttl_seconds > 0:
                    expired += int(await self._redis.expire(key, ttl_seconds))
                else:
                    expired += int(await self._redis.delete(key))
        return expired

    async def get_blobs(
        self, refs: list[str], *, job_id: str | None = None, tenant: str | None = None
    ) -> list[str | None]:
        """Read several blobs of one job in one round trip; None for each that is gone.

        A ref is read only when it names a blob of the reading job (``ref_belongs_to``): the
        workflow refuses carried state with a foreign ref, and this check stands behind it for
        any input that reaches an activity another way (issue 13).

        Args:
            refs: ``keel:blob:`` keys.
            job_id: The job reading them; by default the calling activity's workflow ID.
            tenant: The job's tenant, checked against every ref when given.

        Returns:
            The texts, in the order of ``refs``.

        Raises:
            ApplicationError: ``REF_NOT_OWNED`` (non-retryable) if a ref is not a blob key of
                that job, or no job is known (called outside an activity without ``job_id``).
        """
        owner = job_id or _calling_job()
        for ref in refs:
            if owner is None or not ref_belongs_to(ref, owner, tenant):
                raise ApplicationError(
                    f"stored output {ref[:200]!r} does not belong to job {owner!r}",
                    type=REF_NOT_OWNED,
                    non_retryable=True,
                )
        if not refs:
            return []
        if _one_slot(refs):
            values = await self._redis.mget(refs)
        else:
            # Refs written before hash tags (issue 16) may still travel in a running job's
            # state; each hashes to its own slot, so they are read one GET each, pipelined.
            async with self._redis.pipeline(transaction=False) as pipe:
                for ref in refs:
                    pipe.get(ref)
                values = await pipe.execute()
        return [None if value is None else _text(value) for value in values]

    async def get_record(self, tenant: str, op_key: str) -> ToolResult | None:
        """Read the recorded result of a side-effecting call.

        Args:
            tenant: Owner of the call.
            op_key: Durable identity of the call.

        Returns:
            The recorded result, or None when the call has not completed before.
        """
        value = await self._redis.get(self._record_key(tenant, op_key))
        return None if value is None else ToolResult.model_validate_json(_text(value))

    async def put_record(
        self, tenant: str, op_key: str, result: ToolResult, ttl_seconds: int = _RECORD_TTL
    ) -> bool:
        """Record the result of a side-effecting call, unless one is already recorded.

        Args:
            tenant: Owner of the call.
            op_key: Durable identity of the call.
            result: What the call returned.
            ttl_seconds: How long Redis keeps the record.

        Returns:
            True when this call wrote the record, False when an earlier one had (SET NX).
        """
        key = self._record_key(tenant, op_key)
        return bool(await self._redis.set(key, result.model_dump_json(), ex=ttl_seconds, nx=True))

    async def write_note_once(
        self, tenant: str, op_key: str, title: str, body: str, job_id: str
    ) -> tuple[str, bool]:
        """Create a note for ``op_key`` unless it exists, atomically.

        Args:
            tenant: Owner of the note.
            op_key: Durable identity of the write; at most one note exists per op_key.
            title: Note title.
            body: Note text.
            job_id: Job that wrote the note.

        Returns:
            ``(note_key, created)``; ``created`` is False when the note already existed (then
            ``note_key`` is the key it exists under, its pre-issue-16 one for an older note).
        """
        note_key, list_key = note_keys(tenant, op_key)
        keys = [note_key, list_key]
        if self._legacy_names:
            legacy_note, _ = _legacy_note_keys(tenant, op_key)
            keys.append(legacy_note)
        created = int(await self._write_note_once(keys=keys, args=[title, body, job_id, op_key]))
        return (keys[2] if created == 2 else note_key), created == 1

    async def list_notes(self, tenant: str) -> list[dict[str, str]]:
        """The tenant's notes in write order.

        Args:
            tenant: Owner of the notes.

        Returns:
            One dict per note with ``key``, ``title``, ``body``, ``job_id`` and ``op_key``;
            notes written before hash tags (issue 16) first, under their old keys.
        """
        _check_tenant(tenant)
        naming = [note_keys]
        if self._legacy_names:
            naming.insert(0, _legacy_note_keys)
        keys: list[str] = []
        for name in naming:
            list_key = name(tenant, "")[1]
            for op_key in await self._redis.lrange(list_key, 0, -1):
                keys.append(name(tenant, _text(op_key))[0])
        if not keys:
            return []
        async with self._redis.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.hgetall(key)
            rows = await pipe.execute()
        return [
            {"key": key, **{_text(k): _text(v) for k, v in row.items()}}
            for key, row in zip(keys, rows, strict=True)
            if row
        ]

    @staticmethod
    def _record_key(tenant: str, op_key: str) -> str:
        return f"{KEY_PREFIX}idem:{_check_tenant(tenant)}:{op_key}"
