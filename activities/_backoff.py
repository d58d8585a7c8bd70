"""Jittered retry backoff for every activity: a worker interceptor.

Temporal's server computes an activity's next retry interval deterministically
(``initial_interval * backoff_coefficient ** (attempt - 1)``, capped at ``maximum_interval``), so
jobs that fail together, say when a provider answers 503 to everyone at once, retry together
and hit it again in lockstep. A retryable failure may carry its own ``next_retry_delay``, which
the server uses instead; this interceptor sets one on every retryable failure an activity
raises: a random point in the upper half of the policy's interval ("equal jitter", so the
backoff still grows), or just after the endpoint's ``Retry-After`` when the error carries one.

Not workflow code: it draws from ``random``. The attempt count, the timeouts and the retry
policy's ``maximum_attempts`` are untouched; only when the next attempt starts changes.
"""

from __future__ import annotations

import random
from datetime import timedelta
from typing import Any

from temporalio import activity
from temporalio.common import RetryPolicy
from temporalio.exceptions import ApplicationError, ApplicationErrorCategory, FailureError
from temporalio.worker import (
    ActivityInboundInterceptor,
    ExecuteActivityInput,
    Interceptor,
)

__all__ = ["JitteredBackoff", "jittered_delay"]

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
            raise _delayed(err, err.type, err.next_retry_delay) from err.__cause__
        except FailureError:
            raise  # Temporal's own outcomes (a cancellation, say) pass untouched.
        except Exception as err:
            # What the SDK would report anyway (the class name as the type), plus the delay.
            raise _delayed(err, type(err).__name__, None) from err.__cause__


def _delayed(err: Exception, type_: str | None, asked: timedelta | None) -> ApplicationError:
    info = activity.info()
    delay = jittered_delay(info.attempt, info.retry_policy, asked)
    if isinstance(err, ApplicationError):
        message, details, category = err.message, err.details, err.category
    else:
        message, details, category = str(err), (), ApplicationErrorCategory.UNSPECIFIED
    replacement = ApplicationError(
        message, *details, type=type_, next_retry_delay=delay, category=category
    )
    return replacement.with_traceback(err.__traceback__)
