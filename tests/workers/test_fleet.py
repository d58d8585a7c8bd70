"""A fleet of ``keel worker`` processes on one task queue.

Work spreads across every worker; a worker that gets SIGTERM under load stops polling, lets its
running activities finish and exits 0 well within its grace period; a worker killed with
SIGKILL under load loses nothing (its calls are retried on another worker once their heartbeat
timeout passes). Real dev server, real Redis, the simulator over HTTP, workers as subprocesses.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from collections import Counter

import pytest
from temporalio.api.enums.v1 import EventType, PendingActivityState, TimeoutType
from temporalio.api.history.v1 import HistoryEvent
from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment

from keel.client import AgentJobError, AgentJobs, JobRequest
from tests.conftest import unique
from tests.workers.conftest import GRACE_SECONDS, FleetWorker, StartWorker, until, wait_polling

LLM_ACTIVITIES = {"plan_step", "draft_answer", "verify_draft"}
"""Activities that call the simulator, so a ``slow=`` directive keeps them running."""
SLOW_GOAL = "Compute 3 + 4 with calculator [sim: fanout=2, slow=1000]"
"""Every model call takes 1 s, so a worker can be stopped with calls surely in flight."""


async def submit(jobs: AgentJobs, n: int, goal: str) -> list[str]:
    request = JobRequest(goal=goal, tenant="fleet", tools=["calculator"])
    return list(await asyncio.gather(*(jobs.start(request) for _ in range(n))))


async def all_completed(jobs: AgentJobs, ids: list[str]) -> None:
    results = await asyncio.gather(*(jobs.result(j, timeout=120) for j in ids))
    outcomes = [(r.job_id, r.outcome, r.error) for r in results if r.outcome != "completed"]
    assert not outcomes


async def histories(client: Client, ids: list[str]) -> dict[str, list[HistoryEvent]]:
    fetched = await asyncio.gather(*(client.get_workflow_handle(j).fetch_history() for j in ids))
    return {j: list(h.events) for j, h in zip(ids, fetched, strict=True)}


def started_by(history: dict[str, list[HistoryEvent]]) -> tuple[Counter[str], Counter[str]]:
    """How many activity tasks and workflow tasks each worker identity started."""
    activities: Counter[str] = Counter()
    workflow_tasks: Counter[str] = Counter()
    for events in history.values():
        for e in events:
            if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED:
                activities[e.activity_task_started_event_attributes.identity] += 1
            elif e.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_STARTED:
                workflow_tasks[e.workflow_task_started_event_attributes.identity] += 1
    return activities, workflow_tasks


def assert_no_failure(history: dict[str, list[HistoryEvent]], *, retries: bool) -> None:
    """No job failed or timed out; without ``retries``, no activity needed a second attempt."""
    bad = {
        EventType.EVENT_TYPE_WORKFLOW_EXECUTION_FAILED,
        EventType.EVENT_TYPE_WORKFLOW_EXECUTION_TIMED_OUT,
        EventType.EVENT_TYPE_WORKFLOW_EXECUTION_TERMINATED,
        EventType.EVENT_TYPE_WORKFLOW_TASK_FAILED,
        EventType.EVENT_TYPE_ACTIVITY_TASK_FAILED,
        EventType.EVENT_TYPE_ACTIVITY_TASK_TIMED_OUT,
        EventType.EVENT_TYPE_ACTIVITY_TASK_CANCELED,
    }
    for job_id, events in history.items():
        found = [EventType.Name(e.event_type) for e in events if e.event_type in bad]
        assert not found, f"{job_id}: {found}"
        retried = [
            (e.event_id, e.activity_task_started_event_attributes.attempt)
            for e in events
            if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED
            and e.activity_task_started_event_attributes.attempt != 1
        ]
        assert retries or not retried, f"{job_id}: retried activities (event, attempt) {retried}"


def final_attempt(events: list[HistoryEvent], activity_id: str) -> tuple[HistoryEvent, float]:
    """The started event of the attempt that completed ``activity_id``, and when it completed."""
    scheduled = {
        e.event_id: e.activity_task_scheduled_event_attributes.activity_id
        for e in events
        if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
    }
    by_id = {e.event_id: e for e in events}
    for e in events:
        attrs = e.activity_task_completed_event_attributes
        if (
            e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED
            and scheduled[attrs.scheduled_event_id] == activity_id
        ):
            return by_id[attrs.started_event_id], e.event_time.ToDatetime().timestamp()
    raise AssertionError(f"activity {activity_id} never completed")


async def some_acting(jobs: AgentJobs, ids: list[str]) -> bool:
    """Whether some job has reached its act phase.

    Calculator steps take milliseconds, so ``acting`` itself can fall between two polls;
    ``verifying`` follows it and lasts two model calls.
    """
    for j in ids:
        try:
            if (await jobs.status(j)).state in ("acting", "verifying"):
                return True
        except AgentJobError:  # no worker has run the job's first task yet
            pass
    return False


async def call_just_started_on(
    client: Client, ids: list[str], identity: str
) -> tuple[str, str] | None:
    """(job, activity id) of a model call that started on ``identity`` under 0.4 s ago.

    With 1 s model calls, such a call is still running for at least another half second.
    """
    now = time.time()
    for desc in await asyncio.gather(*(client.get_workflow_handle(j).describe() for j in ids)):
        for act in desc.raw_description.pending_activities:
            if (
                act.state == PendingActivityState.PENDING_ACTIVITY_STATE_STARTED
                and act.last_worker_identity == identity
                and act.activity_type.name in LLM_ACTIVITIES
                and now - act.last_started_time.ToDatetime().timestamp() < 0.4
            ):
                return desc.id, act.activity_id
    return None


async def busy(client: Client, jobs: AgentJobs, ids: list[str], w: FleetWorker) -> tuple[str, str]:
    """Wait until some job is acting and ``w`` has a model call in flight; return that call."""
    await until(lambda: some_acting(jobs, ids), 60, "some job to be acting")
    found: tuple[str, str] | None = None

    async def in_flight() -> bool:
        nonlocal found
        found = await call_just_started_on(client, ids, w.identity)
        return found is not None

    await until(in_flight, 60, f"a model call to start on {w.identity}", poll=0.02)
    assert found is not None
    return found


async def test_work_spreads_across_two_then_three_workers(
    env: WorkflowEnvironment, start_worker: StartWorker
) -> None:
    client, task_queue = env.client, unique("tq-fleet")
    jobs = AgentJobs(client, task_queue=task_queue)
    fleet = [start_worker(task_queue, "w1"), start_worker(task_queue, "w2")]
    await wait_polling(client, task_queue, fleet)

    ids = await submit(jobs, 12, "Compute 3 + 4 with calculator [sim: fanout=4, slow=50]")
    await all_completed(jobs, ids)
    history = await histories(client, ids)
    activities, workflow_tasks = started_by(history)
    assert set(activities) == {"w1", "w2"}, activities
    assert set(workflow_tasks) == {"w1", "w2"}, workflow_tasks
    assert_no_failure(history, retries=False)

    # A third worker joins the queue and gets its share of the next jobs.
    fleet.append(start_worker(task_queue, "w3"))
    await wait_polling(client, task_queue, fleet)
    ids = await submit(jobs, 18, "Compute 3 + 4 with calculator [sim: fanout=4, slow=100]")
    await all_completed(jobs, ids)
    history = await histories(client, ids)
    activities, workflow_tasks = started_by(history)
    assert set(activities) == {"w1", "w2", "w3"}, activities
    assert set(workflow_tasks) == {"w1", "w2", "w3"}, workflow_tasks
    assert_no_failure(history, retries=False)


async def test_sigterm_under_load_finishes_running_calls_and_exits_cleanly(
    env: WorkflowEnvironment, start_worker: StartWorker
) -> None:
    client, task_queue = env.client, unique("tq-term")
    jobs = AgentJobs(client, task_queue=task_queue)
    leaving, staying = start_worker(task_queue, "w1"), start_worker(task_queue, "w2")
    await wait_polling(client, task_queue, [leaving, staying])
    ids = await submit(jobs, 10, SLOW_GOAL)
    job_id, activity_id = await busy(client, jobs, ids, leaving)

    signalled = time.time()
    leaving.proc.send_signal(signal.SIGTERM)
    try:
        returncode = await asyncio.to_thread(leaving.proc.wait, GRACE_SECONDS + 15)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{leaving.identity} still running after SIGTERM\n{leaving.log_tail()}")
    took = time.time() - signalled
    assert returncode == 0, leaving.log_tail()
    # Running calls take at most 1 s to finish; needing the grace period means they were stuck.
    assert took < GRACE_SECONDS / 2, f"exit took {took:.1f} s\n{leaving.log_tail()}"

    await all_completed(jobs, ids)
    history = await histories(client, ids)
    # Nothing was cancelled, timed out or retried: the leaving worker's calls all finished.
    assert_no_failure(history, retries=False)
    activities, _ = started_by(history)
    assert activities[staying.identity] > 0, activities

    # The call running at SIGTERM finished on the leaving worker after the signal ...
    started, completed_at = final_attempt(history[job_id], activity_id)
    assert started.activity_task_started_event_attributes.identity == leaving.identity
    assert completed_at > signalled
    # ... which took no new task once signalled (1 s allows for a poll answered just then).
    late = [
        (j, e.event_id, EventType.Name(e.event_type))
        for j, events in history.items()
        for e in events
        if e.event_time.ToDatetime().timestamp() > signalled + 1.0
        and leaving.identity
        in (
            e.activity_task_started_event_attributes.identity,
            e.workflow_task_started_event_attributes.identity,
        )
    ]
    assert not late, f"{leaving.identity} took work after SIGTERM: {late}"


async def test_sigkill_under_load_loses_no_job(
    env: WorkflowEnvironment, start_worker: StartWorker
) -> None:
    client, task_queue = env.client, unique("tq-kill")
    jobs = AgentJobs(client, task_queue=task_queue)
    doomed, survivor = start_worker(task_queue, "w1"), start_worker(task_queue, "w2")
    await wait_polling(client, task_queue, [doomed, survivor])
    ids = await submit(jobs, 10, SLOW_GOAL)
    job_id, activity_id = await busy(client, jobs, ids, doomed)

    doomed.proc.send_signal(signal.SIGKILL)
    assert await asyncio.to_thread(doomed.proc.wait, 10) == -signal.SIGKILL

    # The killed model calls miss their 45 s heartbeat timeout and run again on the survivor.
    await all_completed(jobs, ids)
    history = await histories(client, ids)
    assert_no_failure(history, retries=True)
    started, _ = final_attempt(history[job_id], activity_id)
    attrs = started.activity_task_started_event_attributes
    assert attrs.identity == survivor.identity
    assert attrs.attempt >= 2
    assert attrs.last_failure.timeout_failure_info.timeout_type == (
        TimeoutType.TIMEOUT_TYPE_HEARTBEAT
    ), attrs.last_failure
    assert survivor.proc.poll() is None, survivor.log_tail()
