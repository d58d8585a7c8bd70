"""The retry policies: every one is bounded, and ``capped`` only ever narrows a policy."""

from __future__ import annotations

from datetime import timedelta

import pytest
from temporalio.common import RetryPolicy
from temporalio.workflow import ActivityCancellationType, ActivityConfig

from keel.activities.llm import LLMConfig
from keel.activities.types import LIMIT_WAIT_SECONDS, LLM_REQUEST_TIMEOUT_SECONDS
from keel.workflows import policies

POLICIES = {
    "LLM_CALL": policies.LLM_CALL,
    "TOOL_CALL": policies.TOOL_CALL,
    "RETRIEVAL": policies.RETRIEVAL,
    "JOB_SLOT_WAIT": policies.JOB_SLOT_WAIT,
}


@pytest.mark.parametrize("config", POLICIES.values(), ids=list(POLICIES))
def test_every_policy_is_bounded(config: ActivityConfig) -> None:
    assert config.get("start_to_close_timeout")
    assert config.get("heartbeat_timeout")
    assert config.get("schedule_to_close_timeout")
    retry = config.get("retry_policy")
    assert retry is not None and retry.maximum_attempts > 0 and retry.maximum_interval


def test_llm_attempts_outlast_the_clients_own_timeout() -> None:
    attempt = policies.LLM_CALL.get("start_to_close_timeout")
    assert attempt == (
        timedelta(seconds=LLM_REQUEST_TIMEOUT_SECONDS)
        + policies.LLM_ATTEMPT_SLACK
        + policies.LIMIT_WAIT  # the gateway's wait for the model's limits comes first
    )
    assert LLMConfig().request_timeout_seconds < attempt.total_seconds()


@pytest.mark.parametrize("config", [policies.LLM_CALL, policies.TOOL_CALL], ids=["llm", "tool"])
def test_a_wait_at_the_gateways_limits_fits_in_the_attempt(config: ActivityConfig) -> None:
    attempt = config.get("start_to_close_timeout")
    assert attempt is not None and attempt.total_seconds() > LIMIT_WAIT_SECONDS + 10


def test_a_job_waits_in_line_for_a_slot_in_one_attempt() -> None:
    wait = policies.JOB_SLOT_WAIT
    attempt, heartbeat = wait.get("start_to_close_timeout"), wait.get("heartbeat_timeout")
    assert attempt is not None and attempt > policies.JOB_SLOT_MAX_WAIT
    assert heartbeat is not None and heartbeat <= policies.HEARTBEAT_TIMEOUT
    assert wait.get("cancellation_type") == ActivityCancellationType.WAIT_CANCELLATION_COMPLETED


def test_tool_attempts_ceiling_is_the_policys() -> None:
    retry = policies.TOOL_CALL.get("retry_policy")
    assert retry is not None and retry.maximum_attempts == policies.TOOL_ATTEMPTS


def test_capped_narrows_to_the_time_left_and_the_retry_budget() -> None:
    original = dict(policies.TOOL_CALL)
    narrowed = policies.capped(policies.TOOL_CALL, timedelta(seconds=7), 2, summary="tool x")
    assert narrowed.get("schedule_to_close_timeout") == timedelta(seconds=7)
    assert narrowed.get("summary") == "tool x"
    retry, base = narrowed.get("retry_policy"), policies.TOOL_CALL.get("retry_policy")
    assert retry is not None and base is not None
    assert retry.maximum_attempts == 2
    assert (retry.initial_interval, retry.maximum_interval) == (
        base.initial_interval,
        base.maximum_interval,
    )
    assert dict(policies.TOOL_CALL) == original  # the shared constant is untouched


def test_capped_never_widens() -> None:
    narrowed = policies.capped(policies.TOOL_CALL, timedelta(days=1), policies.TOOL_ATTEMPTS + 5)
    assert narrowed.get("schedule_to_close_timeout") == policies.TOOL_CALL.get(
        "schedule_to_close_timeout"
    )
    retry = narrowed.get("retry_policy")
    assert retry is not None and retry.maximum_attempts == policies.TOOL_ATTEMPTS


def test_capped_without_limits_of_its_own_uses_the_jobs() -> None:
    bare = ActivityConfig(start_to_close_timeout=timedelta(seconds=5))
    narrowed = policies.capped(bare, timedelta(seconds=30), 3)
    assert narrowed.get("schedule_to_close_timeout") == timedelta(seconds=30)
    assert narrowed.get("retry_policy") == RetryPolicy(maximum_attempts=3)
