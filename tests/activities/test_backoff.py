"""Jittered retry backoff: the delays it draws, and what the interceptor does to each failure.

The last test runs a real worker against the dev server: an exception no helper classified
reaches history without its text, and stops after three attempts.
"""

from __future__ import annotations

import dataclasses
import json
import random
import uuid
from datetime import timedelta
from typing import Any, cast

import pytest
from structlog.testing import capture_logs
from temporalio import activity, workflow
from temporalio.client import Client, WorkflowFailureError
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError, CancelledError
from temporalio.testing import ActivityEnvironment
from temporalio.worker import ActivityInboundInterceptor, ExecuteActivityInput, Worker

from keel.activities import errors
from keel.activities._backoff import JitteredBackoff, jittered_delay
from keel.workers.registry import INTERCEPTORS

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


async def test_a_connection_failure_is_a_dependency_error_without_its_text() -> None:
    """Retryable as far as the policy allows (a Redis blip rides out on the retries)."""
    error = ConnectionError("Redis refused redis://:hunter2-pass@10.0.0.5:6379/0")
    out = await intercepted(error, attempt=9)
    assert isinstance(out, ApplicationError) and out.type == errors.DEPENDENCY_TRANSIENT
    assert out.message.startswith("ConnectionError raised at ") and "hunter2" not in out.message
    assert "10.0.0.5" not in out.message and not out.non_retryable
    assert out.next_retry_delay is not None and out.__cause__ is None


@pytest.mark.parametrize(("attempt", "final"), [(1, False), (2, False), (3, True), (7, True)])
async def test_an_unclassified_exception_is_retried_until_its_third_attempt(
    attempt: int, final: bool
) -> None:
    out = await intercepted(KeyError("sk-live-0123456789 for alice"), attempt=attempt)
    assert isinstance(out, ApplicationError) and out.type == errors.UNEXPECTED_ERROR
    assert out.non_retryable is final and (out.next_retry_delay is None) is final
    assert out.message.startswith("KeyError raised at ") and "Mapping key not found" in out.message
    assert "sk-live" not in out.message and "alice" not in out.message
    assert out.__cause__ is None


@pytest.mark.parametrize(
    "error",
    [
        ApplicationError("bad args", type=errors.TOOL_INPUT_INVALID, non_retryable=True),
        CancelledError("cancelled"),
    ],
)
async def test_final_failures_and_temporals_own_pass_untouched(error: Exception) -> None:
    assert await intercepted(error) is error


# --- an unclassified exception on a real worker (issue 16) ------------------------------------

SECRET = "sk-" + "unit-test-3141592653"
"""Built at run time, so no source line a traceback could quote holds it."""
attempts_made: list[int] = []


@activity.defn(name="look_up_account")
async def look_up_account(account: str) -> str:
    attempts_made.append(activity.info().attempt)
    accounts: dict[str, str] = {}
    return accounts[f"{SECRET} of {account}"]


@workflow.defn(name="LooksUpAccount", sandboxed=False)
class LooksUpAccount:
    @workflow.run
    async def run(self, account: str) -> str:
        return await workflow.execute_activity(
            look_up_account,
            account,
            start_to_close_timeout=timedelta(seconds=10),
            retry_policy=RetryPolicy(
                initial_interval=timedelta(milliseconds=50), maximum_attempts=10
            ),
        )


async def test_an_unclassified_failure_reaches_history_without_its_text(client: Client) -> None:
    attempts_made.clear()
    account = f"alice-{uuid.uuid4().hex[:8]}"
    job_id = f"agent-job-{account}"
    async with Worker(
        client,
        task_queue=job_id,
        workflows=[LooksUpAccount],
        activities=[look_up_account],
        interceptors=INTERCEPTORS,
    ):
        with capture_logs() as logs, pytest.raises(WorkflowFailureError) as failed:
            await client.execute_workflow(LooksUpAccount.run, account, id=job_id, task_queue=job_id)

    cause = failed.value.cause
    assert isinstance(cause, ActivityError) and isinstance(cause.cause, ApplicationError)
    assert cause.cause.type == errors.UNEXPECTED_ERROR and cause.cause.non_retryable
    assert "KeyError raised at activities/test_backoff.py:" in cause.cause.message
    assert "in look_up_account" in cause.cause.message
    assert attempts_made == [1, 2, 3]  # bounded, though the policy allowed ten
    history = json.dumps((await client.get_workflow_handle(job_id).fetch_history()).to_json_dict())
    assert SECRET not in history and account not in history.replace(job_id, "")
    # The worker's log has the whole traceback, with the job's ID and the key-shaped text cut.
    logged = [e for e in logs if e["event"] == "activity.unclassified_error"]
    assert [e["attempt"] for e in logged] == [1, 2, 3]
    assert {e["job_id"] for e in logged} == {job_id} and logged[-1]["log_level"] == "error"
    assert "look_up_account" in logged[-1]["traceback"] and "KeyError" in logged[-1]["traceback"]
    assert SECRET not in json.dumps(logged, default=str)
