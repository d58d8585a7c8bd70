"""Waiting on the Temporal server's own long poll, with a deadline, never by polling ``describe``.

Owns every wait a caller makes for something to happen on the server: a job's run chain to
close (``wait_closed``: ``result`` with a timeout, ``keel result --timeout``, the HTTP API's
``wait``) and a session to move (``SessionWatch``: ``turn_result`` for a turn whose job the
session has not started yet). Each wait is one ``GetWorkflowExecutionHistory`` long poll at a
time, which the server holds open until an event arrives or the poll's own deadline passes.

Two facts about temporalio 1.35 and the dev server (1.32) shape it, both measured:

- The server honours a history long poll's RPC deadline softly: it answers with an empty page
  ``LONG_POLL_SOFT_BUFFER`` seconds before the deadline (``temporalio/temporal#8238``), at once
  when the deadline is closer than that, and after its own ~20 s expiry when there is none.
  Servers 1.29 to 1.31 ignored the deadline and always waited their expiry (temporal#8970).
  So each poll asks for ``min(left, LONG_POLL_SECONDS) + LONG_POLL_SOFT_BUFFER`` and lands
  at the caller's deadline.
- Cancelling an RPC (``asyncio.wait_for(handle.result(), t)``) does not stop it: the SDK's
  native client keeps the call until the server answers, and a process that exits meanwhile
  can hang or abort while the interpreter finalises (about one exit in three in a probe).
  So a poll is never cancelled: the caller's wait ends at its deadline (plus
  ``DEADLINE_GRACE`` for the server's answer to arrive), and a poll a server holds longer
  (one that ignores the deadline) finishes on its own in the background.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from datetime import timedelta
from typing import Any, TypeVar

import structlog
from temporalio.api.common.v1 import WorkflowExecution
from temporalio.api.enums.v1 import EventType, HistoryEventFilterType
from temporalio.api.history.v1 import HistoryEvent
from temporalio.api.workflowservice.v1 import (
    GetWorkflowExecutionHistoryRequest,
    GetWorkflowExecutionHistoryResponse,
)
from temporalio.client import Client
from temporalio.service import RPCError, RPCStatusCode

from keel.client.errors import JobNotFound, JobTimeout

__all__ = [
    "DEADLINE_GRACE",
    "Deadline",
    "LONG_POLL_SECONDS",
    "LONG_POLL_SOFT_BUFFER",
    "SessionWatch",
    "wait_closed",
]

log = structlog.get_logger(__name__)

T = TypeVar("T")

LONG_POLL_SECONDS = 20.0
"""Longest one poll is asked to wait: the server's own long-poll expiry, so a wait without a
deadline costs one RPC per 20 s, as ``handle.result()`` does."""

LONG_POLL_SOFT_BUFFER = 1.0
"""How long before a poll's RPC deadline the server answers it with an empty page (measured
on server 1.32: a 3 s deadline answers after 2.0 s, 1 s or less at once)."""

DEADLINE_GRACE = 0.25
"""How long past the caller's deadline a poll may take to answer before the wait gives up on
it (the server answers at the deadline; this covers the round trip and a busy server)."""

HISTORY_PAGE_SIZE = 1000
"""Events per history page asked for (the server's default): a shorter page is the end."""

MIN_POLL_INTERVAL = 0.1
"""Least time between two polls: a server that answers empty pages at once is asked at most
ten times a second, not in a tight loop."""

_FILTER_CLOSE = HistoryEventFilterType.HISTORY_EVENT_FILTER_TYPE_CLOSE_EVENT
_FILTER_ALL = HistoryEventFilterType.HISTORY_EVENT_FILTER_TYPE_ALL_EVENT
_CLOSE_EVENTS = frozenset(
    {
        EventType.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED,
        EventType.EVENT_TYPE_WORKFLOW_EXECUTION_FAILED,
        EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CANCELED,
        EventType.EVENT_TYPE_WORKFLOW_EXECUTION_TERMINATED,
        EventType.EVENT_TYPE_WORKFLOW_EXECUTION_TIMED_OUT,
        EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CONTINUED_AS_NEW,
    }
)

_in_flight: set[asyncio.Task[Any]] = set()
"""Polls a wait gave up on, kept referenced until the server answers them (never cancelled)."""


def _new_run_id(event: HistoryEvent) -> str:
    """The run a close event hands over to (continue-as-new, a retry, a cron), or ''."""
    if event.HasField("workflow_execution_continued_as_new_event_attributes"):
        return event.workflow_execution_continued_as_new_event_attributes.new_execution_run_id
    if event.HasField("workflow_execution_completed_event_attributes"):
        return event.workflow_execution_completed_event_attributes.new_execution_run_id
    if event.HasField("workflow_execution_failed_event_attributes"):
        return event.workflow_execution_failed_event_attributes.new_execution_run_id
    if event.HasField("workflow_execution_timed_out_event_attributes"):
        return event.workflow_execution_timed_out_event_attributes.new_execution_run_id
    return ""


def _is_close(event: HistoryEvent) -> bool:
    return event.event_type in _CLOSE_EVENTS


def _forget(task: asyncio.Task[Any]) -> None:
    _in_flight.discard(task)
    if not task.cancelled() and (err := task.exception()) is not None:
        # Nobody waits for this answer any more; an error here changes nothing for anyone.
        log.debug("long_poll.abandoned_poll_failed", error=str(err))


async def _poll(
    client: Client,
    workflow_id: str,
    run_id: str,
    token: bytes,
    event_filter: HistoryEventFilterType.ValueType,
    left: float | None,
) -> GetWorkflowExecutionHistoryResponse | None:
    """One history long poll the server answers by ``left`` seconds from now (or its expiry).

    Returns:
        The page, or None when the poll's own deadline ended it (nothing new yet): the SDK's
        native client enforces the RPC deadline itself ("Timeout expired", CANCELLED), and a
        server may answer DEADLINE_EXCEEDED instead of an empty page.
    """
    wait = LONG_POLL_SECONDS if left is None else min(max(left, 0.0), LONG_POLL_SECONDS)
    try:
        return await _history(client, workflow_id, run_id, token, event_filter, wait)
    except RPCError as err:
        if err.status in (RPCStatusCode.CANCELLED, RPCStatusCode.DEADLINE_EXCEEDED):
            return None
        raise


async def _history(
    client: Client,
    workflow_id: str,
    run_id: str,
    token: bytes,
    event_filter: HistoryEventFilterType.ValueType,
    wait: float,
) -> GetWorkflowExecutionHistoryResponse:
    return await client.workflow_service.get_workflow_execution_history(
        GetWorkflowExecutionHistoryRequest(
            namespace=client.namespace,
            execution=WorkflowExecution(workflow_id=workflow_id, run_id=run_id),
            next_page_token=token,
            maximum_page_size=HISTORY_PAGE_SIZE,
            wait_new_event=True,
            history_event_filter_type=event_filter,
            skip_archival=True,
        ),
        retry=True,
        timeout=timedelta(seconds=wait + LONG_POLL_SOFT_BUFFER),
    )


class Deadline:
    """A caller's deadline on the running loop's clock, and how polls keep to it.

    Args:
        timeout: Seconds from now; None for no deadline.
    """

    def __init__(self, timeout: float | None) -> None:
        self._loop = asyncio.get_running_loop()
        self.timeout = timeout
        """The seconds the caller gave, for ``JobTimeout``."""
        self.at = None if timeout is None else self._loop.time() + timeout
        """The deadline in loop time, or None."""

    def now(self) -> float:
        """The loop's clock."""
        return self._loop.time()

    def left(self) -> float | None:
        """Seconds until the deadline (negative once past), or None without one."""
        return None if self.at is None else self.at - self._loop.time()

    def passed(self) -> bool:
        """Whether the deadline has passed."""
        left = self.left()
        return left is not None and left <= 0

    async def call(self, coro: Coroutine[Any, Any, T], job_id: str) -> T:
        """Await an RPC, never cancelling it; ``JobTimeout`` if it outlasts the deadline.

        Raises:
            JobTimeout: The call had not answered ``DEADLINE_GRACE`` after the deadline.
        """
        left = self.left()
        if left is None:
            return await coro
        task = asyncio.ensure_future(coro)
        done, _ = await asyncio.wait({task}, timeout=max(left + DEADLINE_GRACE, 0.0))
        if task not in done:
            # Cancelling would not stop the native call (see the module docstring): let it end.
            _in_flight.add(task)
            task.add_done_callback(_forget)
            raise JobTimeout(job_id, self.timeout or 0.0)
        return task.result()

    async def pace(self, started: float) -> None:
        """Sleep so polls start at least ``MIN_POLL_INTERVAL`` apart, never past the deadline."""
        pause = started + MIN_POLL_INTERVAL - self._loop.time()
        left = self.left()
        if left is not None:
            pause = min(pause, left)
        if pause > 0:
            await asyncio.sleep(pause)


async def wait_closed(client: Client, job_id: str, timeout: float | None) -> str:
    """Wait until the job's last run closes, following continue-as-new as ``result`` does.

    Args:
        client: The Temporal client.
        job_id: The job (its workflow ID).
        timeout: Seconds to wait at most; None waits as long as the job runs.

    Returns:
        The run ID of the run that closed the chain, or '' when that is the run the job ID
        named when the wait began (its latest; a job ID is never reused for a new chain).

    Raises:
        JobTimeout: If the job is still running after ``timeout`` seconds; it keeps running.
        RPCError: If the server refused a poll (NOT_FOUND: no such job; the façade maps it).
    """
    deadline = Deadline(timeout)
    run_id, token = "", b""
    while True:
        started = deadline.now()
        resp = await deadline.call(
            _poll(client, job_id, run_id, token, _FILTER_CLOSE, deadline.left()), job_id
        )
        events = [] if resp is None else list(resp.history.events)
        close = next((e for e in events if _is_close(e)), None)
        if close is not None:
            successor = _new_run_id(close)
            if not successor:
                return run_id
            run_id, token = successor, b""
            continue
        if deadline.passed():
            raise JobTimeout(job_id, timeout or 0.0)
        if resp is not None:
            token = resp.next_page_token
        await deadline.pace(started)


class SessionWatch:
    """Follows a session's history so a caller can wait for the session's next event.

    ``open`` reads to the end of the history (one read, usually one page) and keeps the
    server's position; each ``moved`` is then one long poll that answers when the session
    records anything new (a turn's job started, a turn ended, a message queued). Continue-as-new
    is followed to the new run.

    Args:
        client: The Temporal client.
        session_id: The session's workflow ID.
        job_id: The job the caller waits for, named in ``JobTimeout`` and ``JobNotFound``.
    """

    def __init__(self, client: Client, session_id: str, job_id: str) -> None:
        self._client = client
        self._session_id = session_id
        self._job_id = job_id
        self._run_id = ""
        self._token = b""
        self._closed = False

    async def open(self, deadline: Deadline) -> None:
        """Read to the end of the session's history so far.

        Raises:
            JobTimeout: The deadline passed first.
            RPCError: The server refused the read (NOT_FOUND: no such session).
        """
        while not self._closed and len(await self._next(deadline)) >= HISTORY_PAGE_SIZE:
            pass

    async def moved(self, deadline: Deadline) -> None:
        """Wait until the session records a new event.

        Raises:
            JobTimeout: The deadline passed first.
            JobNotFound: The session has ended, so a job it had not started never will be.
            RPCError: The server refused a poll.
        """
        if self._closed:
            raise JobNotFound(self._job_id)
        while True:
            started = deadline.now()
            if await self._next(deadline):
                return
            if deadline.passed():
                raise JobTimeout(self._job_id, deadline.timeout or 0.0)
            await deadline.pace(started)

    async def _next(self, deadline: Deadline) -> list[HistoryEvent]:
        """One page from the kept position: at once if there are new events, else a long poll."""
        resp = await deadline.call(
            _poll(
                self._client,
                self._session_id,
                self._run_id,
                self._token,
                _FILTER_ALL,
                deadline.left(),
            ),
            self._job_id,
        )
        if resp is None:
            return []
        events = list(resp.history.events)
        close = next((e for e in events if _is_close(e)), None)
        if close is None:
            self._token = resp.next_page_token
        elif successor := _new_run_id(close):
            self._run_id, self._token = successor, b""
        else:
            self._closed = True
        return events
