"""A job's event stream over real HTTP (uvicorn): SSE progress from the workflow stream, answer
tokens from Redis, a result at the end, resumable with Last-Event-ID without loss or repeats,
across continue-as-new, and scoped to the key's tenant."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
import uvicorn
from temporalio.client import Client

from keel.client._events import EventCursor
from keel.client.api import create_app
from keel.client.api.keys import ApiKeys
from keel.client.errors import InvalidJobRequest
from keel.workflows._progress import CARRIED
from keel.workflows.agent_loop import AgentLoopWorkflow
from keel.workflows.types import AgentLoopInput, JobRequest, job_id_for
from tests.conftest import free_port, unique


@dataclass
class Sse:
    event: str
    id: str | None
    data: Any


@pytest.fixture
async def keys(redis_url: str) -> AsyncIterator[ApiKeys]:
    redis = aioredis.Redis.from_url(redis_url, socket_timeout=5)
    yield ApiKeys(redis)
    await redis.aclose()


@pytest.fixture
async def task_queue() -> str:
    return unique("events-q")


@pytest.fixture
async def base_url(  # type: ignore[no-untyped-def]
    client: Client, keys: ApiKeys, make_worker, task_queue: str
) -> AsyncIterator[str]:
    """The API served by uvicorn on a free port (streaming needs a real server)."""
    async with make_worker(client, task_queue=task_queue) as worker:
        app = create_app(client, keys, task_queue=worker.task_queue)
        port = free_port()
        server = uvicorn.Server(uvicorn.Config(app, port=port, log_level="warning"))
        serving = asyncio.create_task(server.serve())
        while not server.started:
            await asyncio.sleep(0.02)
        yield f"http://127.0.0.1:{port}"
        server.should_exit = True
        await serving


async def read_events(
    http: httpx.AsyncClient, url: str, headers: dict[str, str], *, until: Any = None
) -> list[Sse]:
    """Events of one connection, until ``until(event)`` is true or the stream ends."""
    events: list[Sse] = []
    async with http.stream("GET", url, headers=headers) as response:
        assert response.status_code == 200, await response.aread()
        assert response.headers["content-type"].startswith("text/event-stream")
        fields: dict[str, str] = {}
        async for line in response.aiter_lines():
            if line:
                name, _, value = line.partition(":")
                fields[name] = fields.get(name, "") + value.removeprefix(" ")
                continue
            if "event" in fields:
                events.append(Sse(fields["event"], fields.get("id"), json.loads(fields["data"])))
                if until is not None and until(events[-1]):
                    break
            fields = {}
    return events


def offsets(events: list[Sse]) -> list[int]:
    return [EventCursor.parse(e.id).progress for e in events if e.event == "progress"]


async def test_events_resume_without_loss_and_end_with_the_result(
    base_url: str, keys: ApiKeys
) -> None:
    key, _ = await keys.create(unique("acme"))
    auth = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(base_url=base_url, timeout=60) as http:
        body = {"goal": "Book the usual [sim: ask]", "tools": ["calculator"]}
        job_id = (await http.post("/v1/jobs", json=body, headers=auth)).json()["job_id"]
        url = f"/v1/jobs/{job_id}/events"

        def asking(e: Sse) -> bool:
            return e.event == "progress" and e.data["state"] == "waiting_for_input"

        first = await read_events(http, url, auth, until=asking)  # then the client drops
        assert first[0].data["kind"] == "started" and offsets(first)[0] == 1
        answered = await http.post(f"/v1/jobs/{job_id}/answer", json={"text": "the blue one"})
        assert answered.status_code == 401  # no key, no answer
        await http.post(f"/v1/jobs/{job_id}/answer", json={"text": "the blue one"}, headers=auth)
        rest = await read_events(http, url, auth | {"Last-Event-ID": first[-1].id or ""})

    seen = offsets(first) + offsets(rest)
    assert seen == list(range(1, len(seen) + 1))  # every event once, in order, none lost
    kinds = [e.data["kind"] for e in first + rest if e.event == "progress"]
    assert {"started", "question", "step", "verdict", "completed"} <= set(kinds)
    phases = [e.data["detail"] for e in first + rest if e.data.get("kind") == "phase"]
    assert phases[:2] == ["planning", "waiting_for_input"] and phases[-1] == "completed"
    assert rest[-1].event == "end" and rest[-1].data["outcome"] == "completed"
    assert sum(1 for e in first + rest if e.event == "end") == 1
    last = [e for e in rest if e.event == "progress"][-1].data
    assert last["usage"]["tokens"] > 0  # each event carries the job's budget use


async def test_events_follow_continue_as_new_and_replay_a_closed_job(
    client: Client, base_url: str, keys: ApiKeys, task_queue: str
) -> None:
    tenant = unique("acme")
    key, _ = await keys.create(tenant)
    auth = {"Authorization": f"Bearer {key}"}
    job_id = job_id_for(tenant, unique("can"))
    req = JobRequest(goal="What is 9 * 9? [sim: fail_verify=2]", tenant=tenant)
    await client.start_workflow(
        AgentLoopWorkflow.run,
        AgentLoopInput(request=req, continue_as_new_after=1),  # a new run every iteration
        id=job_id,
        task_queue=task_queue,
    )
    async with httpx.AsyncClient(base_url=base_url, timeout=60) as http:
        live = await read_events(http, f"/v1/jobs/{job_id}/events", auth)
        # The job has closed now: its stream again, read from the last run's carried events.
        again = await read_events(http, f"/v1/jobs/{job_id}/events", auth)
        middle = [e for e in live if e.event == "progress"][-5].id or ""
        tail = await read_events(http, f"/v1/jobs/{job_id}/events?after={middle}", auth)
    assert live[-1].event == again[-1].event == tail[-1].event == "end"
    assert live[-1].data["iterations"] == 3
    progress = offsets(live)
    assert progress == list(range(1, len(progress) + 1))  # one sequence across three runs
    assert sum(e.data["kind"] == "continue_as_new" for e in live if e.event == "progress") == 2
    # A closed job's stream is its last run's: the events carried into it (at most CARRIED)
    # and those it published, so the tail of the live sequence, never less than CARRIED.
    replayed = offsets(again)
    assert replayed == progress[-len(replayed) :] and len(replayed) >= min(CARRIED, len(progress))
    assert offsets(tail) == progress[-4:]


async def test_events_are_scoped_and_bad_cursors_are_refused(base_url: str, keys: ApiKeys) -> None:
    acme, _ = await keys.create(unique("acme"))
    globex, _ = await keys.create(unique("globex"))
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as http:
        body = {"goal": "What is 2 + 2? use calculator", "tools": ["calculator"]}
        owner = {"Authorization": f"Bearer {acme}"}
        created = await http.post("/v1/jobs", json=body, headers=owner)
        url = f"/v1/jobs/{created.json()['job_id']}/events"
        foreign = await http.get(url, headers={"Authorization": f"Bearer {globex}"})
        assert foreign.status_code == 404
        assert foreign.json()["error"]["code"] == "job_not_found"
        bad = await http.get(
            url, headers={"Authorization": f"Bearer {acme}", "Last-Event-ID": "12; DROP"}
        )
        assert bad.status_code == 400 and bad.json()["error"]["field"] == "Last-Event-ID"
        missing = await http.get(url + "x", headers={"Authorization": f"Bearer {acme}"})
        assert missing.status_code == 404


def test_cursor_text_round_trips_and_refuses_garbage() -> None:
    cursor = EventCursor(12, "1733212345678-3")
    assert EventCursor.parse(str(cursor)) == cursor
    assert EventCursor.parse(None) == EventCursor.parse("  ") == EventCursor()
    for bad in ("12", "x:1-0", "1:1", "-1:0-0", "1:0-0:2"):
        with pytest.raises(InvalidJobRequest):
            EventCursor.parse(bad)


async def test_answer_tokens_stream_beside_progress_and_add_up_to_the_answer(
    base_url: str, keys: ApiKeys, redis_client: aioredis.Redis
) -> None:
    key, _ = await keys.create(unique("acme"))
    auth = {"Authorization": f"Bearer {key}"}
    body = {"goal": "Explain 7 * 6 in a sentence [sim: fail_verify=1]", "tools": ["calculator"]}
    async with httpx.AsyncClient(base_url=base_url, timeout=60) as http:
        job_id = (await http.post("/v1/jobs", json=body, headers=auth)).json()["job_id"]
        events = await read_events(http, f"/v1/jobs/{job_id}/events", auth)
    end = events[-1]
    assert end.event == "end" and end.data["outcome"] == "completed"
    tokens = [e.data for e in events if e.event == "token"]
    last_draft = (end.data["iterations"] - 1, tokens[-1]["attempt"])
    text = "".join(t["text"] for t in tokens if (t["iteration"], t["attempt"]) == last_draft)
    assert text == end.data["answer"]
    assert {t["iteration"] for t in tokens} == {0, 1}  # both drafts streamed
    assert tokens[-1]["end"] is True
    # Tokens precede the verdict on their draft: they arrive while the job runs.
    first_token = next(i for i, e in enumerate(events) if e.event == "token")
    assert any(e.event == "progress" for e in events[first_token:])
    assert await redis_client.exists(f"keel:tokens:{job_id}")


async def keel_cli(*args: str, **env: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "keel.workers.cli",
        *args,
        env={k: v for k, v in os.environ.items() if k != "KEEL_API_URL"} | env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 90)
    return proc.returncode or 0, out.decode(), err.decode()


async def test_keel_watch_follows_the_stream_through_the_api_and_directly(
    client: Client, base_url: str, keys: ApiKeys, redis_url: str
) -> None:
    tenant = unique("acme")
    key, _ = await keys.create(tenant)
    auth = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(base_url=base_url, timeout=60) as http:
        body = {"goal": "What is 12 * 12? use calculator", "tools": ["calculator"]}
        job_id = (await http.post("/v1/jobs", json=body, headers=auth)).json()["job_id"]
    code, out, err = await keel_cli("watch", job_id, KEEL_API_URL=base_url, KEEL_API_KEY=key)
    assert code == 0, err
    assert "completed" in out and "144" in out
    target = client.service_client.config.target_host
    code, direct, err = await keel_cli(
        "watch", job_id, TEMPORAL_ADDRESS=target, TEMPORAL_NAMESPACE=client.namespace,
        REDIS_URL=redis_url,
    )  # fmt: skip
    assert code == 0, err
    assert "completed" in direct and "144" in direct
    other, _ = await keys.create(unique("globex"))
    code, _, err = await keel_cli("watch", job_id, KEEL_API_URL=base_url, KEEL_API_KEY=other)
    assert code == 1 and "not found" in err.lower()
