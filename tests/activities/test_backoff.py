"""Jittered retry backoff: the delays it draws, and what the interceptor does to each failure."""

from __future__ import annotations

import dataclasses
import random
from datetime import timedelta
from typing import Any, cast

import pytest
from temporalio.common import RetryPolicy
from temporalio.exceptions import ApplicationError, CancelledError
from temporalio.testing import ActivityEnvironment
from temporalio.worker import ActivityInboundInterceptor, ExecuteActivityInput

from keel.activities import errors
from keel.activities._backoff import JitteredBackoff, jittered_delay

POLICY = RetryPolicy(
    initial_interval=timedelta(milliseconds=500),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=30),
    maximum_attempts=10,
)


def draws(attempt: int, policy: RetryPolicy | None, asked: timedelta | None = None) -> list[float]:
    rng = random.Random(attempt)
    return [jittered_delay(attempt, policy, asked, rng).total_seconds() for _ in range(200)]


@pytest.mark.parametrize(
    ("attempt", "low", "high"),
    [(1, 0.25, 0.5), (2, 0.5, 1.0), (4, 2.0, 4.0), (7, 15.0, 30.0), (20, 15.0, 30.0)],
)
def test_delays_fill_the_upper_half_of_the_policy_interval(
    attempt: int, low: float, high: float
) -> None:
    seen = draws(attempt, POLICY)
    assert all(low <= d <= high for d in seen)
    assert max(seen) - min(seen) > (high - low) / 2  # spread out, not one value


def test_retry_after_is_a_floor_stretched_by_a_fifth_at_most() -> None:
    seen = draws(3, POLICY, timedelta(seconds=7))
    assert all(7.0 <= d <= 8.4 for d in seen) and max(seen) - min(seen) > 0.7


def test_no_policy_means_the_servers_default() -> None:
    assert all(0.5 <= d <= 1.0 for d in draws(1, None))  # 1 s initial
    assert all(50.0 <= d <= 100.0 for d in draws(12, None))  # 100 s ceiling


class Raising(ActivityInboundInterceptor):
    """The rest of the chain: an activity that fails with ``error``."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(cast(ActivityInboundInterceptor, None))
        self.error = error

    async def execute_activity(self, input: ExecuteActivityInput) -> Any:
        raise self.error


async def intercepted(error: BaseException, attempt: int = 3) -> BaseException:
    """What the jittering interceptor raises when the activity raises ``error``."""
    env = ActivityEnvironment()
    env.info = dataclasses.replace(env.info, attempt=attempt, retry_policy=POLICY)
    chain = JitteredBackoff().intercept_activity(Raising(error))

    async def run() -> None:
        await chain.execute_activity(cast(ExecuteActivityInput, None))

    with pytest.raises(BaseException) as raised:
        await env.run(run)
    return raised.value


async def test_a_retryable_failure_keeps_its_type_and_message_and_gains_a_delay() -> None:
    cause = ConnectionResetError("peer went away")
    error = ApplicationError("HTTP 503: overloaded", "detail", type=errors.LLM_TRANSIENT)
    error.__cause__ = cause
    out = await intercepted(error, attempt=3)
    assert isinstance(out, ApplicationError)
    assert out.type == errors.LLM_TRANSIENT and out.message == "HTTP 503: overloaded"
    assert list(out.details) == ["detail"] and not out.non_retryable
    assert out.next_retry_delay is not None
    assert timedelta(seconds=1) <= out.next_retry_delay <= timedelta(seconds=2)
    assert out.__cause__ is cause and out.__traceback__ is not None


async def test_retry_after_stays_a_floor() -> None:
    asked = ApplicationError(
        "HTTP 429", type=errors.LLM_RATE_LIMITED, next_retry_delay=timedelta(seconds=7)
    )
    out = await intercepted(asked)
    assert isinstance(out, ApplicationError) and out.next_retry_delay is not None
    assert timedelta(seconds=7) <= out.next_retry_delay <= timedelta(seconds=8.4)


async def test_any_other_exception_is_reported_as_before_with_a_delay() -> None:
    out = await intercepted(ConnectionError("Redis refused the connection"), attempt=1)
    assert isinstance(out, ApplicationError) and out.type == "ConnectionError"
    assert out.message == "Redis refused the connection" and not out.non_retryable
    assert out.next_retry_delay is not None
    assert timedelta(milliseconds=250) <= out.next_retry_delay <= timedelta(milliseconds=500)


@pytest.mark.parametrize(
    "error",
    [
        ApplicationError("bad args", type=errors.TOOL_INPUT_INVALID, non_retryable=True),
        CancelledError("cancelled"),
    ],
)
async def test_final_failures_and_temporals_own_pass_untouched(error: Exception) -> None:
    assert await intercepted(error) is error
