"""Views of a job's LoopState (status, UI details, partial answers, events) and run control.

Deterministic: functions of their arguments only; times come in from ``workflow.now()``.
"""

from __future__ import annotations

import asyncio
import math
from datetime import datetime

from temporalio import workflow
from temporalio.exceptions import ActivityError, CancelledError

from keel.activities.types import ref_belongs_to
from keel.workflows.budget_text import budget_text
from keel.workflows.types import (
    MAX_DEGRADED,
    WRITE_OPEN,
    BudgetName,
    JobEvent,
    JobRequest,
    JobResult,
    JobStatus,
    JobUsage,
    LoopState,
    Outcome,
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


def raise_if_cancelled(err: ActivityError) -> None:
    """Re-raise an activity's cancellation as the job's own, so the job ends ``cancelled``.

    When a job is cancelled, Temporal cancels its running activities, and awaiting one raises
    ``ActivityError`` caused by ``CancelledError``: a cancellation, not a failed call.

    Raises:
        asyncio.CancelledError: If ``err`` is the activity's cancellation.
    """
    if isinstance(err.cause, CancelledError):
        raise asyncio.CancelledError from None


WAIT_SLACK_SECONDS = 1.0
"""Float noise allowed when the waits a job summed are compared with the time it has run."""


def carried_state_problem(state: LoopState, req: JobRequest, job_id: str, now: datetime) -> str:
    """Why a run must refuse the state it was started with; empty when Keel could have written it.

    Continue-as-new hands ``LoopState`` to the next run, and so can anyone who starts the
    workflow directly (issue 13). Budgets subtract the counters from the limits, so a negative
    counter, a start in the future or a wait longer than the job has run adds budget back;
    and a ref to another job's or tenant's stored output would put that output in this job's
    prompts. Deterministic: a function of its arguments, ``now`` being ``workflow.now()``.

    Args:
        state: The carried state.
        req: The job's request (its tenant owns every ref).
        job_id: The workflow ID, which continue-as-new keeps.
        now: The current workflow time.

    Returns:
        The first problem found, for the failure message; ``""`` when there is none.
    """
    c = state.counters
    counts: dict[str, float] = {
        "iteration": state.iteration,
        "invalid_outputs": state.invalid_outputs,
        "counters.steps": c.steps,
        "counters.tool_calls": c.tool_calls,
        "counters.questions": c.questions,
        "counters.waited_seconds": c.waited_seconds,
        "counters.usage.prompt_tokens": c.usage.prompt_tokens,
        "counters.usage.completion_tokens": c.usage.completion_tokens,
        "counters.usage.cost_usd": c.usage.cost_usd,
    } | {f"counters.retries_by_tool[{k[:64]!r}]": v for k, v in c.retries_by_tool.items()}
    for name, value in counts.items():
        if not (math.isfinite(value) and value >= 0):
            return f"{name} is {value}; counters are finite and never negative"
    started = state.started_at
    if started is None or started.tzinfo is None or started > now:
        return f"started_at {started} is not a time-zone-aware time in the past"
    if c.waited_seconds > (now - started).total_seconds() + WAIT_SLACK_SECONDS:
        return "counters.waited_seconds is longer than the job has run"
    if not 0 <= len(state.progress) <= state.progress_next:
        return "progress_next is before the progress events carried"
    for obs in state.observations:
        if obs.ref is not None and not ref_belongs_to(obs.ref, job_id, req.tenant):
            return f"observation {obs.step_id[:64]!r} refers to stored output of another job"
    return ""


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


def note_degraded(state: LoopState, reason: str) -> bool:
    """Record why the job runs degraded; False when the reason was known (or too many were)."""
    if reason in state.degraded or len(state.degraded) >= MAX_DEGRADED:
        return False
    state.degraded = [*state.degraded, reason[:300]]
    return True


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
        routing=state.routing,
        degraded=list(state.degraded),
        writes=[w.view() for w in state.writes],
    )


def result_of(
    job_id: str,
    state: LoopState,
    outcome: Outcome,
    exhausted: BudgetName | None = None,
    error: str | None = None,
) -> JobResult:
    """The ``JobResult`` a job ends with: the verified answer, or its best partial one."""
    verified = outcome == "completed"
    answer = state.draft if verified else (state.best_draft or state.draft)
    return JobResult(
        job_id=job_id,
        outcome=outcome,
        answer=answer or observation_summary(state),
        verified=verified,
        exhausted_budget=exhausted,
        usage=JobUsage.of(state.counters),
        iterations=state.iteration + (1 if verified else 0),
        error=error,
        routing=state.routing,
        degraded=bool(state.degraded),
        degraded_reasons=list(state.degraded),
        writes=[w.view() for w in state.writes],
    )


def details_markdown(req: JobRequest, state: LoopState) -> str:
    """Current details for the Temporal UI: phase, then iteration and budget use."""
    usage = JobUsage.of(state.counters)
    tier = ""
    if state.routing is not None:
        tier = f" · tier **{state.routing.tier}** ({state.routing.source}: {state.routing.reason})"
    text = f"**{state.state}**{tier}\n\n{budget_text(req.budget, usage, state.iteration)}"
    # Writes previewed and not yet made (issue 16): what a person may be asked to approve.
    waiting = [w for w in state.writes if w.status in WRITE_OPEN]
    lines = [
        f"- `{w.id}` {w.tool} ({w.status}{', needs approval' if w.requires_approval else ''}): "
        f"{w.preview[:160]}"
        for w in waiting
    ]
    return text + ("\n\n**writes**\n" + "\n".join(lines) if lines else "")


def observation_summary(state: LoopState) -> str | None:
    """A partial answer built from what the job observed, when no draft exists."""
    good = [o for o in state.observations if o.ok]
    if not good:
        return None
    lines = [f"[{o.name}] {o.content[:200]}" for o in good[-5:]]
    return "No verified answer yet. Observations so far:\n" + "\n".join(lines)
