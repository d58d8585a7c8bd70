"""Many jobs at once against a model endpoint that fails half its requests at random.

The simulator answers 500, 503, 429 (Retry-After 1 s) or malformed bodies to half the calls,
seeded. Whatever the mix, every job must end in one of the outcomes Keel promises: completed,
out of budget with the budget named, or failed with a typed cause once a call's retries are
spent. No budget is overrun, and no workflow task fails (every task replays, since the worker
caches nothing).
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator

import httpx
import pytest
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client

from keel.activities import errors
from keel.client import AgentJobs, Budget, JobFailed, JobRequest, JobResult
from tests.conftest import free_port, unique, wait_port

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
    client: Client, make_worker, flaky_sim_url: str
) -> None:
    requests = [request(n) for n in range(JOBS)]
    async with make_worker(client, base_url=flaky_sim_url) as worker:
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

    for history in await asyncio.gather(
        *(client.get_workflow_handle(j).fetch_history() for j in ids)
    ):
        failed_tasks = [
            e.workflow_task_failed_event_attributes.failure.message
            for e in history.events
            if e.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_FAILED
        ]
        assert not failed_tasks, (history.workflow_id, failed_tasks)

    async with httpx.AsyncClient(base_url=flaky_sim_url.removesuffix("/v1")) as http:
        faults = (await http.get("/_sim/stats")).json()["faults"]
    assert sum(faults.values()) >= JOBS, faults  # the faults were real, and many
