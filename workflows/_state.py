"""Views of a job's LoopState (status, UI details, partial answers, events) and run control.

Deterministic: functions of their arguments only; times come in from ``workflow.now()``.
"""

from __future__ import annotations

import asyncio
from datetime import datetime

from temporalio import workflow
from temporalio.exceptions import ActivityError, CancelledError

from keel.workflows.budget_text import budget_text
from keel.workflows.types import (
    JobEvent,
    JobRequest,
    JobStatus,
    JobUsage,
    LoopState,
)

MAX_EVENTS = 20
"""Recent events kept in state for ``keel status`` and ``keel watch``."""
HISTORY_BYTES_LIMIT = 1_000_000
"""Continue as new past this history size: far under Temporal's 50 MB limit and the 2 MB a
run of a Keel job is allowed to reach, so replays and worker cache stay cheap."""
HISTORY_EVENTS_LIMIT = 4_000


class JobFailure(Exception):
    """Control flow inside the workflow: the job cannot go on. Becomes an ApplicationError."""

    def __init__(self, error_type: str, message: str) -> None:
        super().__init__(message)
        self.error_type = error_type


CANCEL_IS_AN_OUTCOME = "cancel-is-an-outcome"
"""Patch ID: a job cancelled while an activity runs ends ``cancelled`` (issue 13). Before it,
the activity's cancellation was read as a failed call and the job ended ``failed``."""


def raise_if_cancelled(err: ActivityError) -> None:
    """Re-raise an activity's cancellation as the job's own, so the job ends ``cancelled``.

    When a job is cancelled, Temporal cancels its running activities, and awaiting one raises
    ``ActivityError`` caused by ``CancelledError``: a cancellation, not a failed call.

    Raises:
        asyncio.CancelledError: If ``err`` is the activity's cancellation (on histories that
            have this patch; older ones replay as they ran).
    """
    if isinstance(err.cause, CancelledError) and workflow.patched(CANCEL_IS_AN_OUTCOME):
        raise asyncio.CancelledError from None


def history_is_long() -> bool:
    """True when this run should continue as new (call from workflow code only)."""
    info = workflow.info()
    return (
        info.is_continue_as_new_suggested()
        or info.get_current_history_size() > HISTORY_BYTES_LIMIT
        or info.get_current_history_length() > HISTORY_EVENTS_LIMIT
    )


def add_event(state: LoopState, at: datetime, kind: str, detail: str = "") -> None:
    """Append an event, keeping the last MAX_EVENTS."""
    state.events = [*state.events, JobEvent(at=at, kind=kind, detail=detail)][-MAX_EVENTS:]


def status_of(job_id: str, req: JobRequest, state: LoopState) -> JobStatus:
    """The snapshot the ``get_status`` query returns."""
    return JobStatus(
        job_id=job_id,
        state=state.state,
        tenant=req.tenant,
        goal=req.goal,
        iteration=state.iteration,
        budget=req.budget,
        usage=JobUsage.of(state.counters),
        pending_question=state.pending_question,
        events=list(state.events),
        runs=state.runs,
    )


def details_markdown(req: JobRequest, state: LoopState) -> str:
    """Current details for the Temporal UI: phase, then iteration and budget use."""
    usage = JobUsage.of(state.counters)
    return f"**{state.state}**\n\n{budget_text(req.budget, usage, state.iteration)}"


def observation_summary(state: LoopState) -> str | None:
    """A partial answer built from what the job observed, when no draft exists."""
    good = [o for o in state.observations if o.ok]
    if not good:
        return None
    lines = [f"[{o.name}] {o.content[:200]}" for o in good[-5:]]
    return "No verified answer yet. Observations so far:\n" + "\n".join(lines)
