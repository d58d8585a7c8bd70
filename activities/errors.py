"""Error types and the one place vendor and HTTP failures are classified.

Temporal owns retries, so every failure an activity raises is an ``ApplicationError`` whose
``type`` is one of the constants below and whose ``non_retryable`` flag says whether another
attempt can help. The flag is set where the error is raised, not listed in the retry policies
(``workflows/policies.py`` says why). Workflows refer to these constants, never to literals.

Not workflow code; imports nothing non-deterministic at module level. Workflows import the
constants, and the client imports the workflows, so the ``openai`` SDK is imported only inside
the helpers that classify its errors: by the time they run, the worker has built its client.
"""

from __future__ import annotations

import contextlib
import email.utils
import re
import time
from collections.abc import Iterable, Iterator
from datetime import timedelta
from typing import TYPE_CHECKING

from temporalio.exceptions import ApplicationError

if TYPE_CHECKING:
    import openai

# Retryable: the same request may succeed later.
LLM_TRANSIENT = "LLMTransient"
"""Timeout, connection failure or 5xx from the model endpoint."""
LLM_RATE_LIMITED = "LLMRateLimited"
"""429 (or 408/409) from the model endpoint; the next attempt waits for Retry-After."""
TOOL_TRANSIENT = "ToolTransient"
"""A tool's dependency timed out, refused the connection or answered 5xx/429."""

# Non-retryable: repeating the same request cannot help.
LLM_REJECTED = "LLMRequestRejected"
"""The endpoint refused the request itself (400, 404, 422 ...): wrong model name, bad schema."""
LLM_AUTH = "LLMAuthFailed"
"""401/403: the API key is missing, wrong or lacks permission."""
TOOL_NOT_ALLOWED = "ToolNotAllowed"
"""The model asked for a tool outside the job's allow-list."""
TOOL_NOT_FOUND = "ToolNotFound"
"""No tool of that name is registered on the worker."""
TOOL_INPUT_INVALID = "ToolInputInvalid"
"""Tool arguments failed the tool's schema."""
TOOL_PERMISSION = "ToolPermissionDenied"
"""The tool refused on policy, such as an HTTP host outside the allow-list."""
TOOL_FAILED = "ToolFailed"
"""The tool ran and failed for a reason a retry cannot fix (division by zero, a 404)."""
DOCS_NOT_FOUND = "DocsNotFound"
"""The job's document folder, or its named corpus, does not exist for this tenant."""
WEBHOOK_REFUSED = "WebhookRefused"
"""A callback URL off the tenant's allow-list, or a tenant without a webhook secret."""
WEBHOOK_FAILED = "WebhookFailed"
"""The receiver did not take the delivery (retried for timeouts, 408, 429 and 5xx)."""
CORPUS_TOO_LARGE = "CorpusTooLarge"
"""The documents are over the index's bounds (files, bytes): no retry makes them smaller."""
REF_NOT_OWNED = "StoredOutputNotOwned"
"""A stored-output ref that is not one of the calling job's own blobs (issue 13): only a crafted
input carries one, and no retry makes it the job's."""

LIMIT_WAIT_EXCEEDED = "LimitWaitExceeded"
"""A model's or tool's fleet-wide limit would hold the call past LIMIT_WAIT_SECONDS: retryable,
with the wait the limiter named as the next retry delay."""
JOB_SLOT_UNAVAILABLE = "JobSlotUnavailable"
"""No running-job slot of the tenant or user freed within JOB_SLOT_MAX_WAIT (non-retryable)."""

BUDGET_EXHAUSTED = "BudgetExhausted"
"""An LLM call could not be paid for from the dollars the job has left (non-retryable)."""

# Raised by the workflow itself.
BAD_MODEL_OUTPUT = "BadModelOutput"
"""The model kept returning output that failed validation after corrective steps."""
INVALID_CARRIED_STATE = "InvalidCarriedState"
"""The state a run was started with is not one Keel could have carried (issue 13): a negative
counter, a clock or wait that would add budget back, or a ref to another job's stored output."""

_MAX_RETRY_AFTER = 300.0

REDACTED = "[redacted]"
_MIN_SECRET_CHARS = 8
_KEY_SHAPED = re.compile(
    r"\b(?:sk|rk|pk)-[A-Za-z0-9_*-]{6,}"  # OpenAI-style keys, whole or masked as in a 401
    r"|\b[Bb]earer\s+[A-Za-z0-9._~+/=-]{6,}"  # an echoed Authorization header
)


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with each of ``secrets`` and anything shaped like an API key replaced.

    Error messages from a vendor or a remote server become activity failures, which Temporal
    records in history and the worker logs; some endpoints echo the key they were sent (OpenAI
    echoes a masked one on 401), so nothing of it may pass through.

    Args:
        text: Untrusted text on its way to history or a log.
        secrets: Exact values to remove (the worker's own keys). Values under 8 characters are
            not keys anyone could use, and replacing them would shred ordinary words.

    Returns:
        The text with every match replaced by ``[redacted]``.
    """
    for secret in secrets:
        if len(secret) >= _MIN_SECRET_CHARS:
            text = text.replace(secret, REDACTED)
    return _KEY_SHAPED.sub(REDACTED, text)


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP date), capped at 300 s.

    Args:
        value: The raw header value, or None.

    Returns:
        Seconds to wait, or None when the header is absent or unreadable.
    """
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            parsed = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = parsed.timestamp() - time.time()
    return max(0.0, min(seconds, _MAX_RETRY_AFTER))


def classify_http_status(
    status: int,
    message: str,
    *,
    retry_after: str | None = None,
    secrets: Iterable[str] = (),
    transient_type: str,
    rate_limited_type: str,
    rejected_type: str,
    auth_type: str,
) -> ApplicationError:
    """Map an HTTP status to an ApplicationError with the right retry semantics.

    408, 409, 429 and 5xx are retryable (429 carries ``next_retry_delay`` from Retry-After);
    401 and 403 are auth failures; every other 4xx is a rejected request. All non-retryable.

    Args:
        status: The HTTP status code.
        message: Human-readable detail from the other side; redacted here (see ``redact``).
        retry_after: The Retry-After header, if any.
        secrets: The caller's own keys, removed from ``message`` wherever they appear.
        transient_type: Error type for 5xx.
        rate_limited_type: Error type for 408/409/429.
        rejected_type: Error type for other 4xx.
        auth_type: Error type for 401/403.

    Returns:
        The error to raise.
    """
    detail = f"HTTP {status}: {redact(message, secrets)}"[:500]
    if status in (408, 409, 429):
        delay = parse_retry_after(retry_after)
        return ApplicationError(
            detail,
            type=rate_limited_type,
            next_retry_delay=timedelta(seconds=delay) if delay is not None else None,
        )
    if status >= 500:
        return ApplicationError(detail, type=transient_type)
    if status in (401, 403):
        return ApplicationError(detail, type=auth_type, non_retryable=True)
    return ApplicationError(detail, type=rejected_type, non_retryable=True)


def from_openai(err: openai.OpenAIError, secrets: Iterable[str] = ()) -> ApplicationError:
    """Classify an error from the ``openai`` client (the one helper for that provider).

    Args:
        err: What the client raised.
        secrets: The client's API key (and any other), kept out of the message.

    Returns:
        The ApplicationError to raise from the activity.
    """
    import openai  # Deferred: see the module docstring.

    if isinstance(err, openai.APIStatusError):
        return classify_http_status(
            err.status_code,
            err.message,
            retry_after=err.response.headers.get("retry-after"),
            secrets=secrets,
            transient_type=LLM_TRANSIENT,
            rate_limited_type=LLM_RATE_LIMITED,
            rejected_type=LLM_REJECTED,
            auth_type=LLM_AUTH,
        )
    if isinstance(err, openai.APITimeoutError):
        return ApplicationError("model request timed out", type=LLM_TRANSIENT)
    if isinstance(err, openai.APIConnectionError):
        return ApplicationError(
            f"cannot reach the model endpoint: {redact(str(err), secrets)}", type=LLM_TRANSIENT
        )
    if isinstance(err, openai.APIError):
        # The endpoint took the request and then failed it in the body: an error event in
        # place of the rest of a streamed reply, or a reply of the wrong shape. The request
        # itself was accepted, so another attempt can succeed.
        return ApplicationError(
            f"the model endpoint failed mid-reply: {redact(err.message, secrets)}"[:500],
            type=LLM_TRANSIENT,
        )
    return ApplicationError(
        f"{type(err).__name__}: {redact(str(err), secrets)}"[:500],
        type=LLM_REJECTED,
        non_retryable=True,
    )


@contextlib.contextmanager
def classifying_openai_errors(secrets: Iterable[str] = ()) -> Iterator[None]:
    """Re-raise whatever the ``openai`` client raises in the block as ``from_openai`` classifies it.

    Args:
        secrets: The client's API key (and any other), kept out of the message.

    Yields:
        Nothing; wrap the client call in ``with``.

    Raises:
        ApplicationError: The classified error, retryable or not, in place of the SDK's.
    """
    import openai  # Deferred: see the module docstring.

    try:
        yield
    except openai.OpenAIError as err:
        raise from_openai(err, secrets) from None
