"""A session's event stream: its turns, one after another, each with its job's events.

``GET /v1/sessions/{id}/events`` reads this. For each turn, in turn order: ``turn_accepted``
when the session has taken the message, ``turn_started`` when its job runs, the job's own
``progress`` and ``token`` events (``client._events``), then ``turn_done`` with the turn's
outcome and the job's result. A turn the session refused to run (its budget ran out while it
was queued) goes straight from ``turn_accepted`` to ``turn_done``. The stream ends with
``session_ended`` once the session has ended and no turn is left to report.

Every event's ID is a ``SessionCursor``, the position just after it: ``t3.a`` (turn 3
accepted), ``t3.s.12:1733212345678-0`` (turn 3 started, and its job's own cursor), ``t3.d``
(turn 3 done). A reader that reconnects with the last ID it saw (``Last-Event-ID``) resumes
exactly there, inside a turn's job stream included, so it misses nothing and sees nothing twice.
Without a cursor the stream starts at the oldest turn the session still remembers (its last
``MAX_TURN_RECORDS``); a cursor older than that resumes at that turn too.

Where the session is, which turn exists and which has started, is read with the session's
query, polled while the stream waits for the next turn (from 0.1 s, backing off to 1 s); inside
a turn, the job's stream long-polls the job itself.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel

from keel.activities.answer_tokens import TokenDelta
from keel.client._events import EventCursor
from keel.client.errors import InvalidJobRequest, JobFailed, JobNotFound
from keel.client.sessions import AgentSessions
from keel.workflows.session_types import SessionStatus, TurnRecord
from keel.workflows.types import JobProgress, JobResult

if TYPE_CHECKING:
    from keel.activities.redis_client import KeelRedis

__all__ = ["SessionCursor", "SessionStreamEvent", "TurnDone", "session_events"]

_CURSOR_RE = re.compile(r"t(\d{1,9})\.(?:(a)|(d)|s\.(\d{1,18}:\d{1,20}-\d{1,20}))")
POLL_FIRST_SECONDS = 0.1
"""First pause before the session is asked again while the stream waits for a turn."""
POLL_MAX_SECONDS = 1.0
"""Longest pause between two of those questions (each is a query a worker answers)."""

Stage = Literal["accepted", "started", "done"]


@dataclass(frozen=True)
class SessionCursor:
    """A position in a session's stream: a turn, how far it has been reported, its job's cursor.

    ``SessionCursor()`` (turn 0 done) is the start of the stream.
    """

    turn: int = 0
    stage: Stage = "done"
    job: EventCursor = field(default_factory=EventCursor)
    """Inside a started turn: the position in its job's stream."""

    def __str__(self) -> str:
        if self.stage == "started":
            return f"t{self.turn}.s.{self.job}"
        return f"t{self.turn}.{self.stage[0]}"

    @classmethod
    def parse(cls, text: str | None) -> SessionCursor:
        """Read a cursor from an event ID; empty or ``None`` is the start of the stream.

        Raises:
            InvalidJobRequest: If the text is not an event ID of a session's stream
                (``field="Last-Event-ID"``).
        """
        if not text or not text.strip():
            return cls()
        match = _CURSOR_RE.fullmatch(text.strip())
        if match is None:
            raise InvalidJobRequest(
                "Last-Event-ID", "is not an event ID of this stream (tTURN.a, tTURN.s.JOB, tTURN.d)"
            )
        turn = int(match[1])
        if match[2]:
            return cls(turn, "accepted")
        if match[3]:
            return cls(turn, "done")
        return cls(turn, "started", EventCursor.parse(match[4]))


class TurnDone(TurnRecord):
    """A finished turn: its record, with the job's result when the job ran."""

    result: JobResult | None = None
    """How the turn's job ended; None when the turn never ran (the session refused it)."""


SessionEventName = Literal[
    "turn_accepted", "turn_started", "progress", "token", "turn_done", "session_ended"
]


class SessionStreamEvent(BaseModel):
    """One event of a session's stream, with the cursor to resume after it."""

    id: str
    """The cursor after this event (``SessionCursor`` text); send it back to resume."""
    event: SessionEventName
    """``turn_accepted`` / ``turn_started`` (data: the turn's record), ``progress`` /
    ``token`` (the running turn's job events), ``turn_done`` (the finished turn and its job's
    result), ``session_ended`` (the session's final status)."""
    data: TurnDone | TurnRecord | JobProgress | TokenDelta | SessionStatus


@dataclass
class _Follower:
    """Reads one session for one stream; keeps the last status it was given."""

    sessions: AgentSessions
    session_id: str
    tokens: KeelRedis | None
    status: SessionStatus
    pause: float = POLL_FIRST_SECONDS

    async def poll(self) -> None:
        """Wait a little (longer each time nothing changed), then read the session again."""
        await asyncio.sleep(self.pause)
        self.pause = min(self.pause * 2, POLL_MAX_SECONDS)
        self.status = await self.sessions.status(self.session_id)

    async def record(self, turn: int) -> TurnRecord | None:
        """The record of ``turn`` once the session has it; None if the session ended first.

        When ``turn`` is too old to be remembered, the oldest later turn's record instead.
        """
        while True:
            later = [r for r in self.status.turns if r.turn >= turn]
            if later:
                self.pause = POLL_FIRST_SECONDS
                return min(later, key=lambda r: r.turn)
            if self.status.phase == "ended":
                return None
            await self.poll()

    async def dequeued(self, record: TurnRecord) -> TurnRecord | None:
        """The turn's record once it is no longer queued; None if the session ended first.

        An ended session never runs the messages still queued.
        A turn that more than ``MAX_TURN_RECORDS`` later turns pushed out of the session's
        memory while it waited is taken as started: its job's stream then waits for the job.
        """
        while True:
            found = next((r for r in self.status.turns if r.turn == record.turn), None)
            if found is None:
                return record.model_copy(update={"state": "running"})
            if self.status.phase == "ended" and found.state == "queued":
                return None
            if found.state != "queued":
                self.pause = POLL_FIRST_SECONDS
                return found
            await self.poll()

    async def job_events(
        self, record: TurnRecord, after: EventCursor
    ) -> AsyncIterator[SessionStreamEvent]:
        """The turn's job events after ``after``, then ``turn_done``.

        The session marks a turn running just before it starts the turn's job, so the job
        may not exist yet: until it does, this waits.
        """
        while True:
            try:
                stream = await self.sessions.jobs.events(
                    record.job_id, after=after, tokens=self.tokens
                )
                break
            except JobNotFound:
                await asyncio.sleep(self.pause)
                self.pause = min(self.pause * 2, POLL_MAX_SECONDS)
        self.pause = POLL_FIRST_SECONDS
        try:
            async for event in stream:
                if isinstance(event.data, JobResult):  # the job's ``end``
                    yield _done(record, event.data)
                    return
                position = SessionCursor(record.turn, "started", EventCursor.parse(event.id))
                name: SessionEventName = "progress" if event.event == "progress" else "token"
                yield SessionStreamEvent(id=str(position), event=name, data=event.data)
        except JobFailed as failed:
            # Failed without a result (Temporal ended the job): the turn is done all the same.
            yield _done(record, failed.result, error=failed.reason)


def _done(record: TurnRecord, result: JobResult | None, error: str = "") -> SessionStreamEvent:
    done = TurnDone(**record.model_dump(), result=result)
    done.state = "done"
    if result is not None:
        done.outcome, done.answer, done.usage = result.outcome, result.answer, result.usage
    elif error:
        done.outcome, done.answer = "failed", f"the turn failed: {error}"[:500]
    return SessionStreamEvent(
        id=str(SessionCursor(record.turn, "done")), event="turn_done", data=done
    )


async def session_events(
    sessions: AgentSessions,
    status: SessionStatus,
    after: SessionCursor,
    tokens: KeelRedis | None,
) -> AsyncIterator[SessionStreamEvent]:
    """Stream a session's turns from ``after`` until the session has ended.

    Args:
        sessions: The caller's scoped sessions.
        status: The session's status, just read (which also checked the caller owns it).
        after: Where to resume; ``SessionCursor()`` is the beginning.
        tokens: Redis holding answer tokens; ``None`` streams progress only.

    Yields:
        The events after ``after``, in order; the last is ``session_ended``.
    """
    follow = _Follower(sessions, status.session_id, tokens, status)
    position = after
    while True:
        wanted = position.turn + 1 if position.stage == "done" else position.turn
        record = await follow.record(wanted)
        if record is None:
            yield SessionStreamEvent(id=str(position), event="session_ended", data=follow.status)
            return
        if record.turn != position.turn or position.stage == "done":
            position = SessionCursor(record.turn, "accepted")
            yield SessionStreamEvent(id=str(position), event="turn_accepted", data=record)
        if position.stage == "accepted":
            running = await follow.dequeued(record)
            if running is None:  # the session ended with this turn still queued
                yield SessionStreamEvent(
                    id=str(position), event="session_ended", data=follow.status
                )
                return
            if running.state == "done" and running.outcome is None:
                position = SessionCursor(record.turn, "done")
                yield _done(running, None)  # refused while queued: it never ran
                continue
            position = SessionCursor(record.turn, "started")
            yield SessionStreamEvent(id=str(position), event="turn_started", data=running)
            record = running
        async for event in follow.job_events(record, position.job):
            yield event
        position = SessionCursor(record.turn, "done")
