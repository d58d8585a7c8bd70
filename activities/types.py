"""Payloads that cross the activity boundary.

This module owns every model passed into or returned from an activity (and the one text form
of search hits, which both a workflow and a tool put in front of the model). It depends only on
pydantic and the standard library so the workflow sandbox can pass it through cheaply, and it
is deterministic: no I/O, no clocks.

Wire contract: these models are recorded in workflow history. Add optional fields only; never
rename or remove a field that a running job may replay.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

PREVIEW_CHARS = 240
"""Longest tool output kept inline in history; longer outputs go to Redis by reference and only
this much of them is recorded, so history per step stays flat whatever a tool returns."""

PROMPT_CHARS_PER_OBSERVATION = 4000
"""How much of an observation stored by reference an LLM activity puts in its prompt."""

CHARS_PER_TOKEN = 3
"""Conservative: real tokenisers average about four characters per token on English text."""

MIN_OUTPUT_TOKENS = 64
"""A model call that cannot afford this many completion tokens is not worth making."""

LLM_REQUEST_TIMEOUT_SECONDS = 90.0
"""Longest the openai client waits for one model request: real calls take seconds to a minute
(``keel bench load`` runs them at 45 to 75 s), so the limit sits half a minute above that.
``LLM_CALL``'s start-to-close timeout is derived from it (``workflows/policies.py``), so a slow
model ends in a classified timeout the activity reports, never in Temporal killing the attempt
mid-request."""

LIMIT_WAIT_SECONDS = 60.0
"""Longest one attempt of a model or tool call waits at its gateway's limits (in-flight leases,
requests and tokens per minute) before the call starts. ``LLM_CALL`` and ``TOOL_CALL`` add it to
their attempt timeouts, so waiting for a limit never times an attempt out."""

NO_HITS = "no matching documents"
"""What a search that found nothing reads as, to the model and in a tool's result."""

BLOB_REF_PREFIX = "keel:blob:"
"""Start of every stored-output ref. The tool gateway stores a job's large outputs under
``keel:blob:{tenant}:{job ID}:{iteration}:{step id}``, the tenant in braces (a Redis Cluster
hash tag, issue 16); refs written before the tags have it bare (``activities/store.py``)."""

_STEP_IN_JOB = re.compile(r"[0-9]+:.+", re.DOTALL)
"""What follows the job ID in a ref the gateway wrote: ``{iteration}:{step id}``."""


def ref_belongs_to(ref: str, job_id: str, tenant: str | None = None) -> bool:
    """Whether ``ref`` names a blob the tool gateway stored for ``job_id`` (issue 13).

    Refs travel in workflow state, so a workflow started with crafted state could otherwise
    point one at another job's or another tenant's output. Deterministic: the workflow checks
    carried state with it, and ``KeelStore.get_blobs`` checks every ref it reads.

    Args:
        ref: A ref from an ``Observation`` or a ``ToolResult``.
        job_id: The job that wants to read it (the workflow ID, kept across continue-as-new).
        tenant: The job's tenant, when the caller knows it; None checks the job only.

    Returns:
        True when ``ref`` is ``keel:blob:{tenant}:{job_id}:{iteration}:{step id}``, with the
        tenant in braces or, as refs written before issue 16 have it, bare.
    """
    if not job_id or not ref.startswith(BLOB_REF_PREFIX):
        return False
    named = ref[len(BLOB_REF_PREFIX) :]
    if named.startswith("{"):
        ref_tenant, brace, rest = named[1:].partition("}")
        sep = brace and rest[:1]
        rest = rest[1:]
    else:
        ref_tenant, sep, rest = named.partition(":")
    if sep != ":" or not ref_tenant or (tenant is not None and ref_tenant != tenant):
        return False
    prefix = f"{job_id}:"
    return rest.startswith(prefix) and _STEP_IN_JOB.fullmatch(rest[len(prefix) :]) is not None


class Usage(BaseModel):
    """Tokens and money one call (or a whole job) consumed."""

    prompt_tokens: int = 0
    """Input tokens billed by the model."""
    completion_tokens: int = 0
    """Output tokens billed by the model."""
    cost_usd: float = 0.0
    """Cost from the worker's price table for the model that served the call."""

    @property
    def total_tokens(self) -> int:
        """Prompt plus completion tokens."""
        return self.prompt_tokens + self.completion_tokens

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            prompt_tokens=self.prompt_tokens + other.prompt_tokens,
            completion_tokens=self.completion_tokens + other.completion_tokens,
            cost_usd=round(self.cost_usd + other.cost_usd, 8),
        )


Role = Literal["planner", "verifier", "answerer", "router", "summarizer"]
"""What a model call does; the worker maps each role to a tier (``LLMConfig.role_tiers``)."""

TierName = Literal["fast", "deep"]
"""A model tier a job runs on, cheapest first (``TIERS``). The router has its own model."""
TIERS: tuple[TierName, ...] = ("fast", "deep")
"""Tiers from cheapest to strongest: escalation moves one step right."""


def next_tier(tier: TierName) -> TierName | None:
    """The tier above ``tier``, or None at the top."""
    at = TIERS.index(tier)
    return TIERS[at + 1] if at + 1 < len(TIERS) else None


EXCHANGE_CHARS = 2_000
"""Longest message or answer of an earlier turn a session passes verbatim (issue 15)."""
CONVERSATION_SUMMARY_CHARS = 2_000
"""Longest rolling summary of a conversation's older turns."""


class Exchange(BaseModel):
    """One earlier turn of a conversation: what the user said and what the agent answered."""

    user: str = Field(max_length=EXCHANGE_CHARS)
    assistant: str = Field(default="", max_length=EXCHANGE_CHARS)


class Conversation(BaseModel):
    """What a session passes to each turn: a summary of older turns and the last few verbatim.

    Bounded, so the context a turn sends its model stays flat however long the session runs.
    """

    summary: str = Field(default="", max_length=CONVERSATION_SUMMARY_CHARS)
    recent: list[Exchange] = Field(default_factory=list, max_length=8)


class Observation(BaseModel):
    """What one plan step produced, as the planner, answerer and verifier see it."""

    step_id: str
    kind: Literal["tool", "retrieve"] = "tool"
    name: str
    """Tool name, or ``"retrieve"``."""
    ok: bool = True
    content: str = ""
    """Output preview (at most PREVIEW_CHARS), or the error message when not ok."""
    ref: str | None = None
    """Redis key of the full output when it was too large to keep in history."""
    size: int = 0
    """Length of the full output when ``ref`` is set; it bounds what the prompt will hold."""
    error_type: str | None = None
    """Error type constant from activities.errors when the step failed for good."""


class Clarification(BaseModel):
    """A question the planner asked and the answer it got (or the assumption it fell back to)."""

    question: str
    answer: str
    assumed: bool = False
    """True when nobody answered in time and the planner's default assumption was used."""


STEP_ID_MAX_CHARS = 64
"""Longest step id a plan may use."""
STEP_ID_COPY = "~"
"""Joins a repeated step id and its copy number (``s1``, ``s1~2``): see ``unique_step_ids``."""


class PlanStep(BaseModel):
    """One action in a plan: a tool call or a retrieval over the job's documents."""

    model_config = ConfigDict(extra="ignore")

    id: str = Field(min_length=1, max_length=STEP_ID_MAX_CHARS)
    kind: Literal["tool", "retrieve"]
    tool: str | None = None
    """Tool name when ``kind == "tool"``."""
    args: dict[str, Any] = Field(default_factory=dict)
    """Tool arguments; validated by the tool gateway against the tool's schema."""
    query: str | None = None
    """Search text when ``kind == "retrieve"``."""
    top_k: int = Field(default=5, ge=1, le=20)
    filters: dict[str, str] = Field(default_factory=dict)
    """Equality filters over document metadata."""
    depends_on: list[str] = Field(default_factory=list)
    """Ids of steps that must finish first; steps with no dependency run in parallel."""


class Plan(BaseModel):
    """The planner's structured decision for one iteration."""

    model_config = ConfigDict(extra="ignore")

    decision: Literal["act", "ask", "answer"]
    """``act``: run ``steps``; ``ask``: stop and ask ``question``; ``answer``: draft now."""
    rationale: str = ""
    steps: list[PlanStep] = Field(default_factory=list, max_length=16)
    question: str | None = None
    default_assumption: str | None = None
    """What the planner will assume if the question is not answered in time."""

    @model_validator(mode="after")
    def _consistent(self) -> Plan:
        if self.decision == "act" and not self.steps:
            raise ValueError("decision 'act' needs at least one step")
        if self.decision == "ask" and not (self.question or "").strip():
            raise ValueError("decision 'ask' needs a question")
        for step in self.steps:
            if step.kind == "tool" and not step.tool:
                raise ValueError(f"step {step.id!r} is a tool step without a tool name")
            if step.kind == "retrieve" and not step.query:
                raise ValueError(f"step {step.id!r} is a retrieve step without a query")
        return self


def unique_step_ids(steps: Sequence[PlanStep]) -> list[PlanStep]:
    """``steps`` with every repeated id renumbered, so each step has an id of its own.

    A step's id is part of its write's op_key (``iteration:id``), so two steps sharing one id
    would share one key: the second write would be reported "already written" and the second
    stored output would overwrite the first. The first step of an id keeps it; later ones get
    ``id~2``, ``id~3`` ... (cut to fit the 64-character limit, skipping ids the plan already
    uses). A dependency on a repeated id waits for every step that had it, except the step
    itself. Pure and deterministic: the workflow applies it too, to plans already in history.

    Args:
        steps: A plan's steps, in order.

    Returns:
        The steps, copied where an id or a dependency changed; ``steps`` itself is unchanged.
    """
    taken = {step.id for step in steps}
    seen: set[str] = set()
    ids: list[str] = []
    copies: dict[str, list[str]] = {}
    for step in steps:
        new_id = step.id
        if step.id in seen:
            number = 2
            while (new_id := _numbered(step.id, number)) in taken:
                number += 1
            taken.add(new_id)
        seen.add(step.id)
        ids.append(new_id)
        copies.setdefault(step.id, []).append(new_id)
    repeated = {old: new for old, new in copies.items() if len(new) > 1}
    if not repeated:
        return list(steps)
    result: list[PlanStep] = []
    for step, new_id in zip(steps, ids, strict=True):
        depends_on: list[str] = []
        for dep in step.depends_on:
            for target in repeated.get(dep, [dep]):
                if target != new_id and target not in depends_on:
                    depends_on.append(target)
        if new_id == step.id and depends_on == step.depends_on:
            result.append(step)
        else:
            result.append(step.model_copy(update={"id": new_id, "depends_on": depends_on}))
    return result


def _numbered(step_id: str, number: int) -> str:
    suffix = f"{STEP_ID_COPY}{number}"
    return step_id[: STEP_ID_MAX_CHARS - len(suffix)] + suffix


class Verdict(BaseModel):
    """The verifier's judgement of a draft."""

    model_config = ConfigDict(extra="ignore")

    passed: bool
    score: float = Field(ge=0.0, le=1.0)
    critique: str = ""


class LLMCallBase(BaseModel):
    """Fields every LLM activity input carries.

    Kept lean on purpose, since three of these are recorded per iteration: the job ID comes
    from ``activity.info()``, and the model and its prices from the worker's configuration.
    """

    tenant: str
    goal: str
    iteration: int
    max_output_tokens: int | None = Field(default=None, ge=1)
    """Completion-token cap the workflow could afford for this call, set by its budget ledger
    just before the call. None: only the worker's own cap applies (calls made outside a job).
    It used to be required, so recorded inputs always carry it."""
    max_cost_usd: float | None = None
    """Dollars the job has left; the activity, which knows the model's price, lowers its
    completion-token cap to fit and refuses the call (``BudgetExhausted``) when even
    MIN_OUTPUT_TOKENS would not fit. None: no dollar cap (calls made outside a job)."""
    observations: list[Observation] = Field(default_factory=list)
    clarifications: list[Clarification] = Field(default_factory=list)
    tier: TierName | None = None
    """The job's tier for this call (routing, issue 14); the worker's role map decides the
    model from it. None: the worker's default tier (calls recorded before tiers existed)."""
    cache: bool = True
    """Whether the response cache may serve or store this call (``--no-cache`` turns it off)."""
    summary: str | None = None
    """The rolling summary of observations older than ``observations`` (context compression)."""
    correction: str | None = None
    """Why this call's previous output was rejected (schema validation), when it is a retry."""
    conversation: Conversation | None = None
    """The session's earlier turns, when the job is a turn of a session (issue 15)."""


class LLMCallResult(BaseModel):
    """What every model call reports besides its output: usage, where it ran, the cache."""

    usage: Usage = Field(default_factory=Usage)
    """What the call cost (zero on a cache hit)."""
    tier: str | None = None
    """The tier that served the call (``router`` for the router); None before tiers existed."""
    model: str | None = None
    cached: bool | None = None
    """True: served from the response cache, nothing was sent to the model; False: a miss;
    None: the cache was not consulted (off, or the job opted out)."""
    saved: Usage | None = None
    """On a hit: what the call cost when it was first made, at today's price."""
    degraded: str | None = None
    """Why the call was served by a fallback (its model's circuit breaker was open, issue 16)."""


class PlanInput(LLMCallBase):
    """Input of ``plan_step``."""

    allowed_tools: list[str] = Field(default_factory=list)
    retrieval_enabled: bool = False
    critique: str | None = None
    """The verifier's critique of the previous draft, when refining."""
    may_ask: bool = True
    """False once the job has used its question budget."""


class PlanResult(LLMCallResult):
    """Output of ``plan_step``: a valid plan, or the reason the model's output was unusable."""

    plan: Plan | None = None
    invalid_reason: str | None = None


class AnswerInput(LLMCallBase):
    """Input of ``draft_answer``."""

    critique: str | None = None


class AnswerResult(LLMCallResult):
    """Output of ``draft_answer``."""

    answer: str


class VerifyInput(LLMCallBase):
    """Input of ``verify_draft``."""

    draft: str


class VerifyResult(LLMCallResult):
    """Output of ``verify_draft``."""

    verdict: Verdict | None = None
    invalid_reason: str | None = None


class RouteDecision(BaseModel):
    """The router's classification of a job, and the tier it starts on."""

    model_config = ConfigDict(extra="ignore")

    tier: TierName
    complexity: Literal["low", "medium", "high"] = "medium"
    needs_tools: bool = False
    risk: Literal["low", "high"] = "low"
    reason: str = Field(default="", max_length=300)


class RouteInput(LLMCallBase):
    """Input of ``route_job``: what the router sees of a job before it starts."""

    allowed_tools: list[str] = Field(default_factory=list)
    retrieval_enabled: bool = False


class RouteResult(LLMCallResult):
    """Output of ``route_job``."""

    decision: RouteDecision | None = None
    invalid_reason: str | None = None


class SummaryInput(LLMCallBase):
    """Input of ``summarize_observations``: fold ``fold`` into ``summary`` (may be None)."""

    fold: list[Observation] = Field(default_factory=list)
    max_chars: int = Field(default=2_000, ge=100, le=2_000)
    """Longest summary wanted; the summariser is told, and a longer one is cut."""


class SummaryResult(LLMCallResult):
    """Output of ``summarize_observations``."""

    summary: str = ""


class ToolCall(BaseModel):
    """Input of ``execute_tool``."""

    job_id: str = ""
    """Empty when called from a workflow: the gateway uses the calling workflow's ID."""
    tenant: str
    op_key: str = ""
    """Durable identity (job, iteration, step); side effects are recorded against it. Empty
    when called from a workflow: the gateway forms it from the job ID and ``step_key``."""
    step_key: str = ""
    """``iteration:step id`` within the job; sent instead of ``op_key`` so the job ID, which
    Temporal records with every event anyway, is not repeated in each call's input."""
    tool: str
    args: dict[str, Any] = Field(default_factory=dict)
    allowed_tools: list[str]
    """The job's allow-list; the gateway refuses anything else whatever the model asked."""
    docs_dir: str | None = None
    """The job's document folder, for tools that search it."""
    cache: bool = True
    """Whether the tool-result cache may serve this call (and store its result); False for a
    job that opted out of Keel's caches. Write tools are never cached either way."""
    dry_run: bool = False
    """Preview instead of write: a destructive tool returns what it would do and changes
    nothing (``ToolResult.preview``); other tools run as usual. The act phase sends it
    (``preview-commit`` patch); the commit is the same call, same ``step_key``, without it."""

    @model_validator(mode="after")
    def _keyed(self) -> ToolCall:
        if not (self.op_key or self.step_key):
            raise ValueError("a tool call needs op_key or step_key")
        return self


class ToolResult(BaseModel):
    """Output of ``execute_tool``."""

    tool: str = ""
    """Left empty by the gateway (the caller knows which tool it called); kept so results
    recorded before it was dropped still read."""
    content: str
    """Output, or its first PREVIEW_CHARS characters when ``ref`` is set."""
    ref: str | None = None
    size: int = 0
    """Length of the full output in characters when ``ref`` is set (0: ``len(content)``)."""
    attempt: int = 1
    """Activity attempt that produced this result; the workflow charges retries to the tool."""
    replayed: bool = False
    """True when the result came from the idempotency record instead of a new effect."""
    cached: bool | None = None
    """True: served from the tool-result cache; False: looked up and missed; None: not looked
    up (a write tool, a job that opted out, or no cache)."""
    preview: bool = False
    """True when a destructive tool only previewed a write (``ToolCall.dry_run``): ``content``
    says what the commit would do, and nothing has changed yet."""
    requires_approval: bool = False
    """With ``preview``: the tool requires a person's approval before the write commits."""


RetrievalMode = Literal["hybrid", "bm25", "dense"]
"""How a search ranks documents (``activities/retrieval.py``)."""


class RetrievalQuery(BaseModel):
    """Input of ``search_corpus``."""

    job_id: str = ""
    """Empty when called from a workflow: the activity logs the calling workflow's ID."""
    tenant: str
    docs_dir: str
    query: str
    top_k: int = Field(default=5, ge=1, le=20)
    filters: dict[str, str] = Field(default_factory=dict)
    # Issue 14 (hybrid retrieval): optional, so inputs recorded before it still read.
    mode: RetrievalMode | None = None
    """``hybrid`` (BM25 and dense ranks fused), ``bm25`` or ``dense``; None: hybrid when the
    worker has an embedding model, else bm25."""
    rerank: bool = False
    """Re-order the top candidates by maximal marginal relevance (``activities/retrieval.py``)."""
    cache: bool = True
    """Whether the retrieval cache may serve this search (and store its hits)."""


class RetrievalHit(BaseModel):
    """One ranked document."""

    doc_id: str
    path: str
    score: float
    snippet: str
    metadata: dict[str, str] = Field(default_factory=dict)


def format_hits(hits: Sequence[RetrievalHit]) -> str:
    """Search hits as the model reads them, whether a retrieval step or ``search_docs`` ran.

    Args:
        hits: Ranked hits, best first.

    Returns:
        One ``path (score 0.87): snippet`` line per hit, or ``NO_HITS`` when there are none.
    """
    return "\n".join(f"{h.path} (score {h.score:.2f}): {h.snippet}" for h in hits) or NO_HITS


class RetrievalResult(BaseModel):
    """Output of ``search_corpus``."""

    hits: list[RetrievalHit] = Field(default_factory=list)
    attempt: int = 1
    # Issue 14 (hybrid retrieval): optional, so results recorded before it still read.
    mode: RetrievalMode | None = None
    """What ranked the hits (``bm25`` when dense ranking was asked for and unavailable). Scores:
    BM25 scores in ``bm25``, cosine similarity in ``dense``, and in ``hybrid`` the reciprocal
    rank fusion score scaled to (0, 1] (1: first in both rankings)."""
    cached: bool | None = None
    """True: served from the retrieval cache (the hits an earlier identical search returned);
    False: looked up and missed; None: not looked up."""
    degraded: str | None = None
    """Why the search ranked less than it was asked to (embeddings endpoint down); None: not."""
    index_version: str = ""
    """Digest of the indexed files' paths, mtimes and sizes: changes when a document does."""


class SlotRequest(BaseModel):
    """Input of ``acquire_job_slot``: a job asks for a place among its tenant's running jobs.

    The job is the calling workflow (its ID is the lease's name), so a job can only ever take
    or give back its own slot.
    """

    tenant: str
    user: str
    lease_seconds: float = Field(gt=0)
    """How long the slot is held if the job never gives it back (a terminated workflow)."""
    wait_until: datetime | None = None
    """Wait in line (first in, first out) until this time; None: answer at once, and take a
    place in line when no slot is free."""


class SlotGrant(BaseModel):
    """Output of ``acquire_job_slot``."""

    granted: bool
    blocked_by: Literal["tenant", "user"] | None = None
    """The limit that is full when ``granted`` is False."""
    limit: int = 0
    """Running jobs that limit allows."""
    ahead: int = 0
    """Jobs in line before this one."""
    degraded: bool = False
    """Granted without a check because the limit store could not be reached."""


class SlotRelease(BaseModel):
    """Input of ``release_job_slot``: the calling job gives its slot back (idempotent)."""

    tenant: str
    user: str
