"""The HTTP API's request and response bodies: what callers send and get, not workflow payloads.

``JobCreate`` is what a caller may choose about a job. What the key decides (tenant, user) and
what only operators of the worker may decide (folders on the worker's disk, which workflow to
signal) is not in it: webhooks replace ``notify_workflow`` for API callers, and named corpora
replace ``docs_dir`` (issue 13). ``SessionCreate`` is the same for a session (issue 15): its
turns are jobs, so what a job may not choose, a session may not either.
"""

from __future__ import annotations

from typing import Annotated, Literal
from urllib.parse import quote, urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StringConstraints,
    ValidationError,
    field_validator,
)

from keel.activities.corpora import CORPUS_PREFIX
from keel.client._validation import validate_request
from keel.client.errors import InvalidJobRequest
from keel.workflows.session_types import SessionBudget, SessionRequest, TurnAccepted
from keel.workflows.types import IDENT_RE, MAX_GOAL_CHARS, Budget, JobRequest, JobResult

__all__ = [
    "AnswerIn",
    "CancelAccepted",
    "ErrorDetail",
    "ErrorResponse",
    "InputAck",
    "JobAccepted",
    "JobCreate",
    "MessageAccepted",
    "MessageIn",
    "Readiness",
    "SessionCreate",
    "SessionCreated",
    "job_links",
    "session_links",
]


URL_PATTERN = "^https?://[^\\s\\x00-\\x20\\x7f-\\x9f\ufeff]+$"
"""An http(s) URL without spaces or control characters. Whitespace is spelled out because
``\\s`` differs between regex dialects (pydantic's counts U+0085, ECMAScript's U+FEFF), and a
callback URL matched by the published pattern must not then be refused here."""
Name = Annotated[str, StringConstraints(pattern=IDENT_RE.pattern)]
"""A tool's or corpus's name, as ``JobRequest`` accepts it (and as the OpenAPI shows it)."""


def _no_booleans(value: object) -> object:
    """Refuse ``true``/``false`` where a number goes (pydantic would read them as 1 and 0).

    JSON Schema's ``number`` and ``integer`` do not match a boolean, so the API refuses what its
    OpenAPI document says it refuses (schemathesis found ``"ask_timeout_seconds": true``
    accepted). Not strict mode: that would also refuse ``369.0``, which ``integer`` matches.
    """
    if isinstance(value, bool):
        raise ValueError("must be a number, not a boolean")
    return value


class BudgetIn(Budget):
    """``Budget`` as an API caller sends it: every limit a JSON number, never a boolean."""

    _numbers = field_validator("*", mode="before")(_no_booleans)


class JobCreate(BaseModel):
    """A job as an API caller submits it.

    Its constraints repeat ``JobRequest``'s, so a caller's mistake is a 422 naming the field
    and the OpenAPI document shows the rules; ``to_request`` still turns anything the
    workflow's model refuses into a 400, never a 500.
    """

    model_config = ConfigDict(extra="forbid")

    goal: str = Field(min_length=1, max_length=MAX_GOAL_CHARS)
    """What the agent should achieve."""
    tools: list[Name] | None = None
    """Tools the job may use (default: calculator, write_note)."""
    budget: BudgetIn | None = None
    """Limits; any left out take their defaults."""
    ask_timeout_seconds: float | None = Field(
        default=None, gt=0, le=30 * 86400, allow_inf_nan=False
    )
    """How long a question waits before the job assumes its default."""
    _numbers = field_validator("ask_timeout_seconds", mode="before")(_no_booleans)
    mode: Literal["interactive", "batch"] = "interactive"
    """``batch`` jobs never run ahead of interactive ones."""
    tier: Literal["auto", "fast", "deep"] = "auto"
    """The model tier to start on: ``auto`` lets the router pick. The models are the
    worker's; escalation may still move a fast job to deep."""
    cache: StrictBool = True
    """``false``: no cached response, tool result or search serves this job, and it stores
    none."""
    corpus: Name | None = Field(default=None, max_length=64)
    """A corpus the job may search (the tenant's own, or a shared one), by name."""
    callback_url: str | None = Field(default=None, max_length=2048, pattern=URL_PATTERN)
    """Webhook for the outcome, on the tenant's allow-list; signed with the tenant's secret
    (Standard Webhooks headers), the same ``webhook-id`` on every retry."""

    def to_request(self, tenant: str, user: str) -> JobRequest:
        """The workflow's request, with the tenant and user the caller's key acts as.

        Raises:
            InvalidJobRequest: If the workflow's model refuses a value (``field`` names it).
        """
        if self.callback_url is not None:
            _check_url(self.callback_url)
        fields = self.model_dump(exclude_none=True, exclude={"corpus"})
        if self.corpus is not None:
            fields["docs_dir"] = CORPUS_PREFIX + self.corpus
        try:
            return JobRequest.model_validate({**fields, "tenant": tenant, "user": user})
        except ValidationError as err:
            first = err.errors()[0]
            field = ".".join(str(part) for part in first["loc"]) or "request"
            raise InvalidJobRequest(
                "corpus" if field == "docs_dir" else field, first["msg"]
            ) from None


def _check_url(url: str) -> None:
    """Refuse a URL whose host or port cannot be read (the allow-list check splits it).

    A 400 rather than a 422: the schema's pattern cannot say which URLs parse. Found by
    schemathesis (``http://[x]/``, ``https://host:port-that-is-text``), which made a 500.

    Raises:
        InvalidJobRequest: With ``field="callback_url"``.
    """
    try:
        parts = urlsplit(url)
        _ = parts.port
    except ValueError as err:
        raise InvalidJobRequest("callback_url", f"not a URL ({err})") from None
    if not parts.hostname:
        raise InvalidJobRequest("callback_url", "the URL names no host")


class SessionBudgetIn(SessionBudget):
    """``SessionBudget`` as an API caller sends it: every limit a JSON number, never a boolean."""

    _numbers = field_validator("*", mode="before")(_no_booleans)


class SessionCreate(BaseModel):
    """A session as an API caller opens it: what every turn inherits.

    The tenant and user come from the caller's key. ``to_request`` checks the turns' fields
    as a job's (known tools, a visible corpus), so a session is refused at once rather than
    every turn failing later.
    """

    model_config = ConfigDict(extra="forbid")

    session_key: Name | None = None
    """The caller's name for the session, unique within the tenant; generated when absent.
    Opening a key that is open returns that session (with the request it was opened with);
    a key whose session has ended is not reused."""
    budget: SessionBudgetIn | None = None
    """Limits across all turns (turns, tokens, dollars, idle timeout); defaults for any left
    out."""
    turn_budget: BudgetIn | None = None
    """Each turn's own limits; a turn gets less when the session has less left."""
    tools: list[Name] | None = None
    """Tools the turns may use (default: calculator, write_note)."""
    corpus: Name | None = Field(default=None, max_length=64)
    """A corpus the turns may search (the tenant's own, or a shared one), by name."""
    mode: Literal["interactive", "batch"] = "interactive"
    """``batch`` sessions' turns never run ahead of interactive ones."""
    tier: Literal["auto", "fast", "deep"] = "auto"
    """The model tier each turn starts on; ``auto`` lets the router pick."""
    cache: StrictBool = True
    """``false``: no cached response, tool result or search serves the turns."""

    def to_request(self, tenant: str, user: str) -> SessionRequest:
        """The session's request, with the tenant and user the caller's key acts as.

        Raises:
            InvalidJobRequest: If a value is refused (``field`` names it): an unknown tool or
                corpus, or a limit the workflow's models refuse.
        """
        fields = self.model_dump(exclude_none=True, exclude={"session_key", "corpus"})
        if self.corpus is not None:
            fields["docs_dir"] = CORPUS_PREFIX + self.corpus
        turn = {k: v for k, v in fields.items() if k != "budget"}
        if "turn_budget" in turn:
            turn["budget"] = turn.pop("turn_budget")
        try:
            # A turn is a job: checked as one, with a stand-in goal, so its tools and corpus
            # are judged exactly as ``POST /v1/jobs`` judges them.
            validate_request({**turn, "goal": "(turn)", "tenant": tenant, "user": user})
            return SessionRequest.model_validate({**fields, "tenant": tenant, "user": user})
        except InvalidJobRequest as err:
            field = {"docs_dir": "corpus"}.get(err.field, err.field)
            raise InvalidJobRequest(field.replace("budget", "turn_budget", 1), err.reason) from None
        except ValidationError as err:
            first = err.errors()[0]
            field = ".".join(str(part) for part in first["loc"]) or "request"
            raise InvalidJobRequest(field, first["msg"]) from None


class SessionCreated(BaseModel):
    """An open session: a new one, or the one already open under this key."""

    session_id: str
    session_key: str
    links: dict[str, str]
    """Where to send messages, read the session and its events, and end it."""


class MessageIn(BaseModel):
    """One message to a session: the next turn, or the answer to the turn's question."""

    model_config = ConfigDict(extra="forbid")

    text: str = Field(min_length=1, max_length=MAX_GOAL_CHARS, pattern=r"\S")
    """The message; not blank."""


class MessageAccepted(TurnAccepted):
    """The message's turn (the first send's, for a repeated ``Idempotency-Key``)."""

    links: dict[str, str]
    """The turn's job: its status, result and events."""
    result: JobResult | None = None
    """The turn's outcome, when its job ended within the request's ``wait``."""


class JobAccepted(BaseModel):
    """A started (or, for a repeated ``Idempotency-Key``, found) job."""

    job_id: str
    links: dict[str, str]
    """Where to read the job, its result and events, and where to answer or cancel it."""
    result: JobResult | None = None
    """The outcome, when the job ended within the request's ``wait``."""


class AnswerIn(BaseModel):
    """An answer to the job's pending question."""

    model_config = ConfigDict(extra="forbid")

    text: str = Field(min_length=1, max_length=4000, pattern=r"\S")
    """The answer; not blank (a pattern, so the OpenAPI document says so too)."""


class WriteDecisionIn(BaseModel):
    """A person's decision on a write that requires approval (``keel approve`` / ``reject``)."""

    model_config = ConfigDict(extra="forbid")

    approve: bool
    """True: the write is made once the job's answer is verified; False: it is never made."""
    reason: str = Field(default="", max_length=500)


class InputAck(BaseModel):
    """The job recorded the answer."""

    ack: str
    """The job's acknowledgement."""


class CancelAccepted(BaseModel):
    """Cancellation was requested; the job ends ``cancelled`` with its partial result."""

    job_id: str
    status: Literal["cancellation requested"] = "cancellation requested"


class ErrorDetail(BaseModel):
    """What went wrong, with a code that stays the same across releases."""

    code: str
    """Stable and machine-readable: ``unauthorized``, ``invalid_request``, ``job_not_found``,
    ``job_running``, ``input_rejected``, ``rate_limited``, ``quota_exceeded``,
    ``concurrency_limited``, ``body_too_large``, ``not_found``, ``method_not_allowed``,
    ``temporal_unavailable``, ``redis_unavailable``, ``job_error``, ``timeout``,
    ``not_ready``; for sessions ``session_not_found``, ``session_ended``,
    ``session_budget_exhausted``, ``session_busy``, ``session_refused``."""
    message: str
    """For people; may change."""
    field: str | None = None
    """The request field at fault (``invalid_request``), dotted for nested ones."""
    limit: str | None = None
    """The rate limit that refused the request (``rate_limited``)."""
    quota: str | None = None
    """The daily quota that is used up (``quota_exceeded``)."""
    unavailable: list[str] | None = None
    """The dependencies that did not answer (``not_ready``): ``temporal``, ``redis``."""
    budget: str | None = None
    """The session budget that is used up (``session_budget_exhausted``): ``max_turns``,
    ``max_tokens`` or ``max_cost_usd``."""


class ErrorResponse(BaseModel):
    """Every error the API answers with."""

    error: ErrorDetail


class Readiness(BaseModel):
    """Both dependencies answered."""

    ok: bool
    temporal: bool
    redis: bool


def job_links(job_id: str) -> dict[str, str]:
    """The job's resources, by name."""
    base = f"/v1/jobs/{quote(job_id, safe='')}"
    return {
        "self": base,
        "result": f"{base}/result",
        "answer": f"{base}/answer",
        "cancel": f"{base}/cancel",
    }


def session_links(session_id: str) -> dict[str, str]:
    """The session's resources, by name."""
    base = f"/v1/sessions/{quote(session_id, safe='')}"
    return {"self": base, "messages": f"{base}/messages", "events": f"{base}/events"}
