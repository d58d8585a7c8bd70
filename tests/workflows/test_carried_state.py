"""Carried state the workflow did not write is refused (issue 13).

``AgentLoopInput.state`` is what continue-as-new hands the next run, and anyone who can start
the workflow directly can hand it one too. These tests start ``AgentLoopWorkflow`` that way, as
an attacker holding Temporal access would, with state no run of Keel could have written: the
job fails at once with ``InvalidCarriedState``, runs no activity, and nothing of the other
job's stored output reaches its history. State a run could have written still carries over.
"""

from __future__ import annotations

import asyncio
import base64
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import redis.asyncio as aioredis
from temporalio.api.common.v1 import Payload
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client, WorkflowFailureError, WorkflowHistory
from temporalio.exceptions import ApplicationError

from keel.activities import errors
from keel.activities.converter import decompress_payload
from keel.activities.store import KeelStore, blob_ref
from keel.activities.types import Observation, Usage
from keel.workflows.agent_loop import AgentLoopWorkflow
from keel.workflows.types import AgentLoopInput, JobRequest, JobResult, LoopCounters, LoopState
from tests.conftest import unique

SECRET = "job A's private output: " + "the launch code is 0000. " * 40
"""Longer than a preview, as an output stored by reference is."""


def job_id(tenant: str) -> str:
    return f"agent-job-{tenant}:{unique('k')}"


def carried(**fields: Any) -> LoopState:
    """State shaped like a second run's, started a minute ago, changed by ``fields``."""
    base: dict[str, Any] = {
        "state": "refining",
        "iteration": 1,
        "runs": 2,
        "started_at": datetime.now(UTC) - timedelta(minutes=1),
    }
    return LoopState(**(base | fields))


def history_payloads(history: WorkflowHistory) -> str:
    """Every payload of a history, decompressed and decoded, as one text."""
    texts: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, list):
            for item in node:
                walk(item)
        elif isinstance(node, dict):
            if isinstance(node.get("data"), str) and isinstance(node.get("metadata"), dict):
                payload = Payload(
                    metadata={k: base64.b64decode(v) for k, v in node["metadata"].items()},
                    data=base64.b64decode(node["data"]),
                )
                texts.append(decompress_payload(payload).data.decode("utf-8", "replace"))
            for value in node.values():
                walk(value)

    walk(history.to_json_dict())
    return "\n".join(texts)


async def refused(
    client: Client, task_queue: str, req: JobRequest, state: LoopState, workflow_id: str
) -> tuple[ApplicationError, WorkflowHistory]:
    """Start the workflow directly with ``state``; return its failure and its history."""
    handle = await client.start_workflow(
        AgentLoopWorkflow.run,
        AgentLoopInput(request=req, state=state),
        id=workflow_id,
        task_queue=task_queue,
    )
    with pytest.raises(WorkflowFailureError) as failed:
        # A workflow-task failure would retry forever instead: the timeout would fire.
        await asyncio.wait_for(handle.result(), 30)
    cause = failed.value.cause
    assert isinstance(cause, ApplicationError)
    assert cause.type == errors.INVALID_CARRIED_STATE and cause.non_retryable
    history = await handle.fetch_history()
    kinds = {event.event_type for event in history.events}
    assert EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED not in kinds  # nothing ran for it
    assert EventType.EVENT_TYPE_WORKFLOW_TASK_FAILED not in kinds  # failed, never stuck
    result = JobResult.model_validate(cause.details[0])
    assert (result.outcome, result.job_id, result.answer) == ("failed", workflow_id, None)
    assert result.usage.steps == result.usage.tokens == 0  # nothing of the state was used
    return cause, history


COUNTER_CASES: dict[str, tuple[LoopState, str]] = {
    "negative steps": (carried(counters=LoopCounters(steps=-1000)), "counters.steps"),
    "negative tool calls": (
        carried(counters=LoopCounters(tool_calls=-50)),
        "counters.tool_calls",
    ),
    "negative retries": (
        carried(counters=LoopCounters(retries_by_tool={"http_get": -10})),
        "retries_by_tool",
    ),
    "negative tokens": (
        carried(counters=LoopCounters(usage=Usage(prompt_tokens=-1_000_000))),
        "prompt_tokens",
    ),
    "negative dollars": (
        carried(counters=LoopCounters(usage=Usage(cost_usd=-100.0))),
        "cost_usd",
    ),
    "negative questions": (carried(counters=LoopCounters(questions=-5)), "questions"),
    "negative iteration": (carried(iteration=-100), "iteration"),
    "a wait longer than the job ran": (
        carried(counters=LoopCounters(waited_seconds=10_000_000.0)),
        "waited_seconds",
    ),
    "a start in the future": (
        carried(started_at=datetime.now(UTC) + timedelta(days=365)),
        "started_at",
    ),
    "a start without a time zone": (
        carried(started_at=datetime(2020, 1, 1)),  # naive: the crafted part
        "started_at",
    ),
    "no start at all": (carried(started_at=None), "started_at"),
}


async def test_counters_that_would_add_budget_back_are_refused(client: Client, make_worker) -> None:
    tenant = unique("acme")
    req = JobRequest(goal="What is 2 + 2?", tenant=tenant)
    async with make_worker(client) as worker:
        for case, (state, field) in COUNTER_CASES.items():
            cause, _ = await refused(client, worker.task_queue, req, state, job_id(tenant))
            assert field in cause.message, (case, cause.message)


async def test_a_ref_to_another_jobs_stored_output_is_refused(
    client: Client, make_worker, redis_client: aioredis.Redis
) -> None:
    store = KeelStore(redis_client)
    tenant, other_tenant = unique("acme"), unique("evil")
    job_a = job_id(tenant)
    # Job A's output, stored as the tool gateway stores it (blob_ref(tenant, op_key)).
    ref_a = await store.put_blob(tenant, f"{job_a}:0:s1", SECRET)
    assert ref_a == blob_ref(tenant, f"{job_a}:0:s1")
    cases = {
        "another job of the tenant": (tenant, job_id(tenant), ref_a),
        "another tenant's job": (other_tenant, job_id(other_tenant), ref_a),
        # The workflow ID alone proves nothing: a direct start can reuse job A's.
        "job A's own ID under another tenant": (other_tenant, job_a, ref_a),
        "a key that is not a blob": (tenant, job_id(tenant), f"keel:idem:{tenant}:{job_a}:0:s1"),
    }
    async with make_worker(client) as worker:
        for case, (job_tenant, job_b, ref) in cases.items():
            req = JobRequest(goal=f"Summarise what step s1 fetched ({case})", tenant=job_tenant)
            stolen = Observation(step_id="s1", name="http_get", ref=ref, size=len(SECRET))
            state = carried(observations=[stolen])
            cause, history = await refused(client, worker.task_queue, req, state, job_b)
            assert "another job" in cause.message, (case, cause.message)
            text = history_payloads(history)
            assert req.goal in text  # the payloads were read: the input is there ...
            assert "launch code" not in text, case  # ... and nothing of A's output is
    assert await store.get_blob(ref_a, job_id=job_a) == SECRET  # untouched


async def test_state_a_run_could_have_written_carries_over(
    client: Client, make_worker, redis_client: aioredis.Redis
) -> None:
    """The checks refuse nothing Keel writes: own refs and real counters are kept."""
    store = KeelStore(redis_client)
    tenant = unique("acme")
    job = job_id(tenant)
    ref = await store.put_blob(tenant, f"{job}:0:s1", "HTTP 200\n" + "x" * 1000)
    counters = LoopCounters(
        steps=3,
        tool_calls=1,
        usage=Usage(prompt_tokens=900, completion_tokens=100, cost_usd=0.001),
        waited_seconds=5.0,
    )
    own = Observation(step_id="s1", name="http_get", ref=ref, size=1009, content="HTTP 200")
    state = carried(counters=counters, observations=[own])
    req = JobRequest(goal="What is 2 + 2?", tenant=tenant)
    async with make_worker(client) as worker:
        handle = await client.start_workflow(
            AgentLoopWorkflow.run,
            AgentLoopInput(request=req, state=state),
            id=job,
            task_queue=worker.task_queue,
        )
        # The model activities read the stored output: the store's own check passes too.
        result = await asyncio.wait_for(handle.result(), 60)
    assert result.outcome == "completed", result
    assert result.usage.steps > counters.steps  # counted on from the carried counters
    assert result.usage.tokens > counters.usage.total_tokens
