"""A fleet of ``keel worker`` processes on one task queue.

Work spreads across every worker; a worker that gets SIGTERM under load stops polling, lets its
running activities finish and exits 0 within its grace period; a worker killed with SIGKILL
under load loses nothing (its activities are retried elsewhere after the heartbeat timeout).
Real dev server, real Redis, the simulator over HTTP, workers as real subprocesses.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from temporalio.api.enums.v1 import EventType, PendingActivityState, TaskQueueType
from temporalio.api.history.v1 import HistoryEvent
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest
from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment

from client import AgentJobError, AgentJobs, JobRequest
from tests.conftest import unique

GRACE_SECONDS = 30.0
"""KEEL_GRACEFUL_SHUTDOWN_SECONDS given to every worker (the default, stated explicitly)."""
LLM_ACTIVITIES = {"plan_step", "draft_answer", "verify_draft"}
"""Activities that call the simulator, so a ``slow=`` directive keeps them in flight."""


@dataclass
class FleetWorker:
    """One ``keel worker`` subprocess and the file its logs go to."""

    identity: str
    proc: subprocess.Popen[bytes]
    log: Path

    def log_tail(self, lines: int = 40) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return f"--- {self.identity} log ---\n" + "\n".join(text.splitlines()[-lines:])


StartWorker = Callable[[str, str], FleetWorker]


@pytest.fixture
def start_worker(
    env: WorkflowEnvironment, redis_url: str, sim_url: str, tmp_path: Path
) -> Iterator[StartWorker]:
    """Start ``python -m workers.cli worker`` subprocesses; any still running are stopped after."""
    started: list[FleetWorker] = []
    worker_env = os.environ | {
        "TEMPORAL_ADDRESS": env.client.service_client.config.target_host,
        "TEMPORAL_NAMESPACE": env.client.namespace,
        "REDIS_URL": redis_url,
        "OPENAI_BASE_URL": sim_url,
        "KEEL_MODEL_PLANNER": "sim-small",
        "KEEL_MODEL_VERIFIER": "sim-small",
        "KEEL_MODEL_ANSWERER": "sim-small",
        "KEEL_GRACEFUL_SHUTDOWN_SECONDS": str(GRACE_SECONDS),
    }
    worker_env.pop("OPENAI_API_KEY", None)

    def start(task_queue: str, identity: str) -> FleetWorker:
        log = tmp_path / f"worker-{identity}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "workers.cli",
                    "worker",
                    "--task-queue",
                    task_queue,
                    "--identity",
                    identity,
                ],
                env=worker_env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        started.append(FleetWorker(identity, proc, log))
        return started[-1]

    yield start
    for w in started:
        if w.proc.poll() is None:
            w.proc.terminate()
    for w in started:
        try:
            w.proc.wait(timeout=GRACE_SECONDS + 15)
        except subprocess.TimeoutExpired:
            w.proc.kill()
            w.proc.wait(timeout=10)


async def until(
    check: Callable[[], Awaitable[bool]], timeout: float, what: str, poll: float = 0.05
) -> None:
    """Poll ``check`` until it returns true; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(poll)


async def wait_polling(client: Client, task_queue: str, workers: list[FleetWorker]) -> None:
    """Wait until every worker polls both the workflow and the activity task queue."""
    wanted = {w.identity for w in workers}

    async def all_polling() -> bool:
        for w in workers:
            if w.proc.poll() is not None:
                pytest.fail(f"worker {w.identity} exited with {w.proc.returncode}\n{w.log_tail()}")
        for kind in (
            TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW,
            TaskQueueType.TASK_QUEUE_TYPE_ACTIVITY,
        ):
            resp = await client.workflow_service.describe_task_queue(
                DescribeTaskQueueRequest(
                    namespace=client.namespace,
                    task_queue=TaskQueue(name=task_queue),
                    task_queue_type=kind,
                )
            )
            if not wanted <= {p.identity for p in resp.pollers}:
                return False
        return True

    await until(all_polling, 60, f"workers {sorted(wanted)} to poll {task_queue}", poll=0.2)


async def submit(jobs: AgentJobs, n: int, goal: str) -> list[str]:
    return list(
        await asyncio.gather(
            *(
                jobs.start(JobRequest(goal=goal, tenant="fleet", tools=["calculator"]))
                for _ in range(n)
            )
        )
    )


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


def assert_clean(history: dict[str, list[HistoryEvent]]) -> None:
    """No job failed and no activity failed, timed out or needed a second attempt."""
    bad = {
        EventType.EVENT_TYPE_WORKFLOW_EXECUTION_FAILED,
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
        assert not retried, f"{job_id}: activities retried (event id, attempt): {retried}"


async def all_completed(jobs: AgentJobs, ids: list[str], timeout: float) -> None:
    results = await asyncio.gather(*(jobs.result(j, timeout=timeout) for j in ids))
    assert [r.outcome for r in results] == ["completed"] * len(ids), [
        (r.job_id, r.outcome, r.error) for r in results
    ]


async def test_work_spreads_across_two_then_three_workers(
    env: WorkflowEnvironment, start_worker: StartWorker
) -> None:
    client, task_queue = env.client, unique("tq-fleet")
    jobs = AgentJobs(client, task_queue=task_queue)
    fleet = [start_worker(task_queue, "w1"), start_worker(task_queue, "w2")]
    await wait_polling(client, task_queue, fleet)

    ids = await submit(jobs, 12, "Compute 3 + 4 with calculator [sim: fanout=4, slow=50]")
    await all_completed(jobs, ids, timeout=120)
    history = await histories(client, ids)
    activities, workflow_tasks = started_by(history)
    assert set(activities) == {"w1", "w2"}, activities
    assert set(workflow_tasks) == {"w1", "w2"}, workflow_tasks
    assert_clean(history)

    # A third worker joins the same queue and gets its share of new jobs.
    fleet.append(start_worker(task_queue, "w3"))
    await wait_polling(client, task_queue, fleet)
    ids = await submit(jobs, 18, "Compute 3 + 4 with calculator [sim: fanout=4, slow=100]")
    await all_completed(jobs, ids, timeout=120)
    history = await histories(client, ids)
    activities, workflow_tasks = started_by(history)
    assert set(activities) == {"w1", "w2", "w3"}, activities
    assert set(workflow_tasks) == {"w1", "w2", "w3"}, workflow_tasks
    assert_clean(history)


async def in_flight_on(client: Client, ids: list[str], identity: str) -> tuple[str, str] | None:
    """A (job, activity id) whose model call is running on worker ``identity`` right now."""
    for desc in await asyncio.gather(*(client.get_workflow_handle(j).describe() for j in ids)):
        for act in desc.raw_description.pending_activities:
            if (
                act.state == PendingActivityState.PENDING_ACTIVITY_STATE_STARTED
                and act.last_worker_identity == identity
                and act.activity_type.name in LLM_ACTIVITIES
            ):
                return desc.id, act.activity_id
    return None


async def some_acting(jobs: AgentJobs, ids: list[str]) -> bool:
    for j in ids:
        try:
            if (await jobs.status(j)).state == "acting":
                return True
        except AgentJobError:  # not yet picked up by a worker
            pass
    return False


async def test_sigterm_under_load_finishes_running_activities_and_exits_cleanly(
    env: WorkflowEnvironment, start_worker: StartWorker
) -> None:
    client, task_queue = env.client, unique("tq-term")
    jobs = AgentJobs(client, task_queue=task_queue)
    leaving, staying = start_worker(task_queue, "w1"), start_worker(task_queue, "w2")
    await wait_polling(client, task_queue, [leaving, staying])

    # Every model call takes 1 s, so the worker is stopped with calls in flight.
    ids = await submit(jobs, 10, "Compute 3 + 4 with calculator [sim: fanout=2, slow=1000]")
    t0 = time.time()
    await until(lambda: some_acting(jobs, ids), 60, "some job to be acting")
    print("DEBUG acting after", time.time() - t0)
    running: tuple[str, str] | None = None

    async def leaving_is_busy() -> bool:
        nonlocal running
        running = await in_flight_on(client, ids, leaving.identity)
        return running is not None

    await until(leaving_is_busy, 60, f"a model call running on {leaving.identity}")
    stopped_at = time.time()
    print("DEBUG busy after", time.time() - t0)
    leaving.proc.send_signal(signal.SIGTERM)
    try:
        returncode = await asyncio.to_thread(leaving.proc.wait, GRACE_SECONDS + 15)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{leaving.identity} still running after SIGTERM\n{leaving.log_tail()}")
    took = time.time() - stopped_at
    print("DEBUG exit took", took)
    assert returncode == 0, leaving.log_tail()
    # Finishing 1 s model calls is quick; reaching the grace period would mean cancelled work.
    assert took < GRACE_SECONDS, f"exit took {took:.1f} s\n{leaving.log_tail()}"

    t = time.time()
    await all_completed(jobs, ids, timeout=120)
    print("DEBUG complete took", time.time() - t)
    history = await histories(client, ids)
    assert_clean(history)
    activities, _ = started_by(history)
    assert activities[staying.identity] > 0 and activities[leaving.identity] > 0, activities

    # The call that was running at SIGTERM finished on the leaving worker, on its first attempt,
    # after the signal; and the leaving worker took no new work once it had been signalled.
    assert running is not None
    job_id, activity_id = running
    scheduled = {
        e.event_id: e.activity_task_scheduled_event_attributes.activity_id
        for e in history[job_id]
        if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
    }
    completed = [
        e
        for e in history[job_id]
        if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED
        and scheduled[e.activity_task_completed_event_attributes.scheduled_event_id] == activity_id
    ]
    assert len(completed) == 1, f"{job_id} activity {activity_id} did not complete"
    assert completed[0].event_time.ToDatetime().timestamp() > stopped_at
    started = next(
        e
        for e in history[job_id]
        if e.event_id == completed[0].activity_task_completed_event_attributes.started_event_id
    )
    assert started.activity_task_started_event_attributes.identity == leaving.identity
    late = [
        (j, e.event_id, EventType.Name(e.event_type))
        for j, events in history.items()
        for e in events
        if (
            e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED
            and e.activity_task_started_event_attributes.identity == leaving.identity
            or e.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_STARTED
            and e.workflow_task_started_event_attributes.identity == leaving.identity
        )
        and e.event_time.ToDatetime().timestamp() > stopped_at + 1.0
    ]
    assert not late, f"{leaving.identity} took work after SIGTERM: {late}"


async def test_sigkill_under_load_loses_no_job(
    env: WorkflowEnvironment, start_worker: StartWorker
) -> None:
    client, task_queue = env.client, unique("tq-kill")
    jobs = AgentJobs(client, task_queue=task_queue)
    doomed, survivor = start_worker(task_queue, "w1"), start_worker(task_queue, "w2")
    await wait_polling(client, task_queue, [doomed, survivor])

    ids = await submit(jobs, 10, "Compute 3 + 4 with calculator [sim: fanout=2, slow=300]")
    await until(lambda: some_acting(jobs, ids), 60, "some job to be acting")

    async def doomed_is_busy() -> bool:
        return await in_flight_on(client, ids, doomed.identity) is not None

    await until(doomed_is_busy, 60, f"a model call running on {doomed.identity}")
    doomed.proc.send_signal(signal.SIGKILL)
    assert await asyncio.to_thread(doomed.proc.wait, 10) == -signal.SIGKILL

    # Its calls time out on their 10 s heartbeat timeout and run again on the survivor.
    await all_completed(jobs, ids, timeout=120)
    history = await histories(client, ids)
    for job_id, events in history.items():
        assert not [e for e in events if e.event_type in _FAILED_JOB], job_id
    activities, _ = started_by(history)
    assert activities[survivor.identity] > 0, activities
    assert survivor.proc.poll() is None, survivor.log_tail()


_FAILED_JOB = {
    EventType.EVENT_TYPE_WORKFLOW_EXECUTION_FAILED,
    EventType.EVENT_TYPE_WORKFLOW_EXECUTION_TIMED_OUT,
    EventType.EVENT_TYPE_WORKFLOW_EXECUTION_TERMINATED,
}
