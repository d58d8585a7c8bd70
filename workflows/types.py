"""Payloads that cross the client boundary: job requests, budgets, status and results.

Depends only on pydantic, the standard library and ``activities.types``; deterministic.
Validation here is the first line of defence: a malformed job is refused by these models at
submit, before anything is started, with the field that is wrong.

Wire contract: recorded in history; add optional fields only.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from keel.activities.types import Clarification, Conversation, Observation, TierName, Usage

MAX_GOAL_CHARS = 8000
IDENT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
WORKFLOW_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:@/-]{0,199}$")
JOB_ID_PREFIX = "agent-job-"
TENANT_SEPARATOR = ":"
"""Between the tenant and the request key in a job ID; neither may contain it."""


def job_id_for(tenant: str, request_key: str) -> str:
    """The job ID of ``tenant``'s request ``request_key``: ``agent-job-{tenant}:{key}``.

    The tenant is part of the ID, so two tenants' request keys never name the same job, and
    the separator appears in neither part, so an ID names exactly one (tenant, key) pair.
    """
    return f"{JOB_ID_PREFIX}{tenant}{TENANT_SEPARATOR}{request_key}"


def tenant_of(job_id: str) -> str | None:
    """The tenant a job ID names, or None for an ID of another shape (such as before 0.2)."""
    if not job_id.startswith(JOB_ID_PREFIX) or TENANT_SEPARATOR not in job_id:
        return None
    tenant = job_id[len(JOB_ID_PREFIX) :].split(TENANT_SEPARATOR, 1)[0]
    return tenant if IDENT_RE.match(tenant) else None


def _identifier(value: str) -> str:
    if not IDENT_RE.match(value):
        raise ValueError(
            "must be 1-64 characters of letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return value


def _workflow_id(value: str) -> str:
    if not WORKFLOW_ID_RE.match(value):
        raise ValueError("must be 1-200 characters of letters, digits and . _ : @ / -")
    return value


Identifier = Annotated[str, AfterValidator(_identifier)]
WorkflowIdStr = Annotated[str, AfterValidator(_workflow_id)]

JobState = Literal[
    "queued",
    "running",
    "planning",
    "acting",
    "verifying",
    "refining",
    "waiting_for_input",
    "completed",
    "budget_exhausted",
    "failed",
    "cancelled",
]
TERMINAL_STATES: frozenset[str] = frozenset(
    {"completed", "budget_exhausted", "failed", "cancelled"}
)

Outcome = Literal["completed", "budget_exhausted", "failed", "cancelled"]
BudgetName = Literal[
    "max_steps",
    "max_tool_calls",
    "max_retries_per_tool",
    "max_tokens",
    "max_seconds",
    "max_cost_usd",
    "max_iterations",
]


class Budget(BaseModel):
    """Limits a job may not pass; checked before every activity the loop schedules."""

    model_config = ConfigDict(extra="forbid")

    max_steps: int = Field(default=40, gt=0, le=100_000)
    """Activity calls of any kind (LLM, tool, retrieval)."""
    max_tool_calls: int = Field(default=20, gt=0, le=100_000)
    """Tool and retrieval calls."""
    max_retries_per_tool: int = Field(default=3, ge=0, le=100)
    """Extra attempts each tool may use over the whole job after transient failures."""
    max_tokens: int = Field(default=200_000, gt=0, le=1_000_000_000)
    """Prompt plus completion tokens, counted at worst case before each LLM call."""
    max_seconds: float = Field(default=1800.0, gt=0, le=30 * 86400, allow_inf_nan=False)
    """Wall-clock seconds of work; time spent waiting for a human answer is not counted."""
    max_cost_usd: float = Field(default=5.0, gt=0, le=100_000, allow_inf_nan=False)
    """Dollars at the worker's model prices, counted at worst case before each LLM call."""
    max_iterations: int = Field(default=5, gt=0, le=10_000)
    """Plan-act-verify rounds before the best draft is returned unverified."""
    max_questions: int = Field(default=2, ge=0, le=20)
    """Stop-and-ask questions the planner may put to the caller."""


class JobRequest(BaseModel):
    """What a caller submits. Everything is validated here, at submit."""

    model_config = ConfigDict(extra="forbid")

    goal: str = Field(min_length=1, max_length=MAX_GOAL_CHARS)
    tenant: Identifier = "default"
    user: Identifier = "anonymous"
    tools: list[Identifier] = Field(default_factory=lambda: ["calculator", "write_note"])
    """Allow-list: the only tools this job may call, whatever the model asks."""
    docs_dir: str | None = Field(default=None, max_length=4096)
    """Folder of documents to search; enables retrieval steps."""
    budget: Budget = Field(default_factory=Budget)
    ask_timeout_seconds: float = Field(default=3600.0, gt=0, le=30 * 86400, allow_inf_nan=False)
    """How long a question waits for an answer before the default assumption is used."""
    notify_workflow: WorkflowIdStr | None = None
    """Workflow to signal with the JobResult when this job ends."""
    callback_url: str | None = Field(default=None, max_length=2048, pattern=r"^https?://[^\s]+$")
    """Webhook: POSTed the outcome, signed with the tenant's secret, when the job ends."""
    mode: Literal["interactive", "batch"] = "interactive"
    """Which task queue runs the job: interactive jobs never wait behind a batch backlog."""
    tier: Literal["auto", "fast", "deep"] = "auto"
    """The model tier the job starts on: ``auto`` lets the router pick; ``fast`` or ``deep``
    forces it (escalation may still move a fast job to deep). The models are the worker's."""
    cache: bool = True
    """Whether Keel's caches (responses, tool results, retrieval) may serve this job."""
    conversation: Conversation | None = None
    """Earlier turns of the session this job is a turn of (set by the session, issue 15)."""
    notify_questions: bool = False
    """Also signal ``notify_workflow`` (``QUESTION_SIGNAL``) when the job asks a question, so
    the session that started it can route the next message to it as the answer."""
    approval_timeout_seconds: float = Field(
        default=3600.0, gt=0, le=30 * 86400, allow_inf_nan=False
    )
    """How long the job waits for a person to approve or reject its writes that require
    approval (``http_post``); an undecided write then expires and is not committed."""

    @field_validator("goal")
    @classmethod
    def _goal_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be blank")
        return value

    @field_validator("tools")
    @classmethod
    def _unique_tools(cls, value: list[str]) -> list[str]:
        return list(dict.fromkeys(value))


class JobEvent(BaseModel):
    """One entry of a job's recent activity, shown by ``keel status`` and ``keel watch``."""

    at: datetime
    kind: str
    detail: str = ""


class LoopCounters(BaseModel):
    """Everything a job has consumed so far."""

    usage: Usage = Field(default_factory=Usage)
    steps: int = 0
    tool_calls: int = 0
    retries_by_tool: dict[str, int] = Field(default_factory=dict)
    questions: int = 0
    waited_seconds: float = 0.0
    by_tier: dict[str, Usage] = Field(default_factory=dict)
    """Model usage per tier that served it (``router``, ``fast``, ``deep``)."""
    cache_hits: dict[str, int] = Field(default_factory=dict)
    """Hits per cache (``response``, ``tool``, ``retrieval``)."""
    cache_misses: dict[str, int] = Field(default_factory=dict)
    saved: Usage = Field(default_factory=Usage)
    """What response-cache hits would have cost at today's prices."""
    escalations: int = 0
    escalation_usd: float = 0.0
    """Dollars spent on calls made on a tier the job escalated to."""
    summaries: int = 0
    """Observations folded into the rolling summary (context compression)."""


class TierUsage(BaseModel):
    """One tier's share of a job's usage."""

    tokens: int = 0
    cost_usd: float = 0.0


class JobUsage(BaseModel):
    """Usage as reported to callers."""

    tokens: int
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float
    steps: int
    tool_calls: int
    by_tier: dict[str, TierUsage] = Field(default_factory=dict)
    """Tokens and dollars per tier (``router``, ``fast``, ``deep``)."""
    cache_hits: dict[str, int] = Field(default_factory=dict)
    cache_misses: dict[str, int] = Field(default_factory=dict)
    saved_tokens: int = 0
    """Model tokens the response cache saved this job."""
    saved_usd: float = 0.0
    """Dollars the response cache saved this job, at the worker's prices."""
    escalations: int = 0
    escalation_usd: float = 0.0

    @classmethod
    def of(cls, counters: LoopCounters) -> JobUsage:
        """Summarise counters for a caller."""
        u = counters.usage
        return cls(
            tokens=u.total_tokens,
            prompt_tokens=u.prompt_tokens,
            completion_tokens=u.completion_tokens,
            cost_usd=round(u.cost_usd, 6),
            steps=counters.steps,
            tool_calls=counters.tool_calls,
            by_tier={
                t: TierUsage(tokens=v.total_tokens, cost_usd=round(v.cost_usd, 6))
                for t, v in counters.by_tier.items()
            },
            cache_hits=dict(counters.cache_hits),
            cache_misses=dict(counters.cache_misses),
            saved_tokens=counters.saved.total_tokens,
            saved_usd=round(counters.saved.cost_usd, 6),
            escalations=counters.escalations,
            escalation_usd=round(counters.escalation_usd, 6),
        )


class Routing(BaseModel):
    """Which tier a job runs on, and why (recorded in status, result and ``KeelTier``)."""

    tier: TierName
    """The tier the job runs on now (after any escalation)."""
    started_on: TierName
    source: Literal["router", "caller", "fallback"]
    """``router``: the router's call decided; ``caller``: forced by ``tier``; ``fallback``:
    the router's output was unusable and the job starts on the worker-safe deep tier."""
    reason: str = ""
    complexity: str | None = None
    escalated: bool = False


WriteStatus = Literal[
    "previewed", "approved", "committed", "rejected", "expired", "discarded", "failed"
]
"""Where a destructive tool's write stands (issue 16): ``previewed`` by the act phase (and, for
a tool that requires it, waiting for approval), ``approved`` by a person, ``committed`` after
the answer was verified; or never made: ``rejected`` by a person, ``expired`` undecided past
``approval_timeout_seconds``, ``discarded`` because the job ended without a verified answer,
``failed`` because the commit itself failed."""
WRITE_OPEN: frozenset[str] = frozenset({"previewed", "approved"})
"""Write statuses that may still commit."""


class JobWrite(BaseModel):
    """One write a job previewed, as callers see it in status and result."""

    id: str
    """The write's ID: the step's ``iteration:step id``, also the suffix of its op_key. The
    ``approve`` and ``reject`` updates name it."""
    tool: str
    preview: str
    """What the commit does (the tool's own description, nothing changed yet)."""
    requires_approval: bool = False
    status: WriteStatus = "previewed"
    detail: str = ""
    """The commit's output, the reason it was rejected, or why it failed."""


class PendingWrite(JobWrite):
    """A write as the workflow keeps it: the view plus what its commit needs."""

    args: dict[str, Any] = Field(default_factory=dict)
    """The tool's arguments as previewed; the commit sends exactly these."""

    def view(self) -> JobWrite:
        """The caller's view, without the arguments (the preview describes them)."""
        return JobWrite.model_validate(self.model_dump(exclude={"args"}))


class WriteDecision(BaseModel):
    """A person's decision on a write that requires approval (``approve``/``reject``)."""

    model_config = ConfigDict(extra="forbid")

    write_id: str = Field(min_length=1, max_length=200)
    reason: str = Field(default="", max_length=1000)
    """Why, for the job's record (shown with the write)."""


PROGRESS_TOPIC = "progress"
"""The topic of a job's workflow stream that carries its ``JobProgress`` events."""


class JobProgress(BaseModel):
    """One progress event on a job's workflow stream (``keel watch``, ``GET .../events``).

    Each event carries the job's whole position (phase, iteration, budget use), so a reader
    that missed some still shows the right state after the next one.
    """

    at: datetime
    kind: str
    """``phase`` when the job changed phase (``detail`` names it), else the event's kind:
    ``started``, ``step``, ``verdict``, ``question``, ``completed``..."""
    detail: str = ""
    state: JobState
    iteration: int
    usage: JobUsage


class LoopState(BaseModel):
    """The whole state of a running job; the one thing carried across continue-as-new."""

    state: JobState = "queued"
    iteration: int = 0
    started_at: datetime | None = None
    counters: LoopCounters = Field(default_factory=LoopCounters)
    observations: list[Observation] = Field(default_factory=list)
    clarifications: list[Clarification] = Field(default_factory=list)
    critique: str | None = None
    draft: str | None = None
    best_draft: str | None = None
    best_score: float = -1.0
    pending_question: str | None = None
    pending_default: str | None = None
    invalid_outputs: int = 0
    job_slot: bool = False
    """The job asked for a running-job slot (``workflows/_slots.py``); carried across
    continue-as-new so a new run keeps the slot, and given back when the job ends."""
    events: list[JobEvent] = Field(default_factory=list)
    runs: int = 1
    """Workflow runs this job has used (1 + continue-as-new count)."""
    progress: list[JobProgress] = Field(default_factory=list)
    """The last progress events published, carried so the next run's stream still has them."""
    progress_next: int = 0
    """Offset the next progress event gets on the job's stream; offsets never go back."""
    routing: Routing | None = None
    """The job's tier and why; None for jobs started before routing existed."""
    summary: str | None = None
    """Rolling summary of observations folded out of ``observations`` (context compression)."""
    degraded: list[str] = Field(default_factory=list)
    """Why the job ran degraded (a model's or tool's circuit breaker open, issue 16); newest
    last, at most ``MAX_DEGRADED`` distinct reasons."""
    writes: list[PendingWrite] = Field(default_factory=list)
    """Destructive tools' writes, previewed by the act phase and committed, or not, when the
    job ends (``workflows/_writes.py``)."""


MAX_DEGRADED = 8
"""Distinct degraded reasons a job keeps (more only repeat what the first say)."""


class AgentLoopInput(BaseModel):
    """Workflow input: the request, and the state when continuing as new."""

    request: JobRequest
    state: LoopState | None = None
    job_slot: bool = False
    """Take a running-job slot before starting (``workflows/_slots.py``): set by the gateway
    when a concurrency limit covers the job's tenant or user. Jobs without one cost no slot
    calls, and histories recorded before slots existed replay unchanged."""
    compress: bool = True
    """Fold older observations into a rolling summary (``workflows/_context.py``); False drops
    them past the window instead (a baseline for ``keel bench cost``)."""
    continue_as_new_after: int | None = Field(default=None, gt=0)
    """Continue as new after this many iterations in one run even if Temporal does not
    suggest it yet; keeps very long jobs' histories short. None: only when suggested."""


class HumanInput(BaseModel):
    """An answer to the job's pending question."""

    model_config = ConfigDict(extra="forbid")

    text: str = Field(min_length=1, max_length=MAX_GOAL_CHARS)

    @field_validator("text")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be blank")
        return value


class JobStatus(BaseModel):
    """A snapshot of a job, returned by the ``get_status`` query."""

    job_id: str
    state: JobState
    tenant: str
    goal: str
    iteration: int
    budget: Budget
    usage: JobUsage
    pending_question: str | None = None
    events: list[JobEvent] = Field(default_factory=list)
    runs: int = 1
    routing: Routing | None = None
    degraded: list[str] = Field(default_factory=list)
    """Why the job is running degraded (an open circuit breaker); empty when it is not."""
    writes: list[JobWrite] = Field(default_factory=list)
    """The job's writes: previews waiting for the verified answer (or for approval), and what
    became of each."""


def current_iteration(iteration: int, budget: Budget) -> int:
    """The iteration a job is in (or ended in), counted from 1, for people to read.

    ``iteration`` is ``LoopState.iteration``: the iterations that ended in a refine, so the one
    in progress is the next. A job that ran out of iterations has counted past its limit and
    is shown at the limit.
    """
    return min(iteration + 1, budget.max_iterations)


class JobResult(BaseModel):
    """How a job ended. Returned by the workflow; budget exhaustion is an outcome, not an error."""

    job_id: str
    outcome: Outcome
    answer: str | None = None
    """The verified answer, or the best partial answer when the job did not complete."""
    verified: bool = False
    exhausted_budget: BudgetName | None = None
    usage: JobUsage
    iterations: int
    error: str | None = None
    routing: Routing | None = None
    """The tier the job ran on, why, and whether it escalated."""
    degraded: bool = False
    """It ran on a fallback model or tier, or without a tool, because a breaker was open."""
    degraded_reasons: list[str] = Field(default_factory=list)
    writes: list[JobWrite] = Field(default_factory=list)
    """What became of each write the job previewed: committed, or why not."""


QUESTION_SIGNAL = "keel_job_question"
"""Signal sent to ``JobRequest.notify_workflow`` with the question when a job asks one (only
with ``notify_questions``)."""

NOTIFY_SIGNAL = "keel_job_finished"
"""Signal name sent to ``JobRequest.notify_workflow`` with the JobResult when a job ends."""
