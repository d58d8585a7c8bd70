"""``AgentJobs``: the typed façade callers use to start, inspect, answer and collect agent jobs.

A job is one ``AgentLoopWorkflow`` execution whose workflow ID is the job ID,
``agent-job-{tenant}:{request_key}``. Starting is idempotent on the request key within a
tenant: the same tenant and key always
names the same job, whether it is still running or has long ended. Requests are validated
before anything is started (``client._validation``), so a malformed job fails fast with the
field that is wrong.

Every Temporal exception is mapped onto ``client.errors`` (``client._error_mapping``); callers
never catch SDK types. The start options live in ``client._starting``; listing reads visibility
(``client._listing``) and a closed job's final state comes from ``describe``
(``client._execution_state``), so neither needs a worker. Waiting for a job to end is the
server's history long poll (``client._long_poll``), never a ``describe`` loop.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Mapping
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any
from uuid import uuid4

from temporalio.client import (
    Client,
    RPCTimeoutOrCancelledError,
    WorkflowFailureError,
    WorkflowHandle,
    WorkflowQueryFailedError,
    WorkflowUpdateFailedError,
)
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from keel.activities.corpora import corpus_name
from keel.client._error_mapping import (
    failed_result,
    failure_cause,
    failure_message,
    no_worker,
    rpc_error,
)
from keel.client._execution_state import describe_closed_state
from keel.client._listing import JobSummary, list_page, list_summaries
from keel.client._long_poll import wait_closed
from keel.client._starting import start_options
from keel.client._validation import human_input, validate_request, validate_request_key
from keel.client.errors import (
    AgentJobError,
    InputRejected,
    InvalidJobRequest,
    JobFailed,
    JobNotFound,
)
from keel.workflows import TASK_QUEUE, TASK_QUEUES
from keel.workflows.contract import AgentLoop
from keel.workflows.types import (
    TERMINAL_STATES,
    AgentLoopInput,
    HumanInput,
    JobRequest,
    JobResult,
    JobState,
    JobStatus,
    WriteDecision,
    job_id_for,
    tenant_of,
)

if TYPE_CHECKING:
    from keel.activities.redis_client import KeelRedis
    from keel.client._events import EventCursor, JobStreamEvent

__all__ = ["AgentJobs"]

QUERY_TIMEOUT = timedelta(seconds=10)
"""A status query waits for a worker; without one it would hang, so give up and say why."""


class AgentJobs:
    """Start and drive agent jobs through an injected Temporal client.

    Args:
        client: A connected client using the pydantic data converter (see
            ``client.connect``). Never created here, so tests and servers share one.
        task_queue: Queue the workers for ``AgentLoopWorkflow`` listen on.
        tenant: Scope every call to this tenant: jobs start as its jobs, another tenant's job
            is ``JobNotFound`` (never "forbidden", which would confirm it exists), and lists
            show only its jobs. ``None`` (operators, trusted services) sees every tenant.
        fairness_weights: Each tenant's weight in Temporal's fairness (default 1.0 each).
    """

    def __init__(
        self,
        client: Client,
        *,
        task_queue: str | None = None,
        tenant: str | None = None,
        fairness_weights: Mapping[str, float] | None = None,
    ) -> None:
        self._client = client
        self._weights = dict(fairness_weights or {})
        self.tenant = tenant
        """The tenant every call is scoped to, or None for all tenants."""
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
        job_slot: bool = False,
        compress: bool = True,
    ) -> str:
        """Validate a request and start its job, or find the job this key already started.

        Args:
            req: The job to run, as a model or a mapping.
            request_key: Idempotency key; the job ID is ``agent-job-{tenant}:{request_key}``.
                Sending the same key for the same tenant again returns the same job ID and
                starts nothing, even after that job has ended. Defaults to a fresh random key.
            task_queue: Overrides the façade's task queue for this job.
            job_slot: Hold a running-job slot for the job's life, waiting in line when its
                tenant's or user's concurrency limit is full (the HTTP API sets it when a
                limit covers the job; ``keel limits concurrency``).
            compress: Fold older observations into a rolling summary as they grow (the
                default); False keeps the last few and drops the rest (``keel bench cost``
                measures what compression saves with it).

        Returns:
            The job ID.

        Raises:
            InvalidJobRequest: If the request or key is malformed; nothing was started.
            ConnectionFailed: If the Temporal server cannot be reached.
            AgentJobError: If the server refused the start for another reason.
        """
        request = validate_request(req, tenant=self.tenant)
        if self.tenant is not None and request.docs_dir and not corpus_name(request.docs_dir):
            # A folder path reads the worker's disk: only operators may name one.
            raise InvalidJobRequest("docs_dir", "name a corpus (corpus:NAME), not a folder")
        if self.tenant is not None and request.notify_workflow is not None:
            # A tenant may have Keel signal only its own jobs, never another workflow.
            if tenant_of(request.notify_workflow) != self.tenant:
                raise InvalidJobRequest(
                    "notify_workflow", f"must be one of tenant {self.tenant}'s jobs"
                )
        key = uuid4().hex if request_key is None else request_key
        job_id = job_id_for(request.tenant, validate_request_key(key))
        try:
            await self._client.start_workflow(
                AgentLoop.run,
                AgentLoopInput(request=request, job_slot=job_slot, compress=compress),
                id=job_id,
                task_queue=task_queue or self._fixed_queue or TASK_QUEUES[request.mode],
                **start_options(request, self._weights.get(request.tenant)),
            )
        except WorkflowAlreadyStartedError:
            # The key's job has closed and the key is spent: it still names that job.
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
        self._own(job_id)
        try:
            snap = await self._handle(job_id).query(AgentLoop.get_status, rpc_timeout=QUERY_TIMEOUT)
        except WorkflowQueryFailedError as err:
            raise AgentJobError(f"status query for job {job_id} failed: {err.message}") from None
        except RPCTimeoutOrCancelledError:
            raise no_worker(job_id, "status query", self.task_queue) from None
        except RPCError as err:
            raise self._rpc_error(err, job_id, "status query") from None
        if self.tenant is not None and snap.tenant != self.tenant:
            raise JobNotFound(job_id)  # the job's own record disagrees with its ID
        return snap

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
        inp = human_input(answer)
        self._own(job_id)
        try:
            return await self._handle(job_id).execute_update(AgentLoop.answer, inp)
        except WorkflowUpdateFailedError as err:
            raise InputRejected(job_id, failure_message(err.cause)) from None
        except RPCTimeoutOrCancelledError:
            raise no_worker(job_id, "answer", self.task_queue) from None
        except RPCError as err:
            raise await self._closed_or_missing(err, job_id) from None

    async def decide_write(
        self, job_id: str, write_id: str, *, approve: bool, reason: str = ""
    ) -> str:
        """Approve or reject a write that requires approval, and wait for the acknowledgement.

        An approved write commits once the job's answer is verified; a rejected one is never
        made. ``status(job_id).writes`` lists the writes and their IDs.

        Args:
            job_id: The job that previewed the write.
            write_id: The write's ID (``JobWrite.id``).
            approve: True to approve, False to reject.
            reason: Why, kept with the write.

        Returns:
            The job's acknowledgement.

        Raises:
            InputRejected: If no such write awaits a decision or the job has ended.
            JobNotFound: If no job has this ID.
        """
        inp = WriteDecision(write_id=write_id, reason=reason)
        self._own(job_id)
        update = AgentLoop.approve if approve else AgentLoop.reject
        try:
            return await self._handle(job_id).execute_update(update, inp)
        except WorkflowUpdateFailedError as err:
            raise InputRejected(job_id, failure_message(err.cause)) from None
        except RPCTimeoutOrCancelledError:
            raise no_worker(job_id, "approve" if approve else "reject", self.task_queue) from None
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
        inp = human_input(answer)
        self._own(job_id)
        try:
            await self._handle(job_id).signal(AgentLoop.answer_signal, inp)
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
        self._own(job_id)
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
        self._own(job_id)
        handle = self._handle(job_id)
        try:
            if timeout is not None:
                # The server's history long poll, bounded by the deadline and never cancelled
                # (``client._long_poll``); then the closed run's result, read at once.
                run_id = await wait_closed(self._client, job_id, timeout)
                handle = self._client.get_workflow_handle_for(
                    AgentLoop.run, job_id, run_id=run_id or None
                )
            return await handle.result()
        except WorkflowFailureError as err:
            cause = err.cause
            raise JobFailed(job_id, *failure_cause(cause), failed_result(cause)) from None
        except RPCError as err:
            raise self._rpc_error(err, job_id, "result") from None

    async def final_result(self, job_id: str, *, timeout: float | None = None) -> JobResult:
        """How the job ended, a failed job's result included (it carries its error).

        Raises:
            JobFailed: If the job failed without a result (failed before it ran).
            JobTimeout: If ``timeout`` passed first; the job keeps running.
            JobNotFound: If no job has this ID.
        """
        try:
            return await self.result(job_id, timeout=timeout)
        except JobFailed as failed:
            if failed.result is None:
                raise
            return failed.result

    async def events(
        self,
        job_id: str,
        *,
        after: EventCursor | None = None,
        tokens: KeelRedis | None = None,
    ) -> AsyncIterator[JobStreamEvent]:
        """The job's event stream: progress, answer tokens, then its result.

        Checks the job first, so a missing or foreign job fails here, not mid-stream.

        Args:
            job_id: The job to follow.
            after: Resume after this cursor (the ``id`` of the last event seen).
            tokens: Redis holding the answer tokens (the workers' ``REDIS_URL``); without
                it the stream carries progress and the result only.

        Returns:
            An iterator of events that ends after the ``end`` event.

        Raises:
            JobNotFound: If no job has this ID, or it is another tenant's.
        """
        from keel.client._events import EventCursor, job_events

        self._own(job_id)
        await self._closed_state(job_id)  # NOT_FOUND becomes JobNotFound
        return job_events(
            self._client,
            job_id,
            after or EventCursor(),
            tokens,
            lambda: self.final_result(job_id),
        )

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

    async def list_jobs(
        self, *, tenant: str | None = None, state: str | None = None, limit: int = 50
    ) -> list[JobSummary]:
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
        if self.tenant is not None:
            if tenant not in (None, self.tenant):
                return []  # another tenant's jobs are not there, as far as this caller knows
            tenant = self.tenant
        try:
            return await list_summaries(self._client, tenant=tenant, state=state, limit=limit)
        except RPCError as err:
            raise self._rpc_error(err, None, "list") from None

    async def list_page(
        self,
        *,
        tenant: str | None = None,
        state: str | None = None,
        since: datetime | None = None,
        limit: int = 50,
        page_token: bytes | None = None,
    ) -> tuple[list[JobSummary], bytes | None]:
        """One page of jobs from Temporal visibility, most recent first, and the next token.

        Args:
            tenant: Only this tenant's jobs.
            state: Only jobs whose ``KeelState`` is this job state.
            since: Only jobs started at or after this time (naive: UTC).
            limit: At most this many rows.
            page_token: The token the previous page returned, to continue the listing.

        Returns:
            The rows and the next page's token (None when there is no next page).

        Raises:
            InvalidJobRequest: If a filter, ``limit`` or ``page_token`` is malformed.
        """
        if self.tenant is not None:
            if tenant not in (None, self.tenant):
                return [], None  # another tenant's jobs are not there, as far as this caller knows
            tenant = self.tenant
        try:
            return await list_page(
                self._client,
                tenant=tenant,
                state=state,
                since=since,
                limit=limit,
                page_token=page_token,
            )
        except RPCError as err:
            raise self._rpc_error(err, None, "list") from None

    def _own(self, job_id: str) -> None:
        """Refuse, as not found, a job outside this client's tenant (checked before any call).

        Raises:
            JobNotFound: If the client is scoped and the ID names another tenant's job.
        """
        if self.tenant is not None and tenant_of(job_id) != self.tenant:
            raise JobNotFound(job_id)

    def _handle(self, job_id: str) -> WorkflowHandle[AgentLoop, JobResult]:
        return self._client.get_workflow_handle_for(AgentLoop.run, job_id)

    async def _closed_state(self, job_id: str) -> JobState | None:
        """The final job state if the execution has closed, else ``None``."""
        try:
            return await describe_closed_state(self._handle(job_id))
        except RPCError as err:
            raise self._rpc_error(err, job_id, "describe") from None

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
        address = self._client.service_client.config.target_host
        return rpc_error(err, address=address, task_queue=self.task_queue, job_id=job_id, what=what)
