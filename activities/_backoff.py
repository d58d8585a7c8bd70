"""Jittered retry backoff for every activity, and classification of what no helper classified.

Temporal's server computes an activity's next retry interval deterministically
(``initial_interval * backoff_coefficient ** (attempt - 1)``, capped at ``maximum_interval``), so
jobs that fail together, say when a provider answers 503 to everyone at once, retry together
and hit it again in lockstep. A retryable failure may carry its own ``next_retry_delay``, which
the server uses instead; this interceptor sets one on every retryable failure an activity
raises: a random point in the upper half of the policy's interval ("equal jitter", so the
backoff still grows), or just after the endpoint's ``Retry-After`` when the error carries one.

Not workflow code: it draws from ``random``. The attempt count, the timeouts and the retry
policy's ``maximum_attempts`` are untouched; only when the next attempt starts changes.

The same interceptor is where an exception that is neither an ``ApplicationError`` nor one of
Temporal's own leaves the activity: ``errors.unclassified`` turns it into a typed error whose
message holds no text of the exception's (bounded to a few attempts unless it is a connection
failure or timeout), and the redacted traceback goes to the worker's log with the job's ID,
never to history.
"""

from __future__ import annotations

import random
import traceback
from datetime import timedelta
from typing import Any

import structlog
from temporalio import activity
from temporalio.common import RetryPolicy
from temporalio.exceptions import ApplicationError, FailureError
from temporalio.worker import (
    ActivityInboundInterceptor,
    ExecuteActivityInput,
    Interceptor,
)

from keel.activities.errors import redact, unclassified

__all__ = ["JitteredBackoff", "jittered_delay"]

_log = structlog.get_logger(__name__)

_SERVER_DEFAULT = RetryPolicy()
"""What the server assumes for a policy the call did not set (1 s, doubling, 100 s at most)."""
RETRY_AFTER_SPREAD = 0.2
"""A delay the endpoint asked for (Retry-After) is stretched by up to this fraction, never cut."""


def jittered_delay(
    attempt: int,
    policy: RetryPolicy | None,
    asked: timedelta | None = None,
    rng: random.Random | None = None,
) -> timedelta:
    """The wait before the attempt after ``attempt``.

    Args:
        attempt: The attempt that just failed (1 for the first).
        policy: The activity's retry policy, as the server applies it.
        asked: A delay the failure asked for (an endpoint's Retry-After), honoured as a minimum.
        rng: Where randomness comes from; the ``random`` module's generator by default.

    Returns:
        A uniform draw from the upper half of the policy's interval for this attempt, or from
        ``[asked, asked * 1.2]`` when a delay was asked for.
    """
    draw = rng.uniform if rng is not None else random.uniform
    if asked is not None:
        seconds = asked.total_seconds()
        return timedelta(seconds=draw(seconds, seconds * (1 + RETRY_AFTER_SPREAD)))
    policy = policy or _SERVER_DEFAULT
    initial = policy.initial_interval.total_seconds()
    ceiling = policy.maximum_interval.total_seconds() if policy.maximum_interval else 100 * initial
    base = min(ceiling, initial * policy.backoff_coefficient ** max(0, attempt - 1))
    return timedelta(seconds=draw(base / 2, base))


class JitteredBackoff(Interceptor):
    """Register on a worker (``interceptors=[JitteredBackoff()]``) to jitter every retry."""

    def intercept_activity(self, next: ActivityInboundInterceptor) -> ActivityInboundInterceptor:
        """Wrap each activity execution.

        Args:
            next: The rest of the chain.

        Returns:
            The interceptor that adds the delay.
        """
        return _Inbound(next)


class _Inbound(ActivityInboundInterceptor):
    async def execute_activity(self, input: ExecuteActivityInput) -> Any:
        try:
            return await super().execute_activity(input)
        except ApplicationError as err:
            if err.non_retryable:
                raise
            raise _delayed(err, err.next_retry_delay) from err.__cause__
        except FailureError:
            raise  # Temporal's own outcomes (a cancellation, say) pass untouched.
        except Exception as err:
            classified = _unclassified(err)
            if classified.non_retryable:
                raise classified from None
            raise _delayed(classified, None) from None


def _unclassified(err: Exception) -> ApplicationError:
    """Classify ``err`` and log it in full (redacted): its text stays out of history."""
    info = activity.info()
    classified = unclassified(err, info.attempt)
    # A warning while it is retried (a Redis blip logs one per attempt), an error once final.
    (_log.error if classified.non_retryable else _log.warning)(
        "activity.unclassified_error",
        job_id=info.workflow_id,
        activity=info.activity_type,
        attempt=info.attempt,
        error_type=classified.type,
        error=classified.message,
        retrying=not classified.non_retryable,
        traceback=redact("".join(traceback.format_exception(err))),
    )
    return classified


def _delayed(err: ApplicationError, asked: timedelta | None) -> ApplicationError:
    info = activity.info()
    delay = jittered_delay(info.attempt, info.retry_policy, asked)
    replacement = ApplicationError(
        err.message, *err.details, type=err.type, next_retry_delay=delay, category=err.category
    )
    return replacement.with_traceback(err.__traceback__)
