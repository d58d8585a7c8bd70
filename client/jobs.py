"""``AgentJobs``: the typed façade callers use to start, inspect, answer and collect agent jobs.

A job is one ``AgentLoopWorkflow`` execution whose workflow ID is the job ID,
``agent-job-{request_key}``. Starting is idempotent on the request key: the same key always
names the same job, whether it is still running or has long ended. Requests are validated
here, before anything is started, so a malformed job fails fast with the field that is wrong.

Every Temporal exception is mapped onto ``client.errors``; callers never catch SDK types.
"""

from __future__ import annotations

import asyncio
import builtins
import itertools
import re
from collections.abc import AsyncIterator, Mapping
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, cast, get_args
from uuid import uuid4

from pydantic import BaseModel, ValidationError
from temporalio.client import (
    Client,
    RPCTimeoutOrCancelledError,
    WorkflowExecution,
    WorkflowExecutionStatus,
    WorkflowFailureError,
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
from temporalio.exceptions import (
    ApplicationError,
    CancelledError,
    FailureError,
    TerminatedError,
    WorkflowAlreadyStartedError,
)
from temporalio.exceptions import (
    TimeoutError as TemporalTimeoutError,
)
from temporalio.service import RPCError, RPCStatusCode

from keel.activities.catalog import BUILTIN_TOOLS
from keel.client.errors import (
    AgentJobError,
    ConnectionFailed,
    InputRejected,
    InvalidJobRequest,
    JobFailed,
    JobNotFound,
    JobTimeout,
)
from keel.workflows import TASK_QUEUE, TASK_QUEUES, WORKFLOW_TYPE
from keel.workflows.agent_loop import AgentLoopWorkflow
from keel.workflows.search_attributes import (
    KEEL_COST_USD,
    KEEL_MODE,
    KEEL_OUTCOME,
    KEEL_STATE,
    KEEL_TENANT,
    KEEL_TOKENS,
    KEEL_USER,
)
from keel.workflows.types import (
    IDENT_RE,
    JOB_ID_PREFIX,
    TERMINAL_STATES,
    AgentLoopInput,
    HumanInput,
    JobRequest,
    JobResult,
    JobState,
    JobStatus,
)

__all__ = [
    "AgentJobs",
    "JobSummary",
    "REQUEST_KEY_RE",
    "list_query",
    "validate_request",
    "validate_request_key",
]

REQUEST_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
"""Caller idempotency keys: the job ID is built from them, so no quotes, spaces or slashes."""

SUMMARY_CHARS = 120
"""The UI shows ``static_summary`` on one line; longer goals are cut."""

BACKSTOP_SLACK_SECONDS = 600.0
"""Room over the job's own budgets before Temporal's ``execution_timeout`` kills it."""

QUERY_TIMEOUT = timedelta(seconds=10)
"""A status query waits for a worker; without one it would hang, so give up and say why."""

RESULT_POLL_SECONDS = 0.5
"""How often ``result(timeout=...)`` checks whether the job has closed."""

_JOB_STATES: frozenset[str] = frozenset(get_args(JobState))

_EXECUTION_STATE: dict[WorkflowExecutionStatus, JobState] = {
    WorkflowExecutionStatus.FAILED: "failed",
    WorkflowExecutionStatus.TERMINATED: "failed",
    WorkflowExecutionStatus.TIMED_OUT: "failed",
    WorkflowExecutionStatus.CANCELED: "cancelled",
    WorkflowExecutionStatus.COMPLETED: "completed",
}
"""Job state implied by a closed execution when its own status query is unavailable."""


class JobSummary(BaseModel):
    """One row of ``AgentJobs.list``, read from visibility (search attributes), not a query."""

    job_id: str
    """Workflow ID of the job."""
    state: JobState | None = None
    """Last ``KeelState`` the workflow upserted; ``None`` before visibility caught up."""
    outcome: str | None = None
    """``KeelOutcome`` once the job has ended."""
    tenant: str | None = None
    """``KeelTenant`` set at start."""
    user: str | None = None
    """``KeelUser`` set at start."""
    temporal_status: str
    """Temporal's execution status name, such as ``RUNNING`` or ``COMPLETED``."""
    started_at: datetime
    """When the job's current run started."""
    cost_usd: float | None = None
    """``KeelCostUsd``: dollars spent so far."""
    tokens: int | None = None
    """``KeelTokens``: prompt plus completion tokens so far."""


def validate_request(req: JobRequest | Mapping[str, Any]) -> JobRequest:
    """Validate a job request fully, without contacting Temporal.

    Runs the pydantic model's checks, then the ones it cannot do alone: every tool must be a
    built-in tool, and ``docs_dir`` must be an existing directory (resolved to an absolute
    path, so a worker on the same machine finds it whatever its working directory).

    Args:
        req: A ``JobRequest``, or a mapping to validate into one.

    Returns:
        The request, with ``docs_dir`` made absolute.

    Raises:
        InvalidJobRequest: If any field is wrong; ``field`` is its dotted path.
    """
    try:
        request = req if isinstance(req, JobRequest) else JobRequest.model_validate(req)
    except ValidationError as err:
        raise InvalidJobRequest.from_validation_error(err) from None
    unknown = [name for name in request.tools if name not in BUILTIN_TOOLS]
    if unknown:
        raise InvalidJobRequest(
            "tools",
            f"unknown tool {', '.join(map(repr, unknown))}; "
            f"known tools: {', '.join(sorted(BUILTIN_TOOLS))}",
        )
    if request.docs_dir is not None:
        docs = Path(request.docs_dir).expanduser().resolve()
        if not docs.is_dir():
            problem = "is not a directory" if docs.exists() else "does not exist"
            raise InvalidJobRequest("docs_dir", f"{docs} {problem}")
        request = request.model_copy(update={"docs_dir": str(docs)})
    return request


def validate_request_key(request_key: str) -> str:
    """Check a caller's idempotency key.

    Args:
        request_key: 1-128 letters, digits, ``.``, ``_`` or ``-``, starting with a letter or
            digit.

    Returns:
        The key, unchanged.

    Raises:
        InvalidJobRequest: With ``field="request_key"`` if the key does not match.
    """
    if not REQUEST_KEY_RE.match(request_key):
        raise InvalidJobRequest(
            "request_key",
            "must be 1-128 characters of letters, digits, '.', '_' or '-', "
            "starting with a letter or digit",
        )
    return request_key


def list_query(*, tenant: str | None = None, state: str | None = None) -> str:
    """Build the visibility query that selects Keel jobs, optionally by tenant and state.

    Both values are checked against closed vocabularies before they are put into the query
    string, so no caller can inject visibility-query syntax.

    Args:
        tenant: Only this tenant's jobs; must be an identifier (``IDENT_RE``).
        state: Only jobs in this ``JobState``.

    Returns:
        A query such as ``WorkflowType = 'AgentLoopWorkflow' AND KeelTenant = 'acme'``.

    Raises:
        InvalidJobRequest: With ``field`` ``"tenant"`` or ``"state"`` if a value is malformed.
    """
    clauses = [f"WorkflowType = '{WORKFLOW_TYPE}'"]
    if tenant is not None:
        if not IDENT_RE.match(tenant):
            raise InvalidJobRequest(
                "tenant", "must be 1-64 letters, digits, '.', '_' or '-', starting alphanumeric"
            )
        clauses.append(f"{KEEL_TENANT.name} = '{tenant}'")
    if state is not None:
        if state not in _JOB_STATES:
            raise InvalidJobRequest(
                "state", f"unknown state {state!r}; one of: {', '.join(get_args(JobState))}"
            )
        clauses.append(f"{KEEL_STATE.name} = '{state}'")
    return " AND ".join(clauses)


class AgentJobs:
    """Start and drive agent jobs through an injected Temporal client.

    Args:
        client: A connected client using the pydantic data converter (see
            ``client.connect``). Never created here, so tests and servers share one.
        task_queue: Queue the workers for ``AgentLoopWorkflow`` listen on.
    """

    def __init__(self, client: Client, *, task_queue: str | None = None) -> None:
        self._client = client
        self._fixed_queue = task_queue
        self.task_queue = task_queue or TASK_QUEUE
        """Task queue for new jobs when set explicitly; otherwise each job's ``mode`` picks
        its queue (``keel-interactive`` or ``keel-batch``)."""

    async def start(
        self,
        req: JobRequest | Mapping[str, Any],
        *,
        request_key: str | None = None,
        task_queue: str | None = None,
    ) -> str:
        """Validate a request and start its job, or find the job this key already started.

        Args:
            req: The job to run, as a model or a mapping.
            request_key: Idempotency key; the job ID is ``agent-job-{request_key}``. Sending
                the same key again returns the same job ID and starts nothing, even after
                that job has ended. Defaults to a fresh random key.
            task_queue: Overrides the façade's task queue for this job.

        Returns:
            The job ID.

        Raises:
            InvalidJobRequest: If the request or key is malformed; nothing was started.
            ConnectionFailed: If the Temporal server cannot be reached.
            AgentJobError: If the server refused the start for another reason.
        """
        request = validate_request(req)
        key = uuid4().hex if request_key is None else request_key
        job_id = JOB_ID_PREFIX + validate_request_key(key)
        budget = request.budget
        backstop = (
            budget.max_seconds
            + budget.max_questions * request.ask_timeout_seconds
            + BACKSTOP_SLACK_SECONDS
        )
        try:
            await self._client.start_workflow(
                AgentLoopWorkflow.run,
                AgentLoopInput(request=request),
                id=job_id,
                task_queue=task_queue or self._fixed_queue or TASK_QUEUES[request.mode],
                # A retried request with the same key joins the running job; once it has
                # closed, the key is spent and the start is rejected (caught below).
                id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
                id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
                execution_timeout=timedelta(seconds=backstop),
                search_attributes=TypedSearchAttributes(
                    [
                        SearchAttributePair(KEEL_TENANT, request.tenant),
                        SearchAttributePair(KEEL_USER, request.user),
                        SearchAttributePair(KEEL_STATE, "running"),
                        SearchAttributePair(KEEL_MODE, request.mode),
                    ]
                ),
                static_summary=_summary(request.goal),
                static_details=_details(request),
            )
        except WorkflowAlreadyStartedError:
            return job_id
        except RPCError as err:
            raise self._rpc_error(err) from None
        return job_id

    async def status(self, job_id: str) -> JobStatus:
        """Ask the job for a snapshot of its state (a query; served by a worker).

        Args:
            job_id: The job to ask.

        Returns:
            State, iteration, budget and usage, pending question and recent events.

        Raises:
            JobNotFound: If no job has this ID.
            AgentJobError: If no worker answered in time or the query failed.
        """
        try:
            return await self._handle(job_id).query(
                AgentLoopWorkflow.get_status, rpc_timeout=QUERY_TIMEOUT
            )
        except WorkflowQueryFailedError as err:
            raise AgentJobError(f"status query for job {job_id} failed: {err.message}") from None
        except RPCTimeoutOrCancelledError:
            raise self._no_worker(job_id, "status query") from None
        except RPCError as err:
            raise self._rpc_error(err, job_id, "status query") from None

    async def send_input(self, job_id: str, answer: HumanInput | str) -> str:
        """Answer the job's pending question and wait for the job to acknowledge it (an update).

        Args:
            job_id: The job that asked.
            answer: The answer, as text or a ``HumanInput``.

        Returns:
            The job's acknowledgement.

        Raises:
            InvalidJobRequest: If the answer is blank or too long (``field="text"``).
            InputRejected: If no question is pending or the job has ended.
            JobNotFound: If no job has this ID.
        """
        inp = _human_input(answer)
        try:
            return await self._handle(job_id).execute_update(AgentLoopWorkflow.answer, inp)
        except WorkflowUpdateFailedError as err:
            raise InputRejected(job_id, _failure_message(err.cause)) from None
        except RPCTimeoutOrCancelledError:
            raise self._no_worker(job_id, "answer") from None
        except RPCError as err:
            raise await self._closed_or_missing(err, job_id) from None

    async def signal_input(self, job_id: str, answer: HumanInput | str) -> None:
        """Send an answer without waiting for it to be used (a signal).

        The job ignores the answer if no question is pending; use ``send_input`` to find out.

        Args:
            job_id: The job that asked.
            answer: The answer, as text or a ``HumanInput``.

        Raises:
            InvalidJobRequest: If the answer is blank or too long (``field="text"``).
            InputRejected: If the job has ended.
            JobNotFound: If no job has this ID.
        """
        inp = _human_input(answer)
        try:
            await self._handle(job_id).signal(AgentLoopWorkflow.answer_signal, inp)
        except RPCError as err:
            raise await self._closed_or_missing(err, job_id) from None

    async def cancel(self, job_id: str) -> None:
        """Ask the job to stop; it finishes with ``outcome="cancelled"`` and its best answer.

        Cancelling a job that has already ended does nothing.

        Args:
            job_id: The job to cancel.

        Raises:
            JobNotFound: If no job has this ID.
        """
        try:
            await self._handle(job_id).cancel()
        except RPCError as err:
            mapped = await self._closed_or_missing(err, job_id)
            if not isinstance(mapped, InputRejected):
                raise mapped from None

    async def result(self, job_id: str, *, timeout: float | None = None) -> JobResult:
        """Wait for the job to end and return how it ended.

        Args:
            job_id: The job to wait for.
            timeout: Seconds to wait at most; ``None`` waits as long as the job runs.

        Returns:
            The outcome: completed, budget exhausted or cancelled, with the (best) answer.

        Raises:
            JobFailed: If the job failed; ``cause_type`` says why.
            JobTimeout: If ``timeout`` passed first; the job keeps running.
            JobNotFound: If no job has this ID.
        """
        handle = self._handle(job_id)
        try:
            if timeout is not None:
                await self._wait_closed(handle, job_id, timeout)
            return await handle.result()
        except WorkflowFailureError as err:
            raise JobFailed(job_id, *_cause(err.cause)) from None
        except RPCError as err:
            raise self._rpc_error(err, job_id, "result") from None

    async def wait_terminal(self, job_id: str, *, poll: float = 0.5) -> AsyncIterator[JobStatus]:
        """Yield status snapshots until the job reaches a terminal state.

        A query can race the workflow's completion, or a closed run may no longer answer;
        then the execution's own status decides the final state of the last snapshot.

        Args:
            job_id: The job to follow.
            poll: Seconds between queries.

        Yields:
            Snapshots; the last one's ``state`` is in ``TERMINAL_STATES``.

        Raises:
            JobNotFound: If no job has this ID.
            AgentJobError: If the job is running but its status cannot be read.
        """
        last: JobStatus | None = None
        check_every = max(1, round(2.0 / poll)) if poll > 0 else 1
        for polls in itertools.count(1):
            try:
                last = await self.status(job_id)
            except JobNotFound:
                raise
            except AgentJobError:
                closed = await self._closed_state(job_id)
                if closed is None or last is None:
                    raise
                yield last.model_copy(update={"state": closed})
                return
            if last.state in TERMINAL_STATES:
                yield last
                return
            # An operator may terminate a run, whose replayed state then never turns terminal.
            if polls % check_every == 0 and (closed := await self._closed_state(job_id)):
                yield last.model_copy(update={"state": closed})
                return
            yield last
            await asyncio.sleep(poll)

    async def list(
        self, *, tenant: str | None = None, state: str | None = None, limit: int = 50
    ) -> builtins.list[JobSummary]:
        """List jobs from Temporal visibility, most recent first.

        Args:
            tenant: Only this tenant's jobs.
            state: Only jobs whose ``KeelState`` is this job state.
            limit: At most this many rows.

        Returns:
            One summary per job.

        Raises:
            InvalidJobRequest: If ``tenant``, ``state`` or ``limit`` is malformed.
        """
        if limit < 1:
            raise InvalidJobRequest("limit", "must be at least 1")
        query = list_query(tenant=tenant, state=state)
        try:
            return [
                _summarise(execution)
                async for execution in self._client.list_workflows(query, limit=limit)
            ]
        except RPCError as err:
            raise self._rpc_error(err, None, "list") from None

    def _handle(self, job_id: str) -> WorkflowHandle[AgentLoopWorkflow, JobResult]:
        return self._client.get_workflow_handle_for(AgentLoopWorkflow.run, job_id)

    async def _wait_closed(
        self, handle: WorkflowHandle[AgentLoopWorkflow, JobResult], job_id: str, timeout: float
    ) -> None:
        """Poll ``describe`` until the execution closes or ``timeout`` passes.

        ``asyncio.wait_for(handle.result(), timeout)`` would cancel the SDK's in-flight history
        long poll, which can leave the process hanging at exit (seen with temporalio 1.35), and
        ``rpc_timeout`` does not bound that long poll on recent servers
        (temporalio/temporal#8970). Short describe calls plus a sleep have neither problem.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            desc = await handle.describe()
            if desc.status is not None and desc.status != WorkflowExecutionStatus.RUNNING:
                return
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise JobTimeout(job_id, timeout)
            await asyncio.sleep(min(RESULT_POLL_SECONDS, remaining))

    async def _closed_state(self, job_id: str) -> JobState | None:
        """The final job state if the execution has closed, else ``None``."""
        try:
            desc = await self._handle(job_id).describe()
        except RPCError as err:
            raise self._rpc_error(err, job_id, "describe") from None
        if desc.status is None or desc.status not in _EXECUTION_STATE:
            return None
        outcome = _job_state(desc.typed_search_attributes.get(KEEL_OUTCOME))
        if desc.status == WorkflowExecutionStatus.COMPLETED and outcome in TERMINAL_STATES:
            return outcome
        return _EXECUTION_STATE[desc.status]

    async def _closed_or_missing(self, err: RPCError, job_id: str) -> AgentJobError:
        """Tell "no such job" from "job has ended"; the server says NOT_FOUND for both."""
        if err.status != RPCStatusCode.NOT_FOUND:
            return self._rpc_error(err, job_id)
        try:
            closed = await self._closed_state(job_id)
        except JobNotFound as missing:
            return missing
        if closed is None:
            return self._rpc_error(err, job_id)
        return InputRejected(job_id, f"the job has already ended ({closed})")

    def _rpc_error(
        self, err: RPCError, job_id: str | None = None, what: str = "request"
    ) -> AgentJobError:
        if err.status == RPCStatusCode.NOT_FOUND and job_id is not None:
            return JobNotFound(job_id)
        if err.status == RPCStatusCode.UNAVAILABLE:
            return ConnectionFailed(self._address(), err.message)
        if err.status in (RPCStatusCode.DEADLINE_EXCEEDED, RPCStatusCode.CANCELLED):
            return self._no_worker(job_id, what)
        hint = ""
        if "search attribute" in err.message.lower():
            hint = "; Keel's search attributes are not registered (`keel dev` registers them)"
        return AgentJobError(
            f"Temporal refused the {what} ({err.status.name}): {err.message}{hint}"
        )

    def _no_worker(self, job_id: str | None, what: str) -> AgentJobError:
        target = f" for job {job_id}" if job_id else ""
        return AgentJobError(
            f"{what}{target} timed out; is a Keel worker polling task queue {self.task_queue!r}?"
        )

    def _address(self) -> str:
        return self._client.service_client.config.target_host


def _summary(goal: str) -> str:
    line = " ".join(goal.split())
    return line if len(line) <= SUMMARY_CHARS else line[: SUMMARY_CHARS - 1] + "…"


def _details(req: JobRequest) -> str:
    """Markdown for the Temporal UI: who asked and within which limits. Holds no secrets."""
    b = req.budget
    return "\n".join(
        [
            f"**Tenant:** `{req.tenant}` · **User:** `{req.user}`",
            f"**Tools:** {', '.join(f'`{t}`' for t in req.tools) or 'none'}",
            f"**Documents:** {'yes' if req.docs_dir else 'no'}",
            f"**Budget:** {b.max_steps} steps · {b.max_tool_calls} tool calls · "
            f"{b.max_tokens:,} tokens · ${b.max_cost_usd:g} · {b.max_seconds:g}s · "
            f"{b.max_iterations} iterations · {b.max_questions} questions",
        ]
    )


def _human_input(answer: HumanInput | str) -> HumanInput:
    if isinstance(answer, HumanInput):
        return answer
    try:
        return HumanInput(text=answer)
    except ValidationError as err:
        raise InvalidJobRequest.from_validation_error(err) from None


def _failure_message(err: BaseException) -> str:
    return err.message if isinstance(err, FailureError) else str(err)


def _cause(err: BaseException) -> tuple[str, str]:
    """``(cause_type, message)`` of a workflow failure, from its innermost ApplicationError."""
    chain: builtins.list[BaseException] = []
    current: BaseException | None = err
    while current is not None and len(chain) < 20:
        chain.append(current)
        current = current.__cause__
    for failure in reversed(chain):
        if isinstance(failure, ApplicationError) and failure.type:
            return failure.type, failure.message
    kinds: builtins.list[tuple[type[BaseException], str]] = [
        (CancelledError, "Cancelled"),
        (TerminatedError, "Terminated"),
        (TemporalTimeoutError, "TimedOut"),
    ]
    for kind, name in kinds:
        if isinstance(err, kind):
            return name, _failure_message(err)
    return type(err).__name__, _failure_message(err)


def _job_state(value: str | None) -> JobState | None:
    """A search-attribute value as a JobState; None for a value this build does not know."""
    return cast(JobState, value) if value in _JOB_STATES else None


def _summarise(execution: WorkflowExecution) -> JobSummary:
    attrs = execution.typed_search_attributes
    return JobSummary(
        job_id=execution.id,
        state=_job_state(attrs.get(KEEL_STATE)),
        outcome=attrs.get(KEEL_OUTCOME),
        tenant=attrs.get(KEEL_TENANT),
        user=attrs.get(KEEL_USER),
        temporal_status=execution.status.name if execution.status else "UNKNOWN",
        started_at=execution.start_time,
        cost_usd=attrs.get(KEEL_COST_USD),
        tokens=attrs.get(KEEL_TOKENS),
    )
