"""``AgentSessions``: multi-turn conversations, the typed façade beside ``AgentJobs`` (issue 15).

A session is one ``SessionWorkflow`` per tenant and session key (workflow ID
``agent-session-{tenant}:{key}``). Each message is a turn: sent with update-with-start, so the
first message opens the session, and idempotent on its message ID, so a resend returns the
first send's turn and runs nothing again. Turns run one at a time in the order they were
accepted, each as an agent job of its own (``TurnAccepted.job_id``) that ``AgentJobs`` reads
like any other. Another tenant's session is not found, never forbidden.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta
from typing import Any, Literal
from uuid import uuid4

import structlog
from pydantic import ValidationError
from redis.exceptions import RedisError
from temporalio.client import (
    Client,
    WithStartWorkflowOperation,
    WorkflowExecutionStatus,
    WorkflowHandle,
    WorkflowQueryFailedError,
    WorkflowUpdateFailedError,
)
from temporalio.common import (
    SearchAttributePair,
    TypedSearchAttributes,
    WorkflowIDConflictPolicy,
    WorkflowIDReusePolicy,
)
from temporalio.exceptions import ApplicationError, WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from keel.activities.snapshots import SessionSnapshots
from keel.client._error_mapping import failure_message, rpc_error
from keel.client._long_poll import Deadline, SessionWatch
from keel.client._validation import validate_request
from keel.client.errors import AgentJobError, InvalidJobRequest, JobNotFound, JobTimeout
from keel.client.jobs import AgentJobs
from keel.workflows import TASK_QUEUE, TASK_QUEUES
from keel.workflows.contract import Session
from keel.workflows.search_attributes import KEEL_SESSION, KEEL_TENANT, KEEL_USER
from keel.workflows.session_types import (
    SESSION_BUDGET_EXHAUSTED,
    SESSION_BUSY,
    SESSION_ENDED,
    SESSION_ID_PREFIX,
    SessionInput,
    SessionMessage,
    SessionRequest,
    SessionStatus,
    TurnAccepted,
    session_id_for,
)
from keel.workflows.types import IDENT_RE, JobRequest, JobResult

__all__ = ["AgentSessions", "SessionNotFound", "SessionRefused"]

log = structlog.get_logger(__name__)


class SessionNotFound(AgentJobError):
    """No session with this ID exists (or it belongs to another tenant)."""

    def __init__(self, session_id: str) -> None:
        super().__init__(f"session {session_id} not found")
        self.session_id = session_id


RefusalCode = Literal["ended", "budget_exhausted", "busy", "refused"]


class SessionRefused(AgentJobError):
    """The session refused a message: it has ended, or a session budget is exhausted."""

    def __init__(
        self,
        session_id: str,
        reason: str,
        *,
        code: RefusalCode = "refused",
        budget: str | None = None,
    ) -> None:
        super().__init__(f"session {session_id} refused the message: {reason}")
        self.session_id = session_id
        self.reason = reason
        """Why, naming the exhausted budget when that is the reason."""
        # Added for the HTTP API (issue 15): a refusal's kind, read from the failure's type.
        self.code: RefusalCode = code
        """``ended``, ``budget_exhausted`` (``budget`` names it), ``busy`` (too many queued
        messages) or ``refused`` (any other reason)."""
        self.budget = budget
        """The exhausted session budget (``max_turns``, ``max_tokens``, ``max_cost_usd``)."""


_REFUSALS: dict[str, RefusalCode] = {
    SESSION_ENDED: "ended",
    SESSION_BUDGET_EXHAUSTED: "budget_exhausted",
    SESSION_BUSY: "busy",
}


def _refused(session_id: str, err: WorkflowUpdateFailedError) -> SessionRefused:
    """The ``SessionRefused`` for a rejected message, typed by the validator's error."""
    cause = err.cause
    code = (
        _REFUSALS.get(cause.type or "", "refused")
        if isinstance(cause, ApplicationError)
        else "refused"
    )
    budget = None
    if code == "budget_exhausted" and isinstance(cause, ApplicationError) and cause.details:
        budget = str(cause.details[0])
    return SessionRefused(session_id, failure_message(cause), code=code, budget=budget)


def tenant_of_session(session_id: str) -> str | None:
    """The tenant a session ID names, or None for an ID of another shape."""
    if not session_id.startswith(SESSION_ID_PREFIX) or ":" not in session_id:
        return None
    tenant = session_id[len(SESSION_ID_PREFIX) :].split(":", 1)[0]
    return tenant if IDENT_RE.match(tenant) else None


class AgentSessions:
    """Open sessions, send them messages and read them through an injected Temporal client.

    Args:
        client: A connected client using Keel's data converter (``client.connect``).
        task_queue: Queue the session and its turns run on; by default the request's mode
            picks it, as for jobs.
        tenant: Scope every call to this tenant (another tenant's session is not found).
        snapshots: Keel's Redis: ``status`` reads the snapshot each session writes there as it
            changes, and asks the session's workflow only when there is none. Without it,
            ``status`` always asks the workflow (a query, which its worker answers).
    """

    def __init__(
        self,
        client: Client,
        *,
        task_queue: str | None = None,
        tenant: str | None = None,
        snapshots: SessionSnapshots | None = None,
    ) -> None:
        self._client = client
        self._snapshots = snapshots
        self._fixed_queue = task_queue
        self.tenant = tenant
        self.jobs = AgentJobs(client, task_queue=task_queue, tenant=tenant)
        """The turns are jobs: read their status, events and results here."""

    def request(self, req: SessionRequest | Mapping[str, Any]) -> SessionRequest:
        """Validate a session request, scoped to this client's tenant.

        Raises:
            InvalidJobRequest: Naming the field that is wrong.
        """
        data = req.model_dump() if isinstance(req, SessionRequest) else dict(req)
        if self.tenant is not None:
            if data.get("tenant", self.tenant) != self.tenant:
                raise InvalidJobRequest("tenant", f"this client acts for {self.tenant} only")
            data["tenant"] = self.tenant
        try:
            request = SessionRequest.model_validate(data)
        except ValidationError as err:
            first = err.errors()[0]
            raise InvalidJobRequest(
                ".".join(str(p) for p in first["loc"]) or "request", first["msg"]
            ) from None
        # Each turn is a job: checked as one (with a stand-in goal) now, so an unknown tool,
        # corpus or folder is refused when the session opens, not when every turn fails.
        turn = request.model_dump(include=set(JobRequest.model_fields) - {"budget"})
        try:
            job = validate_request({**turn, "budget": request.turn_budget, "goal": "(turn)"})
        except InvalidJobRequest as err:
            field = err.field.replace("budget", "turn_budget", 1)
            raise InvalidJobRequest(field, err.reason) from None
        return request.model_copy(update={"docs_dir": job.docs_dir})

    async def send(
        self,
        req: SessionRequest | Mapping[str, Any],
        session_key: str,
        text: str,
        *,
        message_id: str | None = None,
        job_slot: bool = False,
    ) -> TurnAccepted:
        """Send a message, opening the session with ``req`` if it is not running yet.

        Args:
            req: The session's request (its budgets, tools and turn budget); used only when
                this message opens the session.
            session_key: The caller's name for the session, unique within the tenant.
            text: The message.
            message_id: Makes a resend a no-op (the first send's turn comes back); a fresh
                one by default.
            job_slot: Turns take running-job slots (a concurrency limit covers the tenant).

        Returns:
            The message's turn: its number, its job ID and how many turns run before it.

        Raises:
            InvalidJobRequest: A malformed request, key or message; nothing was sent.
            SessionRefused: The session has ended or exhausted a budget.
        """
        request = self.request(req)
        if not IDENT_RE.match(session_key):
            raise InvalidJobRequest("session", "1-64 letters, digits, '.', '_' or '-'")
        message = _message(message_id or uuid4().hex, text)
        session_id = session_id_for(request.tenant, session_key)
        start = WithStartWorkflowOperation(
            Session.run,
            SessionInput(request=request, job_slot=job_slot),
            # A session key is never reused: an ended session's turns keep their job IDs.
            id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
            **self._start_options(request, session_key),
        )
        try:
            return await self._client.execute_update_with_start_workflow(
                Session.send_message, message, start_workflow_operation=start
            )
        except WorkflowUpdateFailedError as err:
            raise _refused(session_id, err) from None
        except WorkflowAlreadyStartedError:
            raise SessionRefused(session_id, "the session has ended", code="ended") from None
        except RPCError as err:
            raise self._rpc_error(err, session_id) from None

    # ``open`` and ``message`` were added for the HTTP API (issue 15): it opens a session with
    # its request first, then sends messages that must never reopen one that has ended.
    async def open(
        self, req: SessionRequest | Mapping[str, Any], session_key: str, *, job_slot: bool = False
    ) -> str:
        """Open a session without sending it anything; idempotent on its key.

        A running session with this key is returned as it is, keeping the request it was
        opened with. A key whose session has ended is refused: a session key names one
        conversation, so its turns' job IDs never name two jobs.

        Args:
            req: The session's request (budgets, tools, turn budget).
            session_key: The caller's name for the session, unique within the tenant.
            job_slot: Turns take running-job slots (a concurrency limit covers the tenant).

        Returns:
            The session's ID.

        Raises:
            InvalidJobRequest: A malformed request or key; nothing was started.
            SessionRefused: The session with this key has ended (``code="ended"``).
        """
        request = self.request(req)
        if not IDENT_RE.match(session_key):
            raise InvalidJobRequest("session", "1-64 letters, digits, '.', '_' or '-'")
        session_id = session_id_for(request.tenant, session_key)
        try:
            await self._client.start_workflow(
                Session.run,
                SessionInput(request=request, job_slot=job_slot),
                id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
                **self._start_options(request, session_key),
            )
        except WorkflowAlreadyStartedError:
            # With USE_EXISTING a running session is reused: only a closed one lands here.
            raise SessionRefused(session_id, "the session has ended", code="ended") from None
        except RPCError as err:
            raise self._rpc_error(err, session_id) from None
        return session_id

    async def message(
        self, session_id: str, text: str, *, message_id: str | None = None
    ) -> TurnAccepted:
        """Send a message to an open session (``open``); never opens or reopens one.

        Args:
            session_id: The session.
            text: The message.
            message_id: Makes a resend a no-op (the first send's turn comes back).

        Returns:
            The message's turn.

        Raises:
            InvalidJobRequest: A malformed message; nothing was sent.
            SessionNotFound: No such session, or another tenant's.
            SessionRefused: The session has ended, exhausted a budget, or is full.
        """
        self._own(session_id)
        message = _message(message_id or uuid4().hex, text)
        try:
            return await self._handle(session_id).execute_update(Session.send_message, message)
        except WorkflowUpdateFailedError as err:
            raise _refused(session_id, err) from None
        except RPCError as err:
            if err.status == RPCStatusCode.NOT_FOUND and await self._closed(session_id):
                raise SessionRefused(session_id, "the session has ended", code="ended") from None
            raise self._rpc_error(err, session_id) from None

    async def _closed(self, session_id: str) -> bool:
        """Whether the session exists and has closed (an update to it is then NOT_FOUND)."""
        try:
            described = await self._handle(session_id).describe()
        except RPCError:
            return False
        return described.status not in (None, WorkflowExecutionStatus.RUNNING)

    def _start_options(self, request: SessionRequest, session_key: str) -> dict[str, Any]:
        """How a session starts, whichever call starts it (``send`` or ``open``)."""
        return {
            "id": session_id_for(request.tenant, session_key),
            "task_queue": self._fixed_queue or TASK_QUEUES.get(request.mode, TASK_QUEUE),
            "id_conflict_policy": WorkflowIDConflictPolicy.USE_EXISTING,
            "search_attributes": TypedSearchAttributes(
                [
                    SearchAttributePair(KEEL_TENANT, request.tenant),
                    SearchAttributePair(KEEL_USER, request.user),
                    SearchAttributePair(KEEL_SESSION, session_key),
                ]
            ),
            "static_summary": f"session {session_key}",
            "execution_timeout": timedelta(days=365),
        }

    async def status(self, session_id: str) -> SessionStatus:
        """A snapshot of the session; never waits for the turn in progress.

        Read from Redis when this client has ``snapshots`` and the session has written one
        (about 10x faster than the query under load: ``keel bench sessions``), else queried.

        Raises:
            SessionNotFound: No such session, or another tenant's.
        """
        self._own(session_id)
        snapshot = await self._snapshot(session_id)
        if snapshot is not None:
            return snapshot
        try:
            return await self._handle(session_id).query(Session.get_session)
        except WorkflowQueryFailedError as err:
            raise AgentJobError(f"session {session_id}: {err}") from None
        except RPCError as err:
            raise self._rpc_error(err, session_id) from None

    async def _snapshot(self, session_id: str) -> SessionStatus | None:
        tenant = tenant_of_session(session_id)
        if self._snapshots is None or tenant is None:
            return None
        try:
            found = await self._snapshots.get(tenant, session_id)
            return None if found is None else SessionStatus.model_validate_json(found)
        except (RedisError, OSError, ValueError) as err:  # ValidationError is a ValueError
            # Redis down or a snapshot this version cannot read: the query still answers.
            log.warning("session.snapshot_unreadable", session_id=session_id, error=str(err))
            return None

    async def turn_result(
        self, accepted: TurnAccepted, *, timeout: float | None = None
    ) -> JobResult:
        """Wait for a turn's job to end and return its result.

        A queued turn's job does not exist until the turns before it have run. Until it does,
        this long-polls the session's history, which answers when the session records
        anything new (such as starting a turn's job), and looks for the job after each answer:
        one poll per session step, never a timed loop. Once the job exists, this is the job's
        own long poll (``AgentJobs.result``).

        Raises:
            JobTimeout: ``timeout`` passed first.
            JobFailed: The turn's job failed.
            JobNotFound: The session ended before it started the turn's job (queued turns
                do not run after ``end``).
            SessionNotFound: No such session, or another tenant's.
        """
        self._own(accepted.session_id)
        deadline = Deadline(timeout)
        watch: SessionWatch | None = None
        while True:
            left = deadline.left()
            try:
                return await self.jobs.final_result(
                    accepted.job_id, timeout=None if left is None else max(left, 0.0)
                )
            except JobNotFound:
                pass
            except JobTimeout:
                raise JobTimeout(accepted.job_id, timeout or 0.0) from None
            try:
                if watch is None:
                    # Opened after the first miss and followed by one more look: a job the
                    # session starts before the watch has its position is found by that look,
                    # and one it starts later wakes the watch.
                    watch = SessionWatch(self._client, accepted.session_id, accepted.job_id)
                    await watch.open(deadline)
                else:
                    await watch.moved(deadline)
            except RPCError as err:
                raise self._rpc_error(err, accepted.session_id) from None

    async def end(self, session_id: str) -> SessionStatus:
        """End the session after the turn in progress; messages still queued do not run.

        Raises:
            SessionNotFound: No such session, or another tenant's.
        """
        self._own(session_id)
        try:
            return await self._handle(session_id).execute_update(Session.end)
        except WorkflowUpdateFailedError as err:
            raise _refused(session_id, err) from None
        except RPCError as err:
            raise self._rpc_error(err, session_id) from None

    def _own(self, session_id: str) -> None:
        if self.tenant is not None and tenant_of_session(session_id) != self.tenant:
            raise SessionNotFound(session_id)

    def _handle(self, session_id: str) -> WorkflowHandle[Session, SessionStatus]:
        return self._client.get_workflow_handle_for(Session.run, session_id)

    def _rpc_error(self, err: RPCError, session_id: str) -> AgentJobError:
        if err.status == RPCStatusCode.NOT_FOUND:
            return SessionNotFound(session_id)
        address = self._client.service_client.config.target_host
        queue = self._fixed_queue or TASK_QUEUE
        return rpc_error(err, address=address, task_queue=queue, job_id=session_id)


def _message(message_id: str, text: str) -> SessionMessage:
    try:
        return SessionMessage(message_id=message_id, text=text)
    except ValidationError as err:
        first = err.errors()[0]
        raise InvalidJobRequest(str(first["loc"][0]), first["msg"]) from None
