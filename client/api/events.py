"""``GET /v1/jobs/{id}/events``: a job's progress and answer tokens as Server-Sent Events.

Each event's ``id`` is the cursor after it (``client._events.EventCursor``); a client that
reconnects sends the last one back as ``Last-Event-ID`` (browsers' ``EventSource`` does this
by itself) and resumes without loss or repetition. The job's ownership is checked before the
response starts, so another tenant's job is a 404 like everywhere else; the stream ends with an
``end`` event carrying the job's result.

Annotations here are evaluated (no ``from __future__ import annotations``): FastAPI reads the
dependency aliases the app passes in from the route functions' signatures.
"""

from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, Query, Request
from fastapi.sse import EventSourceResponse, ServerSentEvent

from keel.client._events import EventCursor, JobStreamEvent
from keel.client.jobs import AgentJobs

__all__ = ["install_event_routes"]

RETRY_MS = 1_000
"""How long a browser's ``EventSource`` waits before it reconnects."""


def install_event_routes(app: FastAPI, jobs_dependency: Any) -> None:
    """Add the events route; ``jobs_dependency`` is the app's scoped ``AgentJobs`` alias."""

    async def open_stream(
        job_id: str,
        request: Request,
        jobs: jobs_dependency,
        last_event_id: Annotated[str | None, Header()] = None,
        after: Annotated[
            str | None, Query(max_length=64, description="Resume after this event ID.")
        ] = None,
    ) -> AsyncIterator[JobStreamEvent]:
        agent_jobs: AgentJobs = jobs
        cursor = EventCursor.parse(last_event_id or after)
        return await agent_jobs.events(job_id, after=cursor, tokens=request.app.state.keys.redis)

    @app.get(
        "/v1/jobs/{job_id}/events",
        response_class=EventSourceResponse,
        summary="Follow a job: progress, answer tokens, then its result (SSE)",
    )
    async def job_events(
        stream: Annotated[AsyncIterator[JobStreamEvent], Depends(open_stream)],
    ) -> AsyncIterator[ServerSentEvent]:
        """Server-Sent Events: ``progress``, ``token`` and a final ``end`` with the result.

        Resumable: send the last event's ``id`` as ``Last-Event-ID`` (or ``?after=``).
        """
        yield ServerSentEvent(comment="keel job events", retry=RETRY_MS)
        async for event in stream:
            yield ServerSentEvent(event=event.event, id=event.id, data=event.data)
