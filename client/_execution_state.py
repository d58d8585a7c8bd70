"""A job's execution as the Temporal server alone describes it: running, or closed and how.

Owns the ``describe`` calls the façade makes when a worker cannot answer (a closed run no longer
serves queries), and reading a closed execution's status and ``KeelOutcome`` back into a final
``JobState``. Waiting for a job to close is not here: it is the server's history long poll
(``client._long_poll``), which costs the server far less than a ``describe`` loop.
"""

from __future__ import annotations

from typing import Any

from temporalio.client import WorkflowExecutionStatus, WorkflowHandle

from keel.client._listing import job_state
from keel.workflows.search_attributes import KEEL_OUTCOME
from keel.workflows.types import TERMINAL_STATES, JobState

__all__ = ["closed_state", "describe_closed_state"]

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
