"""Dry-run-then-commit writes end to end (issue 16): preview, verify, approve, then commit.

Real dev server (and the time-skipping server for an expired approval), real Redis, the
simulator over HTTP, and a local HTTP receiver that records what ``http_post`` sent it.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import redis.asyncio as aioredis
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment

from keel.activities.store import notes_list_key
from keel.activities.tools.http_post import idempotency_key
from keel.client import AgentJobs, Budget, InputRejected, JobRequest, JobStatus
from tests.activities.test_http_post import Receiver
from tests.conftest import WorkerFactory, serving, unique
from tests.workflows.test_agent_loop import replay_own_history
from tests.workflows.test_human import wait_for_state


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with serving(Receiver()) as server:
        yield server


def note_job(goal: str, **fields: Any) -> JobRequest:
    """A job that may only write notes, for a tenant of its own (its notes list starts empty)."""
    return JobRequest(goal=goal, tenant=unique("notes"), tools=["write_note"], **fields)


@asynccontextmanager
async def started(
    client: Client, make_worker: WorkerFactory, req: JobRequest
) -> AsyncIterator[tuple[AgentJobs, str]]:
    """Start ``req`` on a worker that runs while the block does; yield the façade and job ID."""
    async with make_worker(client) as worker:
        jobs = AgentJobs(client, task_queue=worker.task_queue)
        yield jobs, await jobs.start(req, request_key=unique("job"))


async def status_when(jobs: AgentJobs, job_id: str, test, timeout: float = 60) -> JobStatus:  # type: ignore[no-untyped-def]
    """Poll the job's status until ``test(status)`` holds; return that status."""

    async def poll() -> JobStatus:
        while not test(snap := await jobs.status(job_id)):
            await asyncio.sleep(0.05)
        return snap

    return await asyncio.wait_for(poll(), timeout)


async def activity_order(client: Client, job_id: str) -> list[str]:
    """The job's activities in the order they were scheduled (commits are ``execute_tool``)."""
    history = await client.get_workflow_handle(job_id).fetch_history()
    return [
        e.activity_task_scheduled_event_attributes.activity_type.name
        for e in history.events
        if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
    ]


async def test_note_is_previewed_in_status_and_written_after_the_verdict(
    client: Client, make_worker, redis_client: aioredis.Redis
) -> None:
    # Each model call takes 400 ms, so the preview is visible while the answer is checked.
    req = note_job("Write a note about the release with write_note [sim: slow=400]")
    async with started(client, make_worker, req) as (jobs, job_id):
        snap = await status_when(jobs, job_id, lambda s: bool(s.writes))
        (write,) = snap.writes
        assert write.tool == "write_note" and write.status == "previewed"
        assert write.preview == 'would write note "Keel note" (17 characters): Body of the note.'
        assert not write.requires_approval
        assert snap.state in ("acting", "planning", "verifying")
        assert await redis_client.llen(notes_list_key(req.tenant)) == 0  # previewed, not written
        result = await jobs.result(job_id, timeout=60)

    assert result.outcome == "completed" and result.verified
    (done,) = result.writes
    assert done.id == write.id and done.status == "committed" and "written" in done.detail
    notes = await redis_client.lrange(notes_list_key(req.tenant), 0, -1)
    assert notes == [f"{job_id}:{write.id}"]  # one note, under the step's op_key
    order = await activity_order(client, job_id)
    # The dry run acts; the commit is the last activity, after the verifier's verdict.
    assert order[-3:] == ["draft_answer", "verify_draft", "execute_tool"]
    assert order.count("execute_tool") == 2
    await replay_own_history(client, job_id, record_as="preview_commit")


async def test_no_note_is_written_without_a_verified_answer(
    client: Client, make_worker, redis_client: aioredis.Redis
) -> None:
    req = note_job(
        "Write a note about the outage with write_note [sim: fail_verify=9]",
        budget=Budget(max_iterations=2),
    )
    async with started(client, make_worker, req) as (jobs, job_id):
        result = await jobs.result(job_id, timeout=60)
    assert result.outcome == "budget_exhausted" and not result.verified
    (write,) = result.writes
    # Its draft was rejected, so the write it was previewed for is never made.
    assert write.status == "discarded" and "rejected" in write.detail
    assert await redis_client.llen(notes_list_key(req.tenant)) == 0
    assert (await activity_order(client, job_id)).count("execute_tool") == 1


async def test_a_write_previewed_for_a_rejected_draft_is_not_made_by_a_later_verified_one(
    client: Client, make_worker, redis_client: aioredis.Redis
) -> None:
    req = note_job("Write a note about the outage with write_note [sim: fail_verify=1]")
    async with started(client, make_worker, req) as (jobs, job_id):
        result = await jobs.result(job_id, timeout=60)
    assert result.outcome == "completed" and result.iterations >= 2
    first, *later = result.writes
    assert first.id.startswith("0:") and first.status == "discarded"
    made = [w for w in later if w.status == "committed"]
    notes = await redis_client.lrange(notes_list_key(req.tenant), 0, -1)
    # Only what the verified draft's iteration previewed is written, once each.
    assert len(notes) == len(made) and all(not w.id.startswith("0:") for w in made)


async def test_approved_posts_commit_once_each_with_a_stable_key(
    client: Client, make_worker, receiver: Receiver
) -> None:
    # Two posts (fanout=2); the receiver fails the first request of each key with a 503.
    goal = f"Tell the team with http_post at {receiver.url('/flaky')} [sim: fanout=2]"
    req = JobRequest(goal=goal, tools=["http_post"])
    async with started(client, make_worker, req) as (jobs, job_id):
        await wait_for_state(jobs, job_id, "waiting_for_input", timeout=60)
        snap = await jobs.status(job_id)
        assert [w.status for w in snap.writes] == ["previewed", "previewed"]
        assert all(w.requires_approval for w in snap.writes)
        assert receiver.received == []  # verified, previewed, and nothing sent yet
        with pytest.raises(InputRejected, match="no write"):
            await jobs.decide_write(job_id, "9:nope", approve=True)
        first, second = (w.id for w in snap.writes)
        assert "approved" in await jobs.decide_write(job_id, first, approve=True)
        with pytest.raises(InputRejected, match="already approved"):
            await jobs.decide_write(job_id, first, approve=False)
        await jobs.decide_write(job_id, second, approve=True, reason="ok by ops")
        result = await jobs.result(job_id, timeout=60)

    assert result.outcome == "completed"
    assert [w.status for w in result.writes] == ["committed", "committed"]
    keys = [idempotency_key(f"{job_id}:{w.id}") for w in result.writes]
    assert keys[0] != keys[1]
    # Each commit was retried after its 503 with the same key: two requests, one commit each.
    assert Counter(r.key for r in receiver.received) == Counter({keys[0]: 2, keys[1]: 2})
    assert receiver.accepted == Counter(dict.fromkeys(keys, 1))
    assert all(r.body == {"text": "Keel update"} for r in receiver.received)
    await replay_own_history(client, job_id, record_as="approved_writes")


async def test_rejected_post_sends_nothing(client: Client, make_worker, receiver: Receiver) -> None:
    req = JobRequest(goal=f"Tell the team with http_post at {receiver.url()}", tools=["http_post"])
    async with started(client, make_worker, req) as (jobs, job_id):
        await wait_for_state(jobs, job_id, "waiting_for_input", timeout=60)
        (write,) = (await jobs.status(job_id)).writes
        ack = await jobs.decide_write(job_id, write.id, approve=False, reason="not today")
        assert "rejected" in ack
        result = await jobs.result(job_id, timeout=60)
    assert result.outcome == "completed"
    (done,) = result.writes
    assert done.status == "rejected" and done.detail == "not today"
    assert receiver.received == []
    assert (await activity_order(client, job_id)).count("execute_tool") == 1


async def test_expired_approval_sends_nothing(
    time_skipping_env: WorkflowEnvironment, make_worker, receiver: Receiver
) -> None:
    client = time_skipping_env.client
    req = JobRequest(
        goal=f"Tell the team with http_post at {receiver.url()}",
        tools=["http_post"],
        approval_timeout_seconds=2 * 3600,
    )
    async with started(client, make_worker, req) as (jobs, job_id):
        await wait_for_state(jobs, job_id, "waiting_for_input", timeout=60)
        await time_skipping_env.sleep(2 * 3600 + 60)  # two hours pass in moments
        result = await jobs.result(job_id, timeout=60)
    assert result.outcome == "completed"
    (write,) = result.writes
    assert write.status == "expired" and "no decision within 7200 s" in write.detail
    assert receiver.received == []
