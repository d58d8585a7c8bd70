"""Interactive over batch, and tenant against tenant: the order Temporal dispatches Keel jobs in.

Jobs start with ``Priority(priority_key=1 or 3, fairness_key=tenant, fairness_weight=...)``
(``keel.client._starting``) on dev servers that run with ``matching.enableFairness=true``
(``tests/conftest.py``). Every test queues its whole backlog before any worker polls, then lets
one worker with a single workflow-task slot drain it, and reads the order the server dispatched
first workflow tasks in from the jobs' histories (``keel.workers.bench.dispatch``). The
assertions are about ranks and shares, never about how long anything took, so they hold on a
loaded machine.

Temporal guarantees priority and fairness within one partition of a task queue, and a queue has
four by default ("Task Queue Priority and Fairness" in Temporal's docs). Priority cuts in so far
ahead that the priority test runs on the session's server as deployments do, with bounds that
leave room for a poll landing on a partition whose best task is worse than another's. Fair
shares are exact only within a partition: with four, the partition the poller reaches last is
drained last, both tenants' tasks alike, so the fairness tests run on a dev server of their own
with one partition per queue and check the shares the matcher promises.
"""

from __future__ import annotations

import asyncio
import math
import statistics
from collections.abc import AsyncIterator
from typing import Any

import pytest
from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment

from keel.client.jobs import AgentJobs
from keel.workers.bench.dispatch import (
    fetch_dispatches,
    overtaken,
    share_while_waiting,
    start_ranks,
    terminate_open,
)
from keel.workflows.types import JobRequest
from tests.conftest import start_dev_server, unique

BACKLOG = 200
"""Batch jobs queued ahead of the interactive ones."""
INTERACTIVE = 10
FLOOD = 120
"""Tenant A's jobs, all queued before tenant B's."""
LATE = 30
"""Tenant B's jobs."""
START_CONCURRENCY = 32
ONE_PARTITION = [
    "--dynamic-config-value",
    "matching.numTaskqueueReadPartitions=1",
    "--dynamic-config-value",
    "matching.numTaskqueueWritePartitions=1",
]


@pytest.fixture(scope="module")
async def one_partition(request: pytest.FixtureRequest) -> AsyncIterator[WorkflowEnvironment]:
    """A dev server of this module's own whose task queues have one partition each."""
    if request.config.getoption("--workflow-environment") != "local":
        pytest.skip("needs a dev server it starts itself, with one partition per task queue")
    environment = await start_dev_server(*ONE_PARTITION)
    yield environment
    await environment.shutdown()


def quick(mode: str, tenant: str = "acme") -> JobRequest:
    """The cheapest job: no tools, so plan, answer and verify (three activities)."""
    return JobRequest(goal="Say hello", tools=[], tenant=tenant, user="u", mode=mode)  # type: ignore[arg-type]


async def start_many(jobs: AgentJobs, request: JobRequest, count: int, prefix: str) -> list[str]:
    gate = asyncio.Semaphore(START_CONCURRENCY)

    async def one(i: int) -> str:
        async with gate:
            return await jobs.start(request, request_key=f"{prefix}-{i:04d}")

    return list(await asyncio.gather(*(one(i) for i in range(count))))


async def test_interactive_jobs_overtake_a_queued_batch_backlog(
    client: Client, make_worker: Any
) -> None:
    queue = unique("prio")
    # One queue for both modes, as when a deployment pins KEEL_TASK_QUEUE: only the priority
    # keys stand between the interactive jobs and the batch backlog queued before them.
    jobs = AgentJobs(client, task_queue=queue)
    batch_ids = await start_many(jobs, quick("batch"), BACKLOG, unique("b"))
    interactive_ids = await start_many(jobs, quick("interactive"), INTERACTIVE, unique("i"))
    async with make_worker(client, task_queue=queue, max_concurrent_workflow_tasks=1):
        results = await asyncio.gather(*(jobs.result(j) for j in interactive_ids))
    dispatches = await fetch_dispatches(
        client, {"batch": batch_ids, "interactive": interactive_ids}
    )
    await terminate_open(client, dispatches, "test over")

    assert [r.outcome for r in results] == ["completed"] * INTERACTIVE
    ranks = start_ranks(dispatches)
    interactive_ranks = sorted(ranks[j] for j in interactive_ids)
    # Under FIFO they would be dispatched 201st to 210th; with priority they go first.
    assert interactive_ranks[-1] <= 4 * INTERACTIVE, interactive_ranks
    # Each one cut in front of most of the backlog queued before it...
    assert min(overtaken(dispatches, "interactive", "batch")) >= BACKLOG * 0.8
    # ...and they finished while most of the backlog still waited for its first task. Under
    # FIFO every batch job is dispatched before the last interactive one closes (200 of 200).
    # With priority, the batch jobs dispatched meanwhile are those the worker's one slot took
    # while the interactive jobs waited on their model calls: 19 on an idle machine, 65 seen
    # under CI load (calls slow down more than workflow tasks do), so the bound is half.
    last_done = max(d.closed or 0.0 for d in dispatches if d.group == "interactive")
    batch_started = [d for d in dispatches if d.group == "batch" and d.started is not None]
    assert sum(d.started is not None and d.started < last_done for d in batch_started) < (
        BACKLOG // 2
    )


@pytest.mark.parametrize(
    ("late_weight", "share_range"),
    [
        # Equal weights: the late tenant gets every other dispatch.
        (None, (0.4, 0.6)),
        # Weight 3 against 1: three dispatches in four.
        (3.0, (0.65, 0.85)),
    ],
    ids=["equal-weights", "late-tenant-weight-3"],
)
async def test_a_late_tenant_is_served_beside_a_flood_not_behind_it(
    one_partition: WorkflowEnvironment,
    make_worker: Any,
    late_weight: float | None,
    share_range: tuple[float, float],
) -> None:
    client = one_partition.client
    queue = unique("fair")
    flood, late = unique("flood"), unique("late")
    weights = {late: late_weight} if late_weight else None
    jobs = AgentJobs(client, task_queue=queue, fairness_weights=weights)
    flood_ids = await start_many(jobs, quick("batch", flood), FLOOD, "a")
    late_ids = await start_many(jobs, quick("batch", late), LATE, "b")
    async with make_worker(client, task_queue=queue, max_concurrent_workflow_tasks=1):
        results = await asyncio.gather(*(jobs.result(j) for j in late_ids))
    dispatches = await fetch_dispatches(client, {"flood": flood_ids, "late": late_ids})
    await terminate_open(client, dispatches, "test over")

    assert {r.outcome for r in results} == {"completed"}
    ranks = start_ranks(dispatches)
    late_ranks = sorted(ranks[j] for j in late_ids)
    # Under FIFO the late tenant's jobs would be dispatched 121st to 150th, after the flood.
    # Fairly, its last one goes out after about LATE * (1 + 1/weight) dispatches: 60, or 40.
    assert late_ranks[-1] <= math.ceil(LATE * (1 + 1 / (late_weight or 1.0))) + 5, late_ranks
    # Fairly about LATE (31) or 3/4 of it (20); under FIFO it would be 135.
    assert statistics.median(late_ranks) < FLOOD / 3, late_ranks
    share = share_while_waiting(dispatches, "late")
    low, high = share_range
    assert share is not None and low <= share <= high, (share, late_ranks)
