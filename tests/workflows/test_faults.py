"""Many jobs at once against a model endpoint that fails half its requests at random.

The simulator answers 500, 503, 429 (Retry-After 1 s) or malformed bodies to half the calls,
seeded. Whatever the mix, every job must end in one of the outcomes Keel promises: completed,
out of budget with the budget named, or failed with a typed cause once a call's retries are
spent. No budget is overrun, no workflow task fails, and every job's history replays. The worker
keeps a workflow cache, as ``keel worker`` does, and the histories are replayed once each at
the end: without a cache every task replayed its job's history so far, and the 24 jobs' replays
kept both cores busy for most of the test.

What a retry waits does not change any of that, only how long the test takes: Keel's jittered
backoff (1, 2, 4 ... s, or the 429's Retry-After) put 25-30 s of waiting into the slowest job
and made the test take 21-60 s. The worker therefore retries after a fixed ``QUICK_RETRY``
instead, and the test checks that every retryable failure carried the delay Keel chose for it.
The jobs run on their own dev server, whose timer queue fires on time: by default it looks ahead
a second (``history.timerProcessorMaxTimeShift``), so a 100 ms retry waited about a second.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import httpx
import pytest
from temporalio import activity
from temporalio.api.enums.v1 import EventType
from temporalio.common import RetryPolicy
from temporalio.exceptions import ApplicationError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import (
    ActivityInboundInterceptor,
    ExecuteActivityInput,
    Interceptor,
    Replayer,
    UnsandboxedWorkflowRunner,
)

from keel.activities import errors
from keel.activities._backoff import RETRY_AFTER_SPREAD
from keel.activities.converter import DATA_CONVERTER
from keel.client import AgentJobs, Budget, JobFailed, JobRequest, JobResult
from keel.workers.registry import WORKFLOWS
from tests.conftest import free_port, start_dev_server, unique, wait_port

JOBS = 24
GOALS = [
    "What is {n} * ({n} + 4)? Use the calculator and write_note.",
    "Compute {n} + 7 with the calculator [sim: fail_verify=1]",
    "Compute {n} - 2 [sim: ask]",
    "Summarise item {n} [sim: tokens=900]",
]
SPENT_CALL = {errors.LLM_TRANSIENT, errors.LLM_RATE_LIMITED, errors.BAD_MODEL_OUTPUT}
"""Causes a job may fail with here: a model call whose every attempt failed, or output that
stayed malformed through the corrective steps."""
RETRY_AFTER = timedelta(seconds=1)
"""The simulator's Retry-After on 429 (its default)."""
QUICK_RETRY = timedelta(milliseconds=100)
"""What this test's worker waits before every retry, in place of Keel's jittered delay."""


@dataclass(frozen=True)
class Retried:
    """A retryable failure of one attempt, and the delay Keel's backoff chose for the next."""

    type: str | None
    attempt: int
    delay: timedelta | None
    policy: RetryPolicy | None


class QuickRetries(Interceptor):
    """The outermost activity interceptor: records what ``JitteredBackoff`` decided, then
    replaces its delay with ``QUICK_RETRY``. Attempts, errors and policies are untouched."""

    def __init__(self) -> None:
        self.retried: list[Retried] = []

    def intercept_activity(self, next: ActivityInboundInterceptor) -> ActivityInboundInterceptor:
        return _QuickInbound(next, self.retried)


class _QuickInbound(ActivityInboundInterceptor):
    def __init__(self, next: ActivityInboundInterceptor, retried: list[Retried]) -> None:
        super().__init__(next)
        self._retried = retried

    async def execute_activity(self, input: ExecuteActivityInput) -> Any:
        try:
            return await super().execute_activity(input)
        except ApplicationError as err:
            if err.non_retryable:
                raise
            info = activity.info()
            self._retried.append(
                Retried(err.type, info.attempt, err.next_retry_delay, info.retry_policy)
            )
            quick = ApplicationError(
                err.message,
                *err.details,
                type=err.type,
                next_retry_delay=QUICK_RETRY,
                category=err.category,
            )
            raise quick.with_traceback(err.__traceback__) from err.__cause__


def chose_keels_delay(retry: Retried) -> bool:
    """Whether the delay is the one ``JitteredBackoff`` promises for this failure: just after
    the 429's Retry-After, else in the upper half of the policy's interval for the attempt."""
    if retry.delay is None or retry.policy is None:
        return False
    if retry.type == errors.LLM_RATE_LIMITED:
        return RETRY_AFTER <= retry.delay <= RETRY_AFTER * (1 + RETRY_AFTER_SPREAD)
    policy = retry.policy
    ceiling = policy.maximum_interval or policy.initial_interval * 100
    base = min(ceiling, policy.initial_interval * policy.backoff_coefficient ** (retry.attempt - 1))
    return base / 2 <= retry.delay <= base


@pytest.fixture(scope="module")
async def on_time_env() -> AsyncIterator[WorkflowEnvironment]:
    """A dev server that fires timers, retries included, within 10 ms of their time."""
    environment = await start_dev_server(
        "--dynamic-config-value", 'history.timerProcessorMaxTimeShift="10ms"'
    )
    yield environment
    await environment.shutdown()


@pytest.fixture(scope="module")
def flaky_sim_url() -> Iterator[str]:
    port = free_port()
    argv = ["sim-llm", "--port", str(port), "--fault-rate", "0.5", "--seed", "11"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "keel.workers.cli", *argv, "--fault-kinds", "500,503,429,malformed"],
        stdout=subprocess.DEVNULL,
    )
    wait_port(port, proc, "flaky LLM simulator")
    yield f"http://127.0.0.1:{port}/v1"
    proc.terminate()
    proc.wait(timeout=10)


def request(n: int) -> JobRequest:
    budget = (
        Budget(max_tokens=3_000)
        if n % 6 == 0
        else Budget(max_cost_usd=0.002)
        if n % 6 == 3
        else Budget()
    )
    return JobRequest(
        goal=GOALS[n % len(GOALS)].format(n=n),
        tenant=f"flaky-{n % 3}",
        tools=["calculator", "write_note"],
        budget=budget,
        ask_timeout_seconds=2,
    )


async def ending(jobs: AgentJobs, job_id: str) -> JobResult | JobFailed:
    try:
        return await jobs.result(job_id, timeout=240)
    except JobFailed as failed:
        return failed


def within(result: JobResult, budget: Budget) -> bool:
    used = result.usage
    return (
        used.tokens <= budget.max_tokens
        and used.cost_usd <= budget.max_cost_usd
        and used.steps <= budget.max_steps
        and used.tool_calls <= budget.max_tool_calls
        and result.iterations <= budget.max_iterations
    )


async def test_random_faults_end_every_job_in_a_promised_outcome(
    on_time_env: WorkflowEnvironment, make_worker, flaky_sim_url: str
) -> None:
    client = on_time_env.client
    requests = [request(n) for n in range(JOBS)]
    quick = QuickRetries()
    async with make_worker(
        client, base_url=flaky_sim_url, interceptors=[quick], max_cached_workflows=JOBS
    ) as worker:
        jobs = AgentJobs(client, task_queue=worker.task_queue)
        ids = await asyncio.gather(*(jobs.start(r, request_key=unique("flaky")) for r in requests))
        endings = await asyncio.gather(*(ending(jobs, j) for j in ids))

    outcomes: Counter[str] = Counter()
    for job_id, req, end in zip(ids, requests, endings, strict=True):
        if isinstance(end, JobFailed):
            assert end.cause_type in SPENT_CALL, (job_id, end)
            outcomes[f"failed:{end.cause_type}"] += 1
            continue
        assert end.outcome in ("completed", "budget_exhausted"), (job_id, end)
        assert within(end, req.budget), (job_id, end.usage, req.budget)
        if end.outcome == "budget_exhausted":
            assert end.exhausted_budget is not None, end
        else:
            assert end.answer, end
        outcomes[end.outcome] += 1
    assert outcomes["completed"] >= JOBS // 2, outcomes

    replayer = Replayer(
        workflows=WORKFLOWS,
        data_converter=DATA_CONVERTER,
        workflow_runner=UnsandboxedWorkflowRunner(),
    )
    for history in await asyncio.gather(
        *(client.get_workflow_handle(j).fetch_history() for j in ids)
    ):
        failed_tasks = [
            e.workflow_task_failed_event_attributes.failure.message
            for e in history.events
            if e.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_FAILED
        ]
        assert not failed_tasks, (history.workflow_id, failed_tasks)
        await replayer.replay_workflow(history)

    async with httpx.AsyncClient(base_url=flaky_sim_url.removesuffix("/v1")) as http:
        faults = (await http.get("/_sim/stats")).json()["faults"]
    assert sum(faults.values()) >= JOBS, faults  # the faults were real, and many

    # Keel's backoff decided every retry's delay (the worker only waited less): 5xx and
    # malformed replies retry after a jittered, growing interval, 429s after their Retry-After.
    assert {r.type for r in quick.retried} >= {errors.LLM_TRANSIENT, errors.LLM_RATE_LIMITED}
    wrong = [r for r in quick.retried if not chose_keels_delay(r)]
    assert not wrong, wrong
