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
import errno
import re
import time
import traceback
from collections.abc import Iterable, Iterator
from datetime import timedelta
from pathlib import PurePath
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

UNEXPECTED_ERROR = "UnexpectedError"
"""An exception no helper classified (a bug, a library's surprise): retryable for the first
UNEXPECTED_MAX_ATTEMPTS - 1 attempts, then non-retryable. History gets its class, where it was
raised and its class's description, never its text; the worker's log has the traceback."""
UNEXPECTED_MAX_ATTEMPTS = 3
"""Attempts an unclassified exception may use: a bug fails the same way every time, so more
attempts only delay the job, while a one-off surprise still gets a second and third chance."""
DEPENDENCY_TRANSIENT = "DependencyTransient"
"""A connection to Redis or another service failed or timed out outside the helpers that
classify such errors (the store's writes, say): retryable as far as the activity's policy
allows, since a short outage rides out on those retries (tests/workers/test_durability.py)."""

LIMIT_WAIT_EXCEEDED = "LimitWaitExceeded"
"""A model's or tool's fleet-wide limit would hold the call past LIMIT_WAIT_SECONDS: retryable,
with the wait the limiter named as the next retry delay."""
JOB_SLOT_UNAVAILABLE = "JobSlotUnavailable"
"""No running-job slot of the tenant or user freed within JOB_SLOT_MAX_WAIT (non-retryable)."""

CIRCUIT_OPEN = "CircuitOpen"
"""Non-retryable: the call's circuit breaker is open (issue 16) and there is no fallback; the
workflow moves the call to the next tier, or a tool's step to proceeding without it."""
BUDGET_EXHAUSTED = "BudgetExhausted"
"""An LLM call could not be paid for from the dollars the job has left (non-retryable)."""
LLM_RESPONSE_TOO_LARGE = "LLMResponseTooLarge"
"""Non-retryable: the endpoint's reply (body or streamed text) ran past MAX_LLM_RESPONSE_CHARS,
far more than any completion within the call's max_tokens; the same request would get the same
reply, and a reply that large cannot travel through history anyway."""

# The payload codec's error types (PayloadTooLarge, PayloadKeyUnknown, PayloadTampered) are
# defined in ``activities/encryption.py``: the codec runs on the client path, which must not
# import this module (its helpers import ``openai``).

# Raised by the workflow itself.
BAD_MODEL_OUTPUT = "BadModelOutput"
"""The model kept returning output that failed validation after corrective steps."""
INVALID_CARRIED_STATE = "InvalidCarriedState"
"""The state a run was started with is not one Keel could have carried (issue 13): a negative
counter, a clock or wait that would add budget back, or a ref to another job's stored output."""

_MAX_RETRY_AFTER = 300.0

MAX_MESSAGE_CHARS = 500
"""Most characters of an error message built from foreign text (a vendor's reply, a remote
server's reason, a tool's exception): failures are recorded in history, shown by the UI and
logged, and a message quoting a whole reply would make each of them as large as the reply."""
MAX_LLM_RESPONSE_CHARS = 1024 * 1024
"""Most characters of one model reply (its raw body, or its streamed text) the model gateway
reads: a completion within any ``max_tokens`` Keel asks for is far smaller (16k tokens are about
64 KB), and a reply of this size still fits well inside Temporal's 2 MB payload limit."""

REDACTED = "[redacted]"
_MIN_SECRET_CHARS = 8
_KEY_SHAPED = re.compile(
    r"\b(?:sk|rk|pk)-[A-Za-z0-9_*-]{6,}"  # OpenAI-style keys, whole or masked as in a 401
    r"|\b[Bb]earer\s+[A-Za-z0-9._~+/=-]{6,}"  # an echoed Authorization header
    r"|(?<=://)[^\s/@]+(?=@)"  # a URL's user and password (redis://:pass@host)
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


def bounded(message: str, limit: int = MAX_MESSAGE_CHARS, secrets: Iterable[str] = ()) -> str:
    """``message`` redacted (see ``redact``) and cut to at most ``limit`` characters.

    Use it wherever an ``ApplicationError`` message quotes text Keel did not write: a vendor's
    error body, a remote server's reason, an exception's text. A cut message ends in ``…`` and
    says how long it was, so a reader knows it is not whole.

    Args:
        message: The message, possibly quoting foreign text.
        limit: The most characters the result may have (at least 40).
        secrets: Exact values to remove, as ``redact`` takes them.

    Returns:
        The redacted message, whole when it fits, else its start and ``… (N chars)``.
    """
    text = redact(message, secrets)
    if len(text) <= limit:
        return text
    tail = f"… ({len(text)} chars)"
    return text[: max(0, limit - len(tail))] + tail


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
    detail = bounded(f"HTTP {status}: {message}", secrets=secrets)
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
            bounded(f"cannot reach the model endpoint: {err}", secrets=secrets), type=LLM_TRANSIENT
        )
    if isinstance(err, openai.APIError):
        # The endpoint took the request and then failed it in the body: an error event in
        # place of the rest of a streamed reply, or a reply of the wrong shape. The request
        # itself was accepted, so another attempt can succeed.
        return ApplicationError(
            bounded(f"the model endpoint failed mid-reply: {err.message}", secrets=secrets),
            type=LLM_TRANSIENT,
        )
    return ApplicationError(
        bounded(f"{type(err).__name__}: {err}", secrets=secrets),
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


def unclassified(err: Exception, attempt: int) -> ApplicationError:
    """Classify an exception that reached the worker's edge without a classifying helper.

    Connection failures and timeouts (Redis, HTTP, sockets) are ``DEPENDENCY_TRANSIENT`` and
    retryable within the activity's policy; anything else is ``UNEXPECTED_ERROR``, retryable
    until attempt UNEXPECTED_MAX_ATTEMPTS and non-retryable from then on. The message never
    carries the exception's text, which may hold anything the failing code had in hand (a key
    it looked up, a URL with a password); it names the class, where it was raised and what the
    class's own docstring says it means, all of them code, not data.

    Args:
        err: What the activity raised; neither an ``ApplicationError`` nor Temporal's own.
        attempt: The activity's attempt that raised it (1 for the first).

    Returns:
        The ApplicationError to raise in its place (with no cause: the cause's text would
        reach history too).
    """
    if _is_dependency_failure(err):
        return ApplicationError(describe(err), type=DEPENDENCY_TRANSIENT)
    return ApplicationError(
        describe(err),
        type=UNEXPECTED_ERROR,
        non_retryable=attempt >= UNEXPECTED_MAX_ATTEMPTS,
    )


def describe(err: BaseException) -> str:
    """A secret-free one-line description of an exception, without its text.

    Args:
        err: The exception.

    Returns:
        For example ``KeyError raised at tools/notes.py:31 in __call__: Mapping key not found.``
    """
    cls = type(err)
    name = cls.__qualname__
    if cls.__module__ != "builtins":
        name = f"{cls.__module__}.{name}"
    if isinstance(err, OSError) and isinstance(err.errno, int) and err.errno in errno.errorcode:
        name = f"{name} [{errno.errorcode[err.errno]}]"
    text = f"{name} raised at {_raised_at(err)}"
    # The nearest docstring of the class or a base more specific than Exception says what the
    # class means ("Mapping key not found."); Exception's own says nothing about the failure.
    generic = (Exception, BaseException, object)
    doc = next((c.__doc__ for c in cls.__mro__ if c not in generic and c.__doc__), None)
    if doc and doc.strip():
        text = f"{text}: {doc.strip().splitlines()[0][:120]}"
    return redact(text)[:300]


def _raised_at(err: BaseException) -> str:
    """``folder/file.py:line in function`` of the frame that raised ``err``, or ``unknown``."""
    last = None
    for frame, line in traceback.walk_tb(err.__traceback__):
        last = (frame.f_code.co_filename, line, frame.f_code.co_name)
    if last is None:
        return "unknown"
    path, line, function = last
    # The last two parts of the path say which module it was without the install location.
    return f"{'/'.join(PurePath(path).parts[-2:])}:{line} in {function}"


def _is_dependency_failure(err: Exception) -> bool:
    """True for a connection failure or timeout of Redis, HTTP or a socket."""
    # Deferred like ``openai``: the client imports this module, and only workers classify.
    import httpx
    import redis.exceptions

    transient = (
        ConnectionError,
        TimeoutError,
        redis.exceptions.ConnectionError,
        redis.exceptions.TimeoutError,
        httpx.TransportError,
    )
    return isinstance(err, transient)
