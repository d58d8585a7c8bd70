"""A job's execution as the Temporal server alone describes it: running, or closed and how.

Owns the ``describe`` calls the façade makes when a worker cannot answer (a closed run no longer
serves queries) or must not be waited on (``result`` with a timeout), and reading a closed
execution's status and ``KeelOutcome`` back into a final ``JobState``.
"""

from __future__ import annotations

import asyncio
from typing import Any

from temporalio.client import WorkflowExecutionStatus, WorkflowHandle

from keel.client._listing import job_state
from keel.client.errors import JobTimeout
from keel.workflows.search_attributes import KEEL_OUTCOME
from keel.workflows.types import TERMINAL_STATES, JobState

__all__ = ["RESULT_POLL_SECONDS", "closed_state", "describe_closed_state", "wait_closed"]

RESULT_POLL_SECONDS = 0.5
"""How often ``wait_closed`` checks whether the job has closed."""

_EXECUTION_STATE: dict[WorkflowExecutionStatus, JobState] = {
    WorkflowExecutionStatus.FAILED: "failed",
    WorkflowExecutionStatus.TERMINATED: "failed",
    WorkflowExecutionStatus.TIMED_OUT: "failed",
    WorkflowExecutionStatus.CANCELED: "cancelled",
    WorkflowExecutionStatus.COMPLETED: "completed",
}
"""Job state implied by a closed execution when its own status query is unavailable."""


def closed_state(status: WorkflowExecutionStatus | None, outcome: str | None) -> JobState | None:
    """The final state of a job whose execution has closed.

    Args:
        status: The execution's status, from ``describe``.
        outcome: Its ``KeelOutcome`` search attribute, set when the workflow returned.

    Returns:
        The outcome the workflow reported if it completed with one, else the state its
        execution status implies; None while the execution is still running.
    """
    if status is None or status not in _EXECUTION_STATE:
        return None
    reported = job_state(outcome)
    if status == WorkflowExecutionStatus.COMPLETED and reported in TERMINAL_STATES:
        return reported
    return _EXECUTION_STATE[status]


async def describe_closed_state(handle: WorkflowHandle[Any, Any]) -> JobState | None:
    """Describe the execution and return its final state if it has closed.

    Args:
        handle: The job's workflow handle.

    Returns:
        As ``closed_state``.

    Raises:
        RPCError: If the server refused the describe (the façade maps it).
    """
    desc = await handle.describe()
    return closed_state(desc.status, desc.typed_search_attributes.get(KEEL_OUTCOME))


async def wait_closed(handle: WorkflowHandle[Any, Any], job_id: str, timeout: float) -> None:
    """Poll ``describe`` until the execution closes or ``timeout`` passes.

    ``asyncio.wait_for(handle.result(), timeout)`` would cancel the SDK's in-flight history
    long poll, which can leave the process hanging at exit (seen with temporalio 1.35), and
    ``rpc_timeout`` does not bound that long poll on recent servers
    (temporalio/temporal#8970). Short describe calls plus a sleep have neither problem.

    Args:
        handle: The job's workflow handle.
        job_id: The job, for the error.
        timeout: Seconds to wait at most.

    Raises:
        JobTimeout: If the execution is still running after ``timeout`` seconds.
        RPCError: If the server refused a describe (the façade maps it).
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
