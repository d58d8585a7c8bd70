"""Payloads over Temporal's limit (issue 16), against the real dev server, Redis and workers.

Without Keel's check the worker's core refuses a result over 2 MB as a *retryable*
``PayloadsTooLarge`` and the activity runs again on every attempt; Keel's codec turns it into
one non-retryable ``PayloadTooLarge`` naming the activity and the size. With the payload store
on, the same result travels by reference through Redis, replays, and its key expires by TTL.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import re
from datetime import timedelta

import pytest
import redis.asyncio as aioredis
from temporalio import activity, workflow
from temporalio.client import Client, WorkflowFailureError
from temporalio.common import RetryPolicy
from temporalio.converter import StorageDriverClaim, StorageDriverRetrieveContext
from temporalio.exceptions import ActivityError, ApplicationError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Replayer, UnsandboxedWorkflowRunner, Worker

from keel.activities.converter import keel_data_converter
from keel.activities.encryption import PAYLOAD_TOO_LARGE
from keel.activities.payload_store import KEY_PREFIX, PAYLOAD_EXPIRED, PayloadStoreSettings
from keel.client import AgentJobs, JobRequest
from keel.workers.registry import WORKFLOWS
from tests.conftest import WorkerFactory, unique

ATTEMPTS: list[int] = []


@activity.defn
async def big_result(chars: int) -> str:
    """A test-only activity whose result is ``chars`` incompressible characters."""
    ATTEMPTS.append(activity.info().attempt)
    return os.urandom(chars // 2).hex()


@workflow.defn
class BigResultWorkflow:
    """Runs ``big_result`` under a policy that would retry it five times."""

    @workflow.run
    async def run(self, chars: int) -> int:
        text = await workflow.execute_activity(
            big_result,
            chars,
            start_to_close_timeout=timedelta(seconds=30),
            retry_policy=RetryPolicy(maximum_attempts=5, initial_interval=timedelta(seconds=0.1)),
        )
        return len(text)


async def run_big(client: Client, chars: int) -> tuple[str, int | BaseException]:
    queue = unique("tq")
    ATTEMPTS.clear()
    async with Worker(
        client,
        task_queue=queue,
        workflows=[BigResultWorkflow],
        activities=[big_result],
        workflow_runner=UnsandboxedWorkflowRunner(),
        max_cached_workflows=0,
    ):
        workflow_id = unique("big")
        handle = await client.start_workflow(
            BigResultWorkflow.run, chars, id=workflow_id, task_queue=queue
        )
        try:
            return workflow_id, await handle.result()
        except WorkflowFailureError as err:
            return workflow_id, err


async def test_a_result_over_the_limit_fails_once_non_retryably(client: Client) -> None:
    _, outcome = await run_big(client, 3_000_000)

    assert isinstance(outcome, WorkflowFailureError)
    assert isinstance(outcome.cause, ActivityError)
    err = outcome.cause.cause
    assert isinstance(err, ApplicationError)
    assert err.type == PAYLOAD_TOO_LARGE and err.non_retryable
    assert "'big_result'" in err.message and "3000" in err.message
    # Once: before Keel's check, each of the policy's five attempts ran the activity again.
    assert ATTEMPTS == [1]


@pytest.fixture
async def store_client(env: WorkflowEnvironment, redis_url: str) -> Client:
    store = PayloadStoreSettings(url=redis_url, threshold_bytes=64 * 1024, ttl_seconds=4)
    converter = keel_data_converter(payload_store=store)
    config = env.client.config()
    config["data_converter"] = converter
    return Client(**config)


def references(history: object) -> list[str]:
    """The Redis keys of every payload the history holds by reference (any event)."""
    found = []
    for event in history.events:  # type: ignore[attr-defined]
        raw = event.SerializeToString()
        for key in re.findall(rb"keel:payload:[^\"]+", raw):
            found.append(key.decode())
    return found


def result_reference(history: object) -> str:
    """The one activity result the history holds by reference, checked to be small."""
    [payload] = [
        p
        for e in history.events  # type: ignore[attr-defined]
        for p in e.activity_task_completed_event_attributes.result.payloads
    ]
    assert payload.metadata["messageType"].endswith(b"ExternalStorageReference")
    assert len(payload.data) < 1_000  # the reference, not the payload
    return str(payload.data.decode())


async def test_with_the_payload_store_a_large_result_travels_by_reference(
    store_client: Client, redis_client: aioredis.Redis
) -> None:
    workflow_id, outcome = await run_big(store_client, 3_000_000)
    assert outcome == 3_000_000 and ATTEMPTS == [1]

    history = await store_client.get_workflow_handle(workflow_id).fetch_history()
    ref = result_reference(history)
    keys = [k async for k in redis_client.scan_iter(f"{KEY_PREFIX}*{workflow_id}*")]
    assert len(keys) == 1 and keys[0] in ref
    assert keys[0].startswith(f"{KEY_PREFIX}{{-}}:{workflow_id}:")
    assert 0 < await redis_client.ttl(keys[0]) <= 4

    replayer = Replayer(
        workflows=[BigResultWorkflow],
        data_converter=store_client.data_converter,
        workflow_runner=UnsandboxedWorkflowRunner(),
    )
    await replayer.replay_workflow(history)

    # The key expires by its TTL; after that the history no longer replays, and says why.
    for _ in range(60):
        if not await redis_client.exists(keys[0]):
            break
        await asyncio.sleep(0.1)
    assert not await redis_client.exists(keys[0])
    replayed = await replayer.replay_workflow(history, raise_on_replay_failure=False)
    # The SDK fails a workflow whose payload cannot be read with a non-retryable error (a live
    # worker fails the job rather than retrying its task forever); replay reports that as a
    # different command sequence.
    assert replayed.replay_failure is not None
    storage = store_client.data_converter.external_storage
    assert storage is not None
    [driver] = storage.drivers
    with pytest.raises(ApplicationError) as caught:
        await driver.retrieve(
            StorageDriverRetrieveContext(), [StorageDriverClaim({"key": keys[0]})]
        )
    assert caught.value.type == PAYLOAD_EXPIRED and caught.value.non_retryable


async def test_a_keel_job_runs_and_replays_with_its_payloads_in_redis(
    env: WorkflowEnvironment,
    redis_url: str,
    make_worker: WorkerFactory,
    redis_client: aioredis.Redis,
) -> None:
    # A threshold low enough that a job's plans, observations and results leave history.
    store = PayloadStoreSettings(url=redis_url, threshold_bytes=256, ttl_seconds=600)
    config = env.client.config()
    config["data_converter"] = keel_data_converter(payload_store=store)
    client = Client(**config)
    tenant = unique("acme")
    req = JobRequest(goal="What is 2 * (3 + 4)? Use the calculator.", tenant=tenant)
    async with make_worker(client) as worker:
        jobs = AgentJobs(client, task_queue=worker.task_queue)
        job_id = await jobs.start(req, request_key=unique("job"))
        result = await jobs.result(job_id, timeout=120)
    assert result.outcome == "completed"

    history = await client.get_workflow_handle(job_id).fetch_history()
    assert references(history), "no payload went by reference"
    keys = [k async for k in redis_client.scan_iter(f"{KEY_PREFIX}{{{tenant}}}:*")]
    assert keys and all(f":{job_id}:" in k for k in keys)
    assert set(references(history)) <= set(keys)
    replayer = Replayer(
        workflows=WORKFLOWS,
        data_converter=dataclasses.replace(client.data_converter),
        workflow_runner=UnsandboxedWorkflowRunner(),
    )
    await replayer.replay_workflow(history)
