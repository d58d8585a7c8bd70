"""Payloads of a session (issue 15): its request, budgets, messages, turns, status.

A session is one ``SessionWorkflow`` per tenant and session key that owns a conversation and
runs each user message as a turn: a child agent job. Depends only on pydantic and the shared
types; deterministic. Wire contract: recorded in history; add optional fields only.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from keel.activities.types import CONVERSATION_SUMMARY_CHARS, Conversation, Exchange, TierName
from keel.workflows.types import (
    MAX_GOAL_CHARS,
    Budget,
    BudgetName,
    Identifier,
    JobUsage,
    Outcome,
)

SESSION_ID_PREFIX = "agent-session-"
MAX_RECENT_EXCHANGES = 3
SUMMARY_CHARS = 480
"""Default longest conversation summary (about 80 words): with the recent exchanges verbatim,
enough for the facts a later turn refers back to, and small enough that the context sent per
turn is flat once the first turns have been folded (issue 15's target: turn 500 within 1.2x of
turn 5)."""
"""Earlier turns passed verbatim to each turn; older ones live in the rolling summary."""
MAX_TURN_RECORDS = 20
"""Turns kept in the session's state and status; older ones are in the Temporal UI."""
MAX_SEEN_MESSAGES = 500
"""Message IDs remembered for deduplication (the newest); a resend older than that is new."""
MAX_QUEUED = 50
"""Messages a session holds waiting for their turn; more are refused until it catches up."""

# Why a session refuses a message: its validator's ``ApplicationError.type`` (issue 15). Kept
# here, beside the payloads, not in ``activities/errors.py``: the client maps them onto
# ``SessionRefused`` and must not import that module (it loads the model SDK). Never in
# history: a rejected update records nothing.
SESSION_ENDED = "SessionEnded"
"""The session has ended (or is ending): it takes no more messages."""
SESSION_BUDGET_EXHAUSTED = "SessionBudgetExhausted"
"""A session budget is used up; the failure's first detail names it (``max_cost_usd`` ...)."""
SESSION_BUSY = "SessionBusy"
"""The session already holds its most queued messages; sending later can succeed."""

SessionBudgetName = Literal["max_turns", "max_tokens", "max_cost_usd"]
SessionPhase = Literal["idle", "running", "exhausted", "ending", "ended"]


def session_id_for(tenant: str, session_key: str) -> str:
    """The workflow ID of ``tenant``'s session ``session_key``: ``agent-session-{t}:{key}``."""
    return f"{SESSION_ID_PREFIX}{tenant}:{session_key}"


def session_key_of(session_id: str) -> str:
    """The caller's key in a session ID (what follows the tenant)."""
    return session_id.split(":", 1)[-1]


def turn_job_id(session_id: str, turn: int) -> str:
    """The job ID of a session's turn: the session's ID with the turn number, never reused."""
    return f"{session_id.replace(SESSION_ID_PREFIX, 'agent-job-', 1)}.t{turn}"


class SessionBudget(BaseModel):
    """Limits across the whole session; checked before each turn starts."""

    model_config = ConfigDict(extra="forbid")

    max_turns: int = Field(default=200, gt=0, le=100_000)
    max_tokens: int = Field(default=5_000_000, gt=0, le=10_000_000_000)
    """Tokens of every turn and every summary call together."""
    max_cost_usd: float = Field(default=20.0, gt=0, le=1_000_000, allow_inf_nan=False)
    idle_timeout_seconds: float = Field(default=86_400.0, gt=0, le=30 * 86_400, allow_inf_nan=False)
    """A session with no message for this long ends; its stored outputs then expire."""


class SessionRequest(BaseModel):
    """What a caller opens a session with; every turn inherits the job fields."""

    model_config = ConfigDict(extra="forbid")

    tenant: Identifier = "default"
    user: Identifier = "anonymous"
    tools: list[Identifier] = Field(default_factory=lambda: ["calculator", "write_note"])
    docs_dir: str | None = Field(default=None, max_length=4096)
    budget: SessionBudget = Field(default_factory=SessionBudget)
    turn_budget: Budget = Field(default_factory=Budget)
    """Each turn's own budget; a turn gets less when the session has less left."""
    tier: Literal["auto", "fast", "deep"] = "auto"
    cache: bool = True
    mode: Literal["interactive", "batch"] = "interactive"
    summary_chars: int = Field(default=SUMMARY_CHARS, ge=200, le=CONVERSATION_SUMMARY_CHARS)
    """Longest summary of the turns older than the recent ones, in characters."""


class SessionMessage(BaseModel):
    """One user message; ``message_id`` makes a resend a no-op."""

    model_config = ConfigDict(extra="forbid")

    message_id: Identifier
    text: str = Field(min_length=1, max_length=MAX_GOAL_CHARS)

    @field_validator("text")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be blank")
        return value


class TurnRecord(BaseModel):
    """One turn as the session remembers it."""

    turn: int
    message_id: str
    job_id: str
    text: str
    """The message, cut to ``EXCHANGE_CHARS``."""
    state: Literal["queued", "running", "waiting_for_input", "done"] = "queued"
    outcome: Outcome | None = None
    answer: str | None = None
    usage: JobUsage | None = None


class TurnAccepted(BaseModel):
    """What sending a message returns: its turn (the first send's, for a resend)."""

    session_id: str
    turn: int
    job_id: str
    message_id: str
    ahead: int = 0
    """Turns that run before this one (0: it runs next, or is running)."""
    duplicate: bool = False
    """True when this message ID was sent before: nothing new was queued."""


class SessionUsage(BaseModel):
    """What a session has consumed across its turns and summaries."""

    turns: int = 0
    tokens: int = 0
    cost_usd: float = 0.0


class SessionState(BaseModel):
    """The whole state of a session; the one thing carried across continue-as-new."""

    phase: SessionPhase = "idle"
    exhausted_budget: SessionBudgetName | None = None
    conversation: Conversation = Field(default_factory=Conversation)
    turns: list[TurnRecord] = Field(default_factory=list)
    """The last ``MAX_TURN_RECORDS`` turns, queued ones included."""
    next_turn: int = 1
    seen: dict[str, int] = Field(default_factory=dict)
    """Message ID to turn number, the newest ``MAX_SEEN_MESSAGES``."""
    pending: list[SessionMessage] = Field(default_factory=list)
    """Accepted messages waiting for their turn, oldest first."""
    usage: SessionUsage = Field(default_factory=SessionUsage)
    last_message_at: datetime | None = None
    runs: int = 1


class SessionInput(BaseModel):
    """Workflow input: the request, and the state when continuing as new."""

    request: SessionRequest
    state: SessionState | None = None
    job_slot: bool = False
    """Turns take running-job slots (a concurrency limit covers the tenant or user)."""


class SessionStatus(BaseModel):
    """A snapshot of a session, returned by its ``get_session`` query."""

    session_id: str
    tenant: str
    phase: SessionPhase
    exhausted_budget: SessionBudgetName | None = None
    budget: SessionBudget
    usage: SessionUsage
    summary: str = ""
    recent: list[Exchange] = Field(default_factory=list)
    turns: list[TurnRecord] = Field(default_factory=list)
    queued: int = 0
    runs: int = 1
    tier: TierName | None = None


__all__ = [
    "MAX_RECENT_EXCHANGES",
    "SESSION_ID_PREFIX",
    "BudgetName",
    "SessionBudget",
    "SessionInput",
    "SessionMessage",
    "SessionRequest",
    "SessionState",
    "SessionStatus",
    "TurnAccepted",
    "TurnRecord",
    "session_id_for",
    "turn_job_id",
]
