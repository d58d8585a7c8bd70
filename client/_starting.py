"""How a job starts in Temporal: its ID policies, its backstop timeout, and what operators see.

Owns the options ``AgentJobs.start`` passes to ``start_workflow`` besides the workflow, its
input, its ID and its queue: the ID policies that make starting idempotent, the execution
timeout that backs up the job's own budgets, the search attributes it is listed by from the
start, and the ``static_summary`` and ``static_details`` the Temporal UI shows. Nothing here
holds a secret: summaries and details are stored unencoded so operators can read them.
"""

from __future__ import annotations

from datetime import timedelta
from typing import TypedDict

from temporalio.common import (
    Priority,
    TypedSearchAttributes,
    WorkflowIDConflictPolicy,
    WorkflowIDReusePolicy,
)

from keel.activities.converter import PlainText
from keel.workflows.budget_text import budget_text
from keel.workflows.policies import JOB_SLOT_MAX_WAIT
from keel.workflows.search_attributes import at_start
from keel.workflows.types import JobRequest

__all__ = ["StartOptions", "start_options", "static_details", "static_summary"]

SUMMARY_CHARS = 120
"""The UI shows ``static_summary`` on one line; longer goals are cut."""

BACKSTOP_SLACK_SECONDS = 600.0
"""Room over the job's own budgets before Temporal's ``execution_timeout`` kills it."""

PRIORITY_KEYS = {"interactive": 1, "batch": 3}
"""Temporal task priority per mode (lower runs first; Temporal's default is 3): interactive
jobs' workflow and activity tasks are dispatched before any backlog of batch ones. Activities
inherit their workflow's priority and fairness key."""


class StartOptions(TypedDict):
    """Keyword arguments of ``Client.start_workflow`` that follow from the request alone."""

    id_conflict_policy: WorkflowIDConflictPolicy
    id_reuse_policy: WorkflowIDReusePolicy
    execution_timeout: timedelta
    search_attributes: TypedSearchAttributes
    static_summary: str
    static_details: str
    priority: Priority


def start_options(req: JobRequest, fairness_weight: float | None = None) -> StartOptions:
    """The start options of a job.

    Args:
        req: The validated request.
        fairness_weight: The tenant's share of dispatch against other tenants' (Temporal's
            fairness; default 1.0): its jobs' tasks are keyed by tenant, so one tenant's flood
            does not starve another's jobs on the same queue.

    Returns:
        Options to splat into ``start_workflow``.
    """
    budget = req.budget
    # A job's budgets start once it holds a running-job slot, after at most JOB_SLOT_MAX_WAIT
    # in line (workflows/_slots.py).
    backstop = (
        budget.max_seconds
        + budget.max_questions * req.ask_timeout_seconds
        + JOB_SLOT_MAX_WAIT.total_seconds()
        + BACKSTOP_SLACK_SECONDS
    )
    return StartOptions(
        # A retried request with the same key joins the running job; once it has closed, the
        # key is spent and the start is rejected (``AgentJobs.start`` returns the job ID then).
        id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
        id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
        execution_timeout=timedelta(seconds=backstop),
        search_attributes=at_start(req),
        static_summary=static_summary(req.goal),
        # Tenant, tools and limits stay readable when payloads are encrypted; the summary is
        # the goal, so it is encrypted with the rest (issue 16).
        static_details=PlainText(static_details(req)),
        priority=Priority(
            priority_key=PRIORITY_KEYS[req.mode],
            fairness_key=req.tenant,
            fairness_weight=fairness_weight,
        ),
    )


def static_summary(goal: str) -> str:
    """The job's one-line title in the Temporal UI.

    Args:
        goal: The job's goal.

    Returns:
        The goal on one line, cut to ``SUMMARY_CHARS`` with an ellipsis.
    """
    line = " ".join(goal.split())
    return line if len(line) <= SUMMARY_CHARS else line[: SUMMARY_CHARS - 1] + "…"


def static_details(req: JobRequest) -> str:
    """Markdown for the Temporal UI: who asked and within which limits.

    Args:
        req: The validated request.

    Returns:
        Tenant and user, tools, whether documents were given, and every budget limit.
    """
    return "\n".join(
        [
            f"**Tenant:** `{req.tenant}` · **User:** `{req.user}`",
            f"**Tools:** {', '.join(f'`{t}`' for t in req.tools) or 'none'}",
            f"**Documents:** {'yes' if req.docs_dir else 'no'}",
            f"**Budget:** {budget_text(req.budget)}",
        ]
    )
