"""Temporal's exceptions, mapped onto ``keel.client.errors``; callers never catch SDK types.

Owns the translation only: an ``RPCError`` by its status code, a workflow failure by the
``ApplicationError.type`` at the root of its cause chain. Deciding *when* to ask the server more
(is a job missing, or has it ended?) stays with the façade, ``client.jobs.AgentJobs``.
"""

from __future__ import annotations

from pydantic import ValidationError
from temporalio.exceptions import (
    ApplicationError,
    CancelledError,
    FailureError,
    TerminatedError,
)
from temporalio.exceptions import (
    TimeoutError as TemporalTimeoutError,
)
from temporalio.service import RPCError, RPCStatusCode

from keel.client.errors import AgentJobError, ConnectionFailed, JobNotFound
from keel.workflows.types import JobResult

__all__ = ["failure_cause", "failure_message", "no_worker", "rpc_error"]

MAX_CAUSE_DEPTH = 20
"""Causes followed down a failure chain at most; real chains are two or three deep."""

_ENDED_BY_TEMPORAL: tuple[tuple[type[BaseException], str], ...] = (
    (CancelledError, "Cancelled"),
    (TerminatedError, "Terminated"),
    (TemporalTimeoutError, "TimedOut"),
)
"""``cause_type`` of a job Temporal ended before the workflow could report an outcome."""


def rpc_error(
    err: RPCError,
    *,
    address: str,
    task_queue: str,
    job_id: str | None = None,
    what: str = "request",
) -> AgentJobError:
    """The client error for a failed call to the Temporal server.

    Args:
        err: What the SDK raised.
        address: The server's ``host:port``, for ``ConnectionFailed``.
        task_queue: The queue a worker should poll, named when none answered.
        job_id: The job the call was about; ``NOT_FOUND`` then means ``JobNotFound``.
        what: The call, for the message ("status query", "result", "list").

    Returns:
        ``JobNotFound``, ``ConnectionFailed``, or an ``AgentJobError`` saying what the server
        refused (and, for an unregistered search attribute, how to fix it).
    """
    if err.status == RPCStatusCode.NOT_FOUND and job_id is not None:
        return JobNotFound(job_id)
    if err.status == RPCStatusCode.UNAVAILABLE:
        return ConnectionFailed(address, err.message)
    if err.status in (RPCStatusCode.DEADLINE_EXCEEDED, RPCStatusCode.CANCELLED):
        return no_worker(job_id, what, task_queue)
    hint = ""
    if "search attribute" in err.message.lower():
        hint = "; Keel's search attributes are not registered (`keel dev` registers them)"
    return AgentJobError(f"Temporal refused the {what} ({err.status.name}): {err.message}{hint}")


def no_worker(job_id: str | None, what: str, task_queue: str) -> AgentJobError:
    """The error for a call only a worker can answer, when none answered in time.

    Args:
        job_id: The job the call was about, if any.
        what: The call, for the message.
        task_queue: The queue a worker should poll.

    Returns:
        An ``AgentJobError`` that names the task queue to check.
    """
    target = f" for job {job_id}" if job_id else ""
    return AgentJobError(
        f"{what}{target} timed out; is a Keel worker polling task queue {task_queue!r}?"
    )


def failure_message(err: BaseException) -> str:
    """A failure's own message, without the SDK's decoration.

    Args:
        err: A Temporal failure or any exception.

    Returns:
        ``FailureError.message``, or ``str(err)`` for anything else.
    """
    return err.message if isinstance(err, FailureError) else str(err)


def failed_result(err: BaseException) -> JobResult | None:
    """The ``JobResult`` a failed workflow attached to its ``ApplicationError``, if any.

    Args:
        err: The ``cause`` of a ``WorkflowFailureError``.
    """
    if not isinstance(err, ApplicationError) or not err.details:
        return None
    try:
        return JobResult.model_validate(err.details[0])
    except ValidationError:
        return None


def failure_cause(err: BaseException) -> tuple[str, str]:
    """``(cause_type, message)`` of a workflow failure, from its innermost ApplicationError.

    Args:
        err: The ``cause`` of a ``WorkflowFailureError``.

    Returns:
        The type and message of the innermost typed ``ApplicationError``; else ``Cancelled``,
        ``Terminated`` or ``TimedOut`` when Temporal ended the job; else the exception's class.
    """
    chain: list[BaseException] = []
    current: BaseException | None = err
    while current is not None and len(chain) < MAX_CAUSE_DEPTH:
        chain.append(current)
        current = current.__cause__
    for failure in reversed(chain):
        if isinstance(failure, ApplicationError) and failure.type:
            return failure.type, failure.message
    for kind, name in _ENDED_BY_TEMPORAL:
        if isinstance(err, kind):
            return name, failure_message(err)
    return type(err).__name__, failure_message(err)
