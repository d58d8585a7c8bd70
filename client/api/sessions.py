"""The HTTP API's session routes (issue 15): open a session, send it messages, read it, end it.

A thin layer over ``AgentSessions``, scoped like the job routes: the caller's key decides the
tenant and user, and another tenant's session is a 404 like one that does not exist.

- ``POST /v1/sessions`` opens the session's workflow at once (``AgentSessions.open``) with the
  request every turn inherits, so the request is checked once, up front, and lives in the
  workflow's input rather than in a second store. A key that is open is returned as it is.
- ``POST /v1/sessions/{id}/messages`` sends a message to an open session and never reopens an
  ended one. ``Idempotency-Key`` is the message ID: a resend returns the first send's turn and
  runs nothing again. Each message counts against the tenant's daily job quota once (a turn is
  a job); its turns take running-job slots when a concurrency limit covers the tenant or user,
  decided when the session opens.
- ``GET /v1/sessions/{id}/events`` streams every turn in order (``session_events``).

Refusals are 409s with their own codes: ``session_ended``, ``session_budget_exhausted`` (with
``budget`` naming it) and ``session_busy`` (too many messages queued).

Annotations here are evaluated (no ``from __future__ import annotations``): FastAPI reads the
dependency alias the app passes in from the route functions' signatures.
"""

import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any

import structlog
from fastapi import Depends, FastAPI, Header, Query, Request, Response
from fastapi.responses import JSONResponse
from fastapi.sse import EventSourceResponse, ServerSentEvent

from keel.activities.slots import slots_for
from keel.activities.snapshots import SessionSnapshots
from keel.activities.usage import UsageLedger
from keel.client.api.limits import Admission
from keel.client.api.models import (
    ErrorResponse,
    MessageAccepted,
    MessageIn,
    SessionCreate,
    SessionCreated,
    job_links,
    session_links,
)
from keel.client.api.session_events import SessionCursor, SessionStreamEvent, session_events
from keel.client.errors import InvalidJobRequest, JobTimeout
from keel.client.sessions import AgentSessions, SessionNotFound, SessionRefused, tenant_of_session
from keel.workflows.session_types import SessionStatus
from keel.workflows.types import IDENT_RE

__all__ = ["install_session_routes"]

log = structlog.get_logger("keel.api")

MAX_WAIT_SECONDS = 60.0
"""Longest ``wait`` a message may hold a connection for (the same as a job's)."""
RETRY_MS = 1_000
"""How long a browser's ``EventSource`` waits before it reconnects."""

REFUSAL_CODES = {
    "ended": "session_ended",
    "budget_exhausted": "session_budget_exhausted",
    "busy": "session_busy",
    "refused": "session_refused",
}
"""The error code of each kind of ``SessionRefused`` (all 409)."""

Responses = dict[int | str, dict[str, Any]]


def _doc(status: int, description: str) -> Responses:
    """An error response for the OpenAPI document, in the API's one error shape."""
    return {status: {"model": ErrorResponse, "description": description}}


_NOT_FOUND = _doc(404, "No such session for this caller (another tenant's session included).")
_REFUSED = _doc(
    409,
    "The session refused the message: ``session_ended``, ``session_budget_exhausted`` "
    "(``budget`` names it) or ``session_busy`` (too many messages queued).",
)
_STREAM_NOT_FOUND: Responses = {
    404: {
        # Spelled out: on an event-stream route a ``model`` would be documented as
        # ``text/event-stream``, but the error is JSON (the 404 comes before the stream starts).
        "description": _NOT_FOUND[404]["description"],
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}},
    }
}
_ENDED = _doc(409, "A session with this key has ended (``session_ended``); keys are not reused.")


def _message_id(header: str | None) -> str:
    """The message ID: the caller's ``Idempotency-Key``, else a fresh one.

    Raises:
        InvalidJobRequest: An empty or malformed key (refused, not ignored: a caller that
            meant one would lose its protection against repeats).
    """
    if header is None:
        return uuid.uuid4().hex
    if not IDENT_RE.match(header):
        raise InvalidJobRequest(
            "Idempotency-Key",
            "must be 1-64 characters of letters, digits, '.', '_' or '-', "
            "starting with a letter or digit",
        )
    return header


def install_session_routes(app: FastAPI, caller_dependency: Any) -> None:  # noqa: C901
    """Add the session routes and their errors; ``caller_dependency`` is the app's ``Caller``."""

    async def scoped_sessions(request: Request, caller: caller_dependency) -> AgentSessions:
        # Async although it awaits nothing: a plain ``def`` dependency costs a thread hop.
        state = request.app.state
        scope = None if caller.role == "operator" else caller.tenant
        # Status reads the snapshot each session keeps in Redis (the keys' Redis), when there
        # is one: it answers without waiting for a worker to run the query.
        keys = getattr(state, "keys", None)
        snapshots = SessionSnapshots(keys.redis) if keys is not None else None
        return AgentSessions(
            state.client, task_queue=state.task_queue, tenant=scope, snapshots=snapshots
        )

    sessions_dependency = Annotated[AgentSessions, Depends(scoped_sessions)]

    @app.exception_handler(SessionNotFound)
    async def on_not_found(_request: Request, exc: SessionNotFound) -> JSONResponse:
        return _error(404, "session_not_found", exc.message)

    @app.exception_handler(SessionRefused)
    async def on_refused(_request: Request, exc: SessionRefused) -> JSONResponse:
        extra = {"budget": exc.budget} if exc.budget is not None else {}
        return _error(409, REFUSAL_CODES[exc.code], exc.message, **extra)

    @app.post("/v1/sessions", status_code=201, response_model=SessionCreated, responses=_ENDED)
    async def open_session(
        body: SessionCreate, sessions: sessions_dependency, caller: caller_dependency,
        request: Request,
    ) -> SessionCreated:  # fmt: skip
        """Open a session: budgets and what every turn inherits; idempotent on its key."""
        req = body.to_request(caller.tenant, caller.user or caller.key_id)
        key = body.session_key or uuid.uuid4().hex
        # Turns count against running-job limits as jobs do: when a limit covers the tenant
        # or its users, every turn takes a slot (and waits in line for one).
        limits = await slots_for(request.app.state.keys.redis).limits(req.tenant)
        session_id = await sessions.open(req, key, job_slot=limits.limited)
        log.info("api.session_opened", session_id=session_id, tenant=req.tenant)
        return SessionCreated(
            session_id=session_id, session_key=key, links=session_links(session_id)
        )

    @app.post(
        "/v1/sessions/{session_id}/messages",
        status_code=202,
        response_model=MessageAccepted,
        responses={
            200: {"model": MessageAccepted, "description": "The turn ended within ``wait``."},
            **_NOT_FOUND,
            **_REFUSED,
        },
    )
    async def send_message(
        session_id: str,
        body: MessageIn,
        sessions: sessions_dependency,
        caller: caller_dependency,
        request: Request,
        response: Response,
        idempotency_key: Annotated[
            str | None,
            Header(
                description="The message's ID: repeat it to get the same turn back, run once.",
                json_schema_extra={"pattern": IDENT_RE.pattern},  # else a 400 naming it
            ),
        ] = None,
        wait: Annotated[float, Query(ge=0, le=MAX_WAIT_SECONDS)] = 0,
    ) -> MessageAccepted:
        """Send a message: the session's next turn, or the answer to its turn's question.

        202 with the turn (its number, its job, how many turns run first); with ``wait``
        seconds, 200 and the turn's result inline if its job ends in time.
        """
        message_id = _message_id(idempotency_key)
        if sessions.tenant is not None and tenant_of_session(session_id) != sessions.tenant:
            raise SessionNotFound(session_id)  # before counting anything against the quota
        # A turn is a job: counted against the daily quotas once per message ID, so a resend
        # is not counted again.
        admission: Admission = request.state.admission
        quotas = admission.quotas()
        ledger: UsageLedger = request.app.state.usage
        await ledger.admit_job(
            caller.tenant,
            f"{session_id}/{message_id}",
            jobs_per_day=quotas.jobs_per_day,
            usd_per_day=quotas.usd_per_day,
        )
        accepted = await sessions.message(session_id, body.text, message_id=message_id)
        out = MessageAccepted(**accepted.model_dump(), links=job_links(accepted.job_id))
        if wait > 0:
            try:
                out.result = await sessions.turn_result(accepted, timeout=wait)
                response.status_code = 200
            except JobTimeout:
                pass
        return out

    @app.get("/v1/sessions/{session_id}", response_model=SessionStatus, responses=_NOT_FOUND)
    async def get_session(session_id: str, sessions: sessions_dependency) -> Response:
        """The session: its phase, usage against its budget, summary, recent turns, queue."""
        async with app.state.status_queries:  # bounded, like a job's: see STATUS_QUERIES
            status = await sessions.status(session_id)
        return Response(status.model_dump_json(), media_type="application/json")

    @app.delete(
        "/v1/sessions/{session_id}",
        status_code=202,
        response_model=SessionStatus,
        responses=_NOT_FOUND,
    )
    async def end_session(session_id: str, sessions: sessions_dependency) -> SessionStatus:
        """End the session after the turn in progress; queued messages do not run.

        202 with the session as it was asked to end (its phase becomes ``ended`` once the turn
        in progress is done). Ending an ended session answers the same way, with its final
        state.
        """
        try:
            return await sessions.end(session_id)
        except SessionNotFound:
            # Ended already (its workflow has closed, so the update finds nothing): the query
            # still reads it; a session that never existed stays a 404.
            return await sessions.status(session_id)

    async def open_stream(
        session_id: str,
        request: Request,
        sessions: sessions_dependency,
        last_event_id: Annotated[str | None, Header()] = None,
        after: Annotated[
            str | None, Query(max_length=80, description="Resume after this event ID.")
        ] = None,
    ) -> AsyncIterator[SessionStreamEvent]:
        # Checked here, before the response starts: a bad cursor or another tenant's session
        # is a 4xx, not a stream that breaks off.
        cursor = SessionCursor.parse(last_event_id or after)
        status = await sessions.status(session_id)
        return session_events(sessions, status, cursor, tokens=request.app.state.keys.redis)

    @app.get(
        "/v1/sessions/{session_id}/events",
        response_class=EventSourceResponse,
        summary="Follow a session: each turn's acceptance, job events and result (SSE)",
        responses=_STREAM_NOT_FOUND,
    )
    async def session_stream(
        stream: Annotated[AsyncIterator[SessionStreamEvent], Depends(open_stream)],
    ) -> AsyncIterator[ServerSentEvent]:
        """Server-Sent Events across turns, in turn order, until the session ends.

        ``turn_accepted``, ``turn_started``, the turn's ``progress`` and ``token`` events,
        ``turn_done`` (with the job's result); ``session_ended`` last. Resumable: send the last
        event's ``id`` as ``Last-Event-ID`` (or ``?after=``).
        """
        yield ServerSentEvent(comment="keel session events", retry=RETRY_MS)
        async for event in stream:
            yield ServerSentEvent(event=event.event, id=event.id, data=event.data)


def _error(status: int, code: str, message: str, **extra: object) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message, **extra}}, status)
