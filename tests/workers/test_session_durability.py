"""Sessions survive ``kill -9``: no message lost, no turn run twice.

Two ``keel worker`` processes serve one session. Its second turn is slow (every model call
takes ``SLOW_MS``); the worker running that turn's model call is killed with SIGKILL in the
middle of it, and while it is gone a new message arrives and the slow one is sent again. The
call is retried on the other worker once its heartbeat times out, the turn ends once, the new
message becomes the next turn, the resend stays a resend, and the session goes on.
"""

from __future__ import annotations

import asyncio
import signal

from temporalio.api.enums.v1 import EventType, PendingActivityState
from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.testing import WorkflowEnvironment

from keel.client.sessions import AgentSessions
from keel.workflows.session_types import SessionRequest, session_id_for, turn_job_id
from tests.conftest import unique
from tests.workers.conftest import FleetWorker, StartWorker, until, wait_polling

SLOW_MS = 1500
SLOW = f"What is 6 * 7? use calculator [sim: slow={SLOW_MS}]"
"""Every model call of this turn takes 1.5 s, so the kill surely lands inside one."""


async def worker_running(client: Client, job_id: str, workers: list[FleetWorker]) -> FleetWorker:
    """The worker that has started one of the job's activities and is still running it."""
    found: list[FleetWorker] = []

    async def running() -> bool:
        try:
            described = await client.get_workflow_handle(job_id).describe()
        except Exception:  # noqa: BLE001 - the session has not started the turn's job yet
            return False
        for pending in described.raw_description.pending_activities:
            if pending.state == PendingActivityState.PENDING_ACTIVITY_STATE_STARTED:
                found.extend(w for w in workers if w.identity == pending.last_worker_identity)
        return bool(found)

    await until(running, 60, f"an activity of {job_id} to run on a worker")
    return found[0]


async def executions(
    client: Client, job_ids: list[str]
) -> dict[str, list[WorkflowExecutionStatus]]:
    """Every execution of each workflow ID, as visibility lists them once all are closed."""
    found: dict[str, list[WorkflowExecutionStatus]] = {}

    async def all_closed() -> bool:
        for job_id in job_ids:
            listed = [e async for e in client.list_workflows(f"WorkflowId = '{job_id}'")]
            found[job_id] = [e.status for e in listed if e.status is not None]
        running = WorkflowExecutionStatus.RUNNING
        return all(found[j] and running not in found[j] for j in job_ids)

    await until(all_closed, 30, "the turns' jobs to be listed as closed", poll=0.2)
    return found


async def test_kill_9_mid_turn_loses_no_message_and_runs_no_turn_twice(
    env: WorkflowEnvironment, start_worker: StartWorker
) -> None:
    client = env.client
    task_queue, tenant = unique("tq-session-kill"), unique("skill")
    workers = [start_worker(task_queue, "session-a"), start_worker(task_queue, "session-b")]
    await wait_polling(client, task_queue, workers)
    sessions = AgentSessions(client, task_queue=task_queue, tenant=tenant)
    req = SessionRequest(tenant=tenant, tools=["calculator"])
    session_id = session_id_for(tenant, "chat")

    first = await sessions.send(req, "chat", "What is 2 + 3? use calculator", message_id="m1")
    assert (await sessions.turn_result(first, timeout=60)).outcome == "completed"
    slow = await sessions.send(req, "chat", SLOW, message_id="m2")
    victim = await worker_running(client, slow.job_id, workers)
    victim.proc.send_signal(signal.SIGKILL)
    victim.proc.wait(timeout=10)
    survivor = next(w for w in workers if w is not victim)

    # While the slow turn's call is lost with its worker: a new message, and the slow one again.
    during = await sessions.send(req, "chat", "What is 8 + 9? use calculator", message_id="m3")
    again = await sessions.send(req, "chat", SLOW, message_id="m2")
    results = list(
        await asyncio.gather(
            sessions.turn_result(slow, timeout=180), sessions.turn_result(during, timeout=180)
        )
    )
    after = await sessions.send(req, "chat", "And what is 1 + 1?", message_id="m4")
    results.append(await sessions.turn_result(after, timeout=60))
    status = await sessions.status(session_id)
    history = await client.get_workflow_handle(session_id).fetch_history()
    slow_history = await client.get_workflow_handle(slow.job_id).fetch_history()
    jobs = [turn_job_id(session_id, n) for n in range(1, 5)]
    listed = await executions(client, jobs)

    assert survivor.proc.poll() is None, survivor.log_tail()
    assert [r.outcome for r in results] == ["completed"] * 3, [r.error for r in results]
    assert (slow.turn, during.turn, after.turn) == (2, 3, 4)
    assert again.duplicate and again.turn == 2 and again.job_id == slow.job_id
    # One child workflow per message, in order, none started again after the kill.
    started = [
        e.start_child_workflow_execution_initiated_event_attributes.workflow_id
        for e in history.events
        if e.event_type == EventType.EVENT_TYPE_START_CHILD_WORKFLOW_EXECUTION_INITIATED
    ]
    assert started == jobs
    assert listed == {j: [WorkflowExecutionStatus.COMPLETED] for j in jobs}
    assert status.usage.turns == 4 and [t.state for t in status.turns] == ["done"] * 4
    # The kill landed inside a call of the slow turn: it needed another attempt to finish.
    attempts = [
        e.activity_task_started_event_attributes.attempt
        for e in slow_history.events
        if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED
    ]
    assert max(attempts) > 1, "no call of the slow turn was cut short; the test proved nothing"
