"""Encrypted payloads end to end (issue 16): a real worker and job, the server's raw history,
rotation with replay, and a key removed too early."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
from google.protobuf.message import Message
from temporalio.api.common.v1 import Payload
from temporalio.client import Client, WorkflowHistory
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Replayer

from keel.activities.converter import keel_data_converter
from keel.activities.encryption import KeyRing
from keel.client import AgentJobs, JobRequest
from keel.workers.registry import WORKFLOWS
from keel.workflows.types import JobResult
from tests.conftest import unique

KEY_A, KEY_B = os.urandom(32), os.urandom(32)


def encrypted_client(env: WorkflowEnvironment, *keys: tuple[str, bytes]) -> Client:
    converter = keel_data_converter(KeyRing(list(keys)))
    return Client(
        env.client.service_client, namespace=env.client.namespace, data_converter=converter
    )


def payloads(message: Message, path: str = "") -> Iterator[tuple[str, Payload]]:
    """Every Payload inside ``message``, with the field path that leads to it."""
    if isinstance(message, Payload):
        yield path, message
        return
    for field, value in message.ListFields():
        where = f"{path}.{field.name}"
        if field.message_type is None:
            continue
        if field.message_type.GetOptions().map_entry:
            for key, item in value.items():
                if isinstance(item, Message):
                    yield from payloads(item, f"{where}[{key}]")
        elif isinstance(value, Message):
            yield from payloads(value, where)
        else:  # a repeated message field
            for item in value:
                yield from payloads(item, where)


@pytest.fixture(scope="module")
def recorded() -> dict[str, Any]:
    return {}


async def test_a_job_runs_encrypted_and_its_history_holds_no_plaintext(
    env: WorkflowEnvironment, make_worker, recorded: dict[str, Any]
) -> None:
    marker = unique("zebra-quartz")
    goal = f"What is 6 * 7? use calculator ({marker})"
    client = encrypted_client(env, ("a", KEY_A))
    async with make_worker(client) as worker:
        jobs = AgentJobs(client, task_queue=worker.task_queue)
        job_id = await jobs.start(JobRequest(goal=goal, tenant=unique("acme")))
        result = await jobs.result(job_id, timeout=120)
        status = await jobs.status(job_id)
    assert result.outcome == "completed" and "42" in (result.answer or "")
    assert status.job_id == job_id

    # Read the history as the server holds it: no codec, raw protobuf bytes.
    raw_client = Client(env.client.service_client, namespace=env.client.namespace)
    history = await raw_client.get_workflow_handle(job_id).fetch_history()
    raw = b"".join(event.SerializeToString() for event in history.events)
    assert marker.encode() not in raw and b"6 * 7" not in raw
    found = [pair for event in history.events for pair in payloads(event)]
    kinds: dict[bytes, int] = {}
    for path, payload in found:
        if "search_attributes" in path or "[patch-data]" in path:
            # Neither passes through a codec: search attributes (tenant, state, outcome) and
            # the patch IDs Temporal's core records for ``workflow.patched``.
            continue
        encoding = payload.metadata["encoding"]
        kinds[encoding] = kinds.get(encoding, 0) + 1
        if encoding != b"binary/encrypted":
            # Only operator text is left readable, and it says nothing about the goal.
            assert path.endswith("user_metadata.summary") or path.endswith("details"), path
            assert payload.metadata["keel-text"] == b"plain", path
    assert kinds[b"binary/encrypted"] > 5
    assert kinds.get(b"json/plain", 0) >= 2  # "plan · iteration 1", the static details
    summaries = [
        p.data.decode()
        for path, p in found
        if path.endswith("user_metadata.summary") and "keel-text" in p.metadata
    ]
    assert any("iteration 1" in s for s in summaries) and any(
        "tool calculator" in s for s in summaries
    )

    # The current details come from a query whose result stays plain too.
    description = await client.get_workflow_handle(job_id).describe()
    assert await description.static_summary() == goal  # encrypted in history, decoded here
    assert "**Tools:**" in (await description.static_details() or "")
    recorded.update(job_id=job_id, history=history)


async def test_after_rotation_old_histories_replay_and_results_read(
    env: WorkflowEnvironment, recorded: dict[str, Any]
) -> None:
    if not recorded:
        pytest.skip("needs the job of the test above")
    history: WorkflowHistory = recorded["history"]
    rotated = keel_data_converter(KeyRing([("b", KEY_B), ("a", KEY_A)]))
    replayer = Replayer(workflows=WORKFLOWS, data_converter=rotated)
    await replayer.replay_workflow(history)
    client = encrypted_client(env, ("b", KEY_B), ("a", KEY_A))
    result = await client.get_workflow_handle(recorded["job_id"], result_type=JobResult).result()
    assert result.outcome == "completed"


async def test_with_the_old_key_removed_reading_fails_naming_the_key_id(
    env: WorkflowEnvironment, recorded: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    if not recorded:
        pytest.skip("needs the job of the test above")
    only_b = keel_data_converter(KeyRing([("b", KEY_B)]))
    replayer = Replayer(workflows=WORKFLOWS, data_converter=only_b)
    outcome = await replayer.replay_workflow(recorded["history"], raise_on_replay_failure=False)
    # The replayer reports the activation it could not decode; the SDK logs the codec's error.
    assert outcome.replay_failure is not None
    assert any("key ID 'a'" in str(r.exc_info and r.exc_info[1]) for r in caplog.records)
    client = encrypted_client(env, ("b", KEY_B))
    with pytest.raises(Exception, match=r"key ID 'a'.*keys held: b"):
        await client.get_workflow_handle(recorded["job_id"], result_type=JobResult).result()
