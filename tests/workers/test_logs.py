"""What a ``keel worker`` writes: one JSON object per line, the job ID on every line about a job,
and never its API key, there or in a job's history, even when the model endpoint echoes the key
back (the simulator's 401 names it masked, as OpenAI's does).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from temporalio.api.common.v1 import Payload
from temporalio.testing import WorkflowEnvironment

from keel.activities.converter import DATA_CONVERTER
from keel.client import AgentJobs, JobFailed, JobRequest
from keel.workers.logs import loggable_url
from tests.conftest import unique
from tests.workers.conftest import GRACE_SECONDS, StartWorker, wait_polling

SUFFIX = "QZXW"
"""The key's last four characters, which a masked key shows; never in a hex job ID."""
KEY = f"sk-keel-test-{uuid.uuid4().hex[:16]}{SUFFIX}"


def payloads(message: Message) -> Iterator[Payload]:
    """Every Payload anywhere inside a protobuf message (inputs, results, summaries, memo)."""
    for field, value in message.ListFields():
        if field.type != FieldDescriptor.TYPE_MESSAGE:
            continue
        if field.message_type.GetOptions().map_entry:
            items = list(value.values())
        elif field.is_repeated:
            items = list(value)
        else:
            items = [value]
        for item in items:
            if isinstance(item, Payload):
                yield item
            elif isinstance(item, Message):
                yield from payloads(item)


async def history_text(env: WorkflowEnvironment, job_id: str) -> str:
    """A job's whole history as text, every payload decoded through Keel's codec."""
    history = await env.client.get_workflow_handle(job_id).fetch_history()
    found = [p for event in history.events for p in payloads(event)]
    assert DATA_CONVERTER.payload_codec is not None
    decoded = await DATA_CONVERTER.payload_codec.decode(found)
    texts = [p.data.decode(errors="replace") for p in decoded]
    return json.dumps(history.to_json_dict()) + "\n".join(texts)


def records(text: str) -> list[dict[str, Any]]:
    """The log's lines as JSON objects; the test fails on the first line that is not one."""
    parsed = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                parsed.append(json.loads(line))
            except json.JSONDecodeError:
                pytest.fail(f"log line {number} is not JSON: {line[:200]}")
    return parsed


def test_an_endpoint_is_logged_without_credentials() -> None:
    url = "https://svc:pa%40ss@llm.example:8443/v1?api-key=abc123#frag"
    assert loggable_url(url) == "https://llm.example:8443/v1"
    assert loggable_url("http://127.0.0.1:8089/v1") == "http://127.0.0.1:8089/v1"


async def test_worker_logs_are_json_with_job_ids_and_no_key_anywhere(
    env: WorkflowEnvironment, start_worker: StartWorker, sim_url: str
) -> None:
    task_queue = unique("tq-logs")
    worker = start_worker(task_queue, "logs-1", OPENAI_API_KEY=KEY)
    await wait_polling(env.client, task_queue, [worker])
    jobs = AgentJobs(env.client, task_queue=task_queue)
    ok = await jobs.start(
        JobRequest(goal="What is 2 + 3? Use the calculator [sim: fault=503x1]", tenant="logs")
    )
    denied = await jobs.start(JobRequest(goal="What is 1 + 1? [sim: fault=401]", tenant="logs"))
    assert (await jobs.result(ok, timeout=120)).outcome == "completed"
    with pytest.raises(JobFailed) as failed:
        await jobs.result(denied, timeout=120)
    assert failed.value.cause_type == "LLMAuthFailed"
    assert "[redacted]" in str(failed.value)
    worker.proc.terminate()
    assert await asyncio.to_thread(worker.proc.wait, GRACE_SECONDS) == 0

    text = worker.log.read_text()
    logged = records(text)
    assert all({"event", "level", "timestamp", "logger"} <= r.keys() for r in logged)
    started = [r for r in logged if r["event"] == "worker.started"]
    assert [r["llm_endpoint"] for r in started] == [sim_url]
    about_jobs = [
        r for r in logged if r["logger"].startswith(("keel.activities.", "temporalio.activity"))
    ]
    assert {r.get("job_id") for r in about_jobs} == {ok, denied}, about_jobs
    failures = {(r["job_id"], r["error_type"]) for r in about_jobs if r["event"] == "llm.failed"}
    assert failures == {(ok, "LLMTransient"), (denied, "LLMAuthFailed")}
    sdk = [r for r in about_jobs if r["logger"] == "temporalio.activity"]
    # The faults hit model calls: the router's first (a router that fails for good starts the
    # job on the deep tier), then the planner's.
    activities = {"route_job", "plan_step"}
    assert sdk and all(r["activity"] in activities and r["attempt"] >= 1 for r in sdk)
    assert all(r["event"] == "Completing activity as failed" for r in sdk)

    for where, content in [
        ("the worker's log", text),
        (ok, await history_text(env, ok)),
        (denied, await history_text(env, denied)),
    ]:
        assert KEY not in content and SUFFIX not in content, where
    assert "[redacted]" in await history_text(env, denied)
