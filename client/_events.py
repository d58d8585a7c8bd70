"""A job's event stream: progress from its workflow stream, answer tokens from Redis.

Two sources, one cursor. Progress events are the workflow's own (``workflows._progress``):
durable and offset-addressed, long-polled with an update while the job runs and read with a
query once it has closed. Answer tokens travel on a Redis stream per job
(``activities.answer_tokens``) and never enter history, which keeps only the final answer. An
``EventCursor`` is a position in both, and every event carries the cursor just after it, so a
reader that reconnects with the last one it saw (SSE ``Last-Event-ID``) misses nothing and
sees nothing twice. The stream ends with one ``end`` event carrying the job's result.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import TYPE_CHECKING, Literal

import structlog
from pydantic import BaseModel
from redis.exceptions import RedisError

from keel.activities.answer_tokens import (
    WATCH_RENEW_SECONDS,
    TokenDelta,
    mark_watched,
    read_tokens,
)
from keel.client.errors import InvalidJobRequest
from keel.workflows.types import PROGRESS_TOPIC, JobProgress, JobResult

if TYPE_CHECKING:
    from temporalio.client import Client

    from keel.activities.redis_client import KeelRedis

__all__ = ["EventCursor", "JobStreamEvent", "job_events"]

log = structlog.get_logger(__name__)

_CURSOR_RE = re.compile(r"(\d{1,18}):(\d{1,20}-\d{1,20})")
TOKEN_BLOCK_MS = 2_000
"""How long one read of the token stream waits; under the API's Redis socket timeout."""
POLL_COOLDOWN = timedelta(milliseconds=50)
"""Least time between two progress polls of a job that has nothing new (each poll is an
update, two events in the job's history)."""


@dataclass(frozen=True)
class EventCursor:
    """A position in a job's event stream: a progress offset and a token stream ID.

    Its text form, ``OFFSET:TOKEN-ID`` (``12:1733212345678-0``), is the SSE event ID.
    """

    progress: int = 0
    """Offset of the next progress event to read."""
    tokens: str = "0-0"
    """ID of the last answer-token entry read (Redis stream ID)."""

    def __str__(self) -> str:
        return f"{self.progress}:{self.tokens}"

    @classmethod
    def parse(cls, text: str | None) -> EventCursor:
        """Read a cursor from an event ID; empty or ``None`` is the start of the stream.

        Raises:
            InvalidJobRequest: If the text is not an event ID of this stream
                (``field="Last-Event-ID"``).
        """
        if not text or not text.strip():
            return cls()
        match = _CURSOR_RE.fullmatch(text.strip())
        if match is None:
            raise InvalidJobRequest(
                "Last-Event-ID", "is not an event ID of this stream (OFFSET:MILLIS-SEQ)"
            )
        return cls(int(match[1]), match[2])


class JobStreamEvent(BaseModel):
    """One event of a job's stream, with the cursor to resume after it."""

    id: str
    """The cursor after this event (``EventCursor`` text); send it back to resume."""
    event: Literal["progress", "token", "end"]
    """``progress``: the job's position changed; ``token``: text of the answer being drafted;
    ``end``: the job ended (``data`` is its result; failed jobs' included)."""
    data: JobProgress | TokenDelta | JobResult


_Item = tuple[Literal["progress", "token"], int | str, JobProgress | TokenDelta]


async def job_events(
    client: Client,
    job_id: str,
    cursor: EventCursor,
    tokens: KeelRedis | None,
    final: Callable[[], Awaitable[JobResult]],
) -> AsyncIterator[JobStreamEvent]:
    """Stream a job's events from ``cursor`` until it ends, then its result.

    Args:
        client: The Temporal client.
        job_id: The job (already checked to exist and to be the caller's).
        cursor: Where to start; ``EventCursor()`` is the beginning.
        tokens: Redis holding answer tokens; ``None`` streams progress only.
        final: Returns the job's result once it has ended.

    Yields:
        Progress and token events in arrival order, then one ``end`` event.
    """
    queue: asyncio.Queue[_Item | BaseException | None] = asyncio.Queue(maxsize=256)
    readers = [asyncio.create_task(_read_progress(client, job_id, cursor.progress, queue))]
    if tokens is not None:
        await _watch(tokens, job_id)  # before any read: the next draft streams for us
        readers.append(asyncio.create_task(_read_tokens(tokens, job_id, cursor.tokens, queue)))
        readers.append(asyncio.create_task(_keep_watching(tokens, job_id)))
    position = cursor
    try:
        while (item := await queue.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            kind, at, data = item
            if kind == "progress":
                position = replace(position, progress=int(at))
            else:
                position = replace(position, tokens=str(at))
            yield JobStreamEvent(id=str(position), event=kind, data=data)
        for reader in readers[1:]:
            reader.cancel()
        if tokens is not None:  # The job has ended: what the token reader had not seen yet.
            for entry_id, delta in await _tokens_after(tokens, job_id, position.tokens):
                position = replace(position, tokens=entry_id)
                yield JobStreamEvent(id=str(position), event="token", data=delta)
        yield JobStreamEvent(id=str(position), event="end", data=await final())
    finally:
        for reader in readers:
            reader.cancel()


async def _read_progress(
    client: Client, job_id: str, offset: int, queue: asyncio.Queue[_Item | BaseException | None]
) -> None:
    """Follow the job's progress stream (across continue-as-new) until the job has closed."""
    from temporalio.contrib.workflow_streams import WorkflowStreamClient

    try:
        stream = WorkflowStreamClient.create(client, job_id)
        async for item in stream.subscribe(
            PROGRESS_TOPIC, from_offset=offset, result_type=JobProgress, poll_cooldown=POLL_COOLDOWN
        ):
            await queue.put(("progress", item.offset + 1, item.data))
        await queue.put(None)
    except asyncio.CancelledError:
        raise
    except Exception as err:  # noqa: BLE001 - handed to the reader of the queue, not lost
        await queue.put(err)


async def _read_tokens(
    redis: KeelRedis,
    job_id: str,
    after: str,
    queue: asyncio.Queue[_Item | BaseException | None],
) -> None:
    """Follow the job's answer tokens; a Redis outage ends tokens, never the stream."""
    try:
        while True:
            for entry_id, delta in await read_tokens(redis, job_id, after, block_ms=TOKEN_BLOCK_MS):
                after = entry_id
                await queue.put(("token", entry_id, delta))
    except RedisError as err:
        log.warning("events.tokens_unavailable", job_id=job_id, error=type(err).__name__)


async def _watch(redis: KeelRedis, job_id: str) -> bool:
    """Mark the job as read (workers stream its drafts only then); False if Redis failed."""
    try:
        await mark_watched(redis, job_id)
    except RedisError as err:
        log.warning("events.tokens_unavailable", job_id=job_id, error=type(err).__name__)
        return False
    return True


async def _keep_watching(redis: KeelRedis, job_id: str) -> None:
    while await _watch(redis, job_id):
        await asyncio.sleep(WATCH_RENEW_SECONDS)


async def _tokens_after(redis: KeelRedis, job_id: str, after: str) -> list[tuple[str, TokenDelta]]:
    try:
        return await read_tokens(redis, job_id, after)
    except RedisError as err:
        log.warning("events.tokens_unavailable", job_id=job_id, error=type(err).__name__)
        return []
