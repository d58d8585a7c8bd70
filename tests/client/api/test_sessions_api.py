"""The sessions HTTP API (issue 15) over real HTTP (uvicorn), real Temporal, Redis and the
simulator: a conversation's whole life, resends answered once, answers inline with ``wait``,
an event stream across turns that resumes without loss or repeats, refusals as 409s with
their codes, and another tenant's session a 404 on every route."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
import uvicorn
from temporalio.client import Client

from keel.activities.llm import LLMConfig
from keel.activities.slots import CONCURRENCY_KEY, slots_for
from keel.client.api import create_app
from keel.client.api.keys import ApiKeys
from keel.client.api.session_events import SessionCursor
from keel.client.errors import InvalidJobRequest
from tests.conftest import SESSION_CACHE, free_port, unique

PINNED = LLMConfig(
    planner_model="sim-small",
    verifier_model="sim-small",
    answerer_model="sim-small",
    tier_models={"router": "sim-small", "fast": "sim-small", "deep": "sim-large"},
    job_header=True,  # the simulator then records each job's prompts (GET /sim/calls/{job})
)


@dataclass
class Sse:
    event: str
    id: str
    data: Any


@pytest.fixture
async def keys(redis_url: str) -> AsyncIterator[ApiKeys]:
    redis = aioredis.Redis.from_url(redis_url, socket_timeout=5)
    yield ApiKeys(redis)
    await redis.aclose()


@pytest.fixture
async def http(client: Client, keys: ApiKeys, make_worker) -> AsyncIterator[httpx.AsyncClient]:  # type: ignore[no-untyped-def]
    """The API served by uvicorn on a free port (streams need a real server), with a worker."""
    async with make_worker(client, llm_config=PINNED, max_cached_workflows=SESSION_CACHE) as worker:
        app = create_app(client, keys, task_queue=worker.task_queue)
        port = free_port()
        server = uvicorn.Server(uvicorn.Config(app, port=port, log_level="warning"))
        serving = asyncio.create_task(server.serve())
        while not server.started:
            await asyncio.sleep(0.02)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=90) as http:
            yield http
        server.should_exit = True
        await serving


async def member(keys: ApiKeys, prefix: str = "acme") -> tuple[str, dict[str, str]]:
    tenant = unique(prefix)
    key, _ = await keys.create(tenant, user="alice")
    return tenant, {"Authorization": f"Bearer {key}"}


async def open_session(http: httpx.AsyncClient, auth: dict[str, str], **body: Any) -> str:
    opened = await http.post("/v1/sessions", json={"tools": ["calculator"], **body}, headers=auth)
    assert opened.status_code == 201, opened.text
    return str(opened.json()["session_id"])


async def read_events(
    http: httpx.AsyncClient,
    session_id: str,
    auth: dict[str, str],
    *,
    after: str | None = None,
    until: Callable[[Sse], bool] | None = None,
) -> list[Sse]:
    """Events of one connection, until ``until(event)`` holds or the stream ends."""
    headers = auth | ({"Last-Event-ID": after} if after else {})
    events: list[Sse] = []
    url = f"/v1/sessions/{session_id}/events"
    async with http.stream("GET", url, headers=headers) as response:
        assert response.status_code == 200, await response.aread()
        fields: dict[str, str] = {}
        async for line in response.aiter_lines():
            if line:
                name, _, value = line.partition(":")
                fields[name] = fields.get(name, "") + value.removeprefix(" ")
                continue
            if "event" in fields:
                events.append(Sse(fields["event"], fields["id"], json.loads(fields["data"])))
                if until is not None and until(events[-1]):
                    break
            fields = {}
    return events


async def test_a_conversation_over_http_from_open_to_end(
    http: httpx.AsyncClient, keys: ApiKeys, sim_url: str
) -> None:
    tenant, auth = await member(keys)
    key = unique("chat")
    session_id = await open_session(http, auth, session_key=key, budget={"max_turns": 10})
    assert session_id == f"agent-session-{tenant}:{key}"
    again = await http.post("/v1/sessions", json={"session_key": key}, headers=auth)
    assert again.status_code == 201 and again.json()["session_id"] == session_id  # the same one
    messages = again.json()["links"]["messages"]

    first = await http.post(
        messages, json={"text": "What is 17 * 23? use calculator"}, headers=auth,
        params={"wait": 60},
    )  # fmt: skip
    assert first.status_code == 200, first.text
    assert first.json()["turn"] == 1 and first.json()["result"]["outcome"] == "completed"
    assert "391" in first.json()["result"]["answer"]
    assert first.json()["job_id"] == f"agent-job-{tenant}:{key}.t1"

    idem = auth | {"Idempotency-Key": "msg-2"}
    second = await http.post(messages, json={"text": "and add 100 to that"}, headers=idem)
    assert second.status_code == 202 and second.json()["turn"] == 2
    assert second.json()["duplicate"] is False and second.json()["message_id"] == "msg-2"
    resent = await http.post(
        messages, json={"text": "and add 100 to that"}, headers=idem, params={"wait": 60}
    )
    assert resent.status_code == 200 and resent.json()["duplicate"] is True
    assert resent.json()["job_id"] == second.json()["job_id"]
    assert resent.json()["result"]["outcome"] == "completed"
    async with httpx.AsyncClient() as sim:  # what turn 2's model calls were sent
        calls = await sim.get(f"{sim_url.removesuffix('/v1')}/sim/calls/{resent.json()['job_id']}")
    prompts = [c["prompt"] for c in calls.json()["calls"]]
    assert prompts and all("391" in p for p in prompts)  # turn 1's answer, carried
    job = await http.get(resent.json()["links"]["self"], headers=auth)
    assert job.status_code == 200 and job.json()["state"] == "completed"  # a job like any

    status = (await http.get(f"/v1/sessions/{session_id}", headers=auth)).json()
    assert status["usage"]["turns"] == 2 and status["budget"]["max_turns"] == 10
    assert [t["turn"] for t in status["turns"]] == [1, 2]  # the resend ran nothing
    assert status["usage"]["cost_usd"] > 0 and status["phase"] == "idle"

    ended = await http.delete(f"/v1/sessions/{session_id}", headers=auth)
    assert ended.status_code == 202 and ended.json()["session_id"] == session_id
    for _ in range(100):
        status = (await http.get(f"/v1/sessions/{session_id}", headers=auth)).json()
        if status["phase"] == "ended":
            break
        await asyncio.sleep(0.1)
    assert status["phase"] == "ended"
    late = await http.post(messages, json={"text": "one more"}, headers=auth)
    assert late.status_code == 409 and late.json()["error"]["code"] == "session_ended"
    reopened = await http.post("/v1/sessions", json={"session_key": key}, headers=auth)
    assert reopened.status_code == 409 and reopened.json()["error"]["code"] == "session_ended"
    again_ended = await http.delete(f"/v1/sessions/{session_id}", headers=auth)
    assert again_ended.status_code == 202 and again_ended.json()["phase"] == "ended"
    assert [t["message_id"] for t in again_ended.json()["turns"]][1] == "msg-2"


async def test_events_run_across_turns_and_resume_without_loss_or_repeats(
    http: httpx.AsyncClient, keys: ApiKeys
) -> None:
    _, auth = await member(keys)
    session_id = await open_session(http, auth)
    messages = f"/v1/sessions/{session_id}/messages"
    for text in ("What is 6 * 7? use calculator", "and subtract 2 from that"):
        sent = await http.post(messages, json={"text": text}, headers=auth)
        assert sent.status_code == 202

    def mid_turn_one(e: Sse) -> bool:
        return e.event == "progress" and e.id.startswith("t1.") and e.data["kind"] == "step"

    def turn_two_started(e: Sse) -> bool:
        return e.event == "turn_started" and e.data["turn"] == 2

    def turn_two_done(e: Sse) -> bool:
        return e.event == "turn_done" and e.data["turn"] == 2

    # Three connections, each dropped: inside turn 1's job, just as turn 2 starts, at its end.
    parts = [await read_events(http, session_id, auth, until=mid_turn_one)]
    for until in (turn_two_started, turn_two_done):
        parts.append(await read_events(http, session_id, auth, after=parts[-1][-1].id, until=until))
    assert (await http.delete(f"/v1/sessions/{session_id}", headers=auth)).status_code == 202
    parts.append(await read_events(http, session_id, auth, after=parts[-1][-1].id))
    pieced = [e for part in parts for e in part]
    # The whole stream again, from the start, once the session has ended: the same events.
    whole = await read_events(http, session_id, auth)

    def progress(events: list[Sse]) -> list[tuple[str, int, int]]:
        at = [(e.event, SessionCursor.parse(e.id)) for e in events if e.event != "token"]
        return [(name, c.turn, c.job.progress) for name, c in at]

    def tokens(events: list[Sse]) -> list[tuple[int, str]]:
        at = [SessionCursor.parse(e.id) for e in events if e.event == "token"]
        return [(c.turn, c.job.tokens) for c in at]

    # Nothing lost, nothing repeated, from either source a turn's job events come from (how
    # the two interleave may differ between a live read and a replay).
    assert progress(pieced) == progress(whole)
    assert tokens(pieced) == tokens(whole)
    assert len({e.id for e in pieced[:-1]}) == len(pieced) - 1
    assert pieced[-1].id == pieced[-2].id  # ``session_ended`` is where the last turn left off
    names = [(e.event, SessionCursor.parse(e.id).turn) for e in pieced if e.event != "progress"]
    names = [n for n in names if n[0] != "token"]
    assert names == [
        ("turn_accepted", 1), ("turn_started", 1), ("turn_done", 1),
        ("turn_accepted", 2), ("turn_started", 2), ("turn_done", 2),
        ("session_ended", 2),
    ]  # fmt: skip
    for turn in (1, 2):
        offsets = [
            SessionCursor.parse(e.id).job.progress
            for e in pieced
            if e.event == "progress" and e.id.startswith(f"t{turn}.")
        ]
        assert offsets == list(range(1, len(offsets) + 1)) and len(offsets) > 3
    done = [e.data for e in pieced if e.event == "turn_done"]
    assert [d["result"]["outcome"] for d in done] == ["completed", "completed"]
    assert "42" in done[0]["answer"] and done[1]["job_id"].endswith(".t2")
    assert pieced[-1].data["phase"] == "ended" and pieced[-1].data["usage"]["turns"] == 2


async def test_another_tenants_session_is_not_found_on_every_route(
    http: httpx.AsyncClient, keys: ApiKeys
) -> None:
    _, acme = await member(keys, "acme")
    _, globex = await member(keys, "globex")
    operator, _ = await keys.create("ops", role="operator")
    session_id = await open_session(http, acme)
    base = f"/v1/sessions/{session_id}"
    attempts = [
        http.get(base, headers=globex),
        http.get(f"{base}/events", headers=globex),
        http.post(f"{base}/messages", json={"text": "mine now"}, headers=globex),
        http.delete(base, headers=globex),
        http.get(f"/v1/sessions/agent-session-{unique('nobody')}:x", headers=acme),
        http.get("/v1/sessions/not-a-session-id", headers=acme),
    ]
    for attempt in attempts:
        refused = await attempt
        assert refused.status_code == 404, refused.text
        assert refused.json()["error"]["code"] == "session_not_found"
    # Untouched: no turn was queued, and an operator reads it.
    seen = await http.get(base, headers={"Authorization": f"Bearer {operator}"})
    assert seen.status_code == 200 and seen.json()["turns"] == []
    assert (await http.delete(base, headers=acme)).status_code == 202


async def test_an_exhausted_session_refuses_with_a_409_naming_the_budget(
    http: httpx.AsyncClient, keys: ApiKeys
) -> None:
    _, auth = await member(keys, "broke")
    session_id = await open_session(http, auth, budget={"max_cost_usd": 0.0003})
    messages = f"/v1/sessions/{session_id}/messages"
    answers = []
    for n in range(6):  # the session charges each turn, then refuses the next
        sent = await http.post(
            messages, json={"text": f"What is {n} + 2? use calculator"}, headers=auth,
            params={"wait": 60},
        )  # fmt: skip
        if sent.status_code != 200:
            break
        answers.append(sent.json()["result"]["outcome"])
    assert answers and sent.status_code == 409, sent.text
    assert sent.json()["error"]["code"] == "session_budget_exhausted"
    assert sent.json()["error"]["budget"] == "max_cost_usd"
    assert "max_cost_usd" in sent.json()["error"]["message"]
    status = (await http.get(f"/v1/sessions/{session_id}", headers=auth)).json()
    assert status["usage"]["cost_usd"] <= 0.0003 + 1e-9  # refused before it could overrun
    assert status["usage"]["turns"] == len(answers)
    await http.delete(f"/v1/sessions/{session_id}", headers=auth)


async def test_turns_hold_running_job_slots_like_jobs(
    http: httpx.AsyncClient, keys: ApiKeys, redis_client: aioredis.Redis
) -> None:
    tenant, auth = await member(keys, "limited")
    await redis_client.hset(CONCURRENCY_KEY, f"per_tenant:{tenant}", "1")
    session_id = await open_session(http, auth)
    messages = f"/v1/sessions/{session_id}/messages"
    asked = await http.post(messages, json={"text": "Book the usual [sim: ask]"}, headers=auth)
    slots = slots_for(redis_client)
    for _ in range(100):  # the turn takes the tenant's one slot and waits for its answer
        if await slots.counts(tenant) == (1, 0):
            break
        await asyncio.sleep(0.1)
    assert await slots.counts(tenant) == (1, 0)
    body = {"goal": "What is 2 + 2? use calculator", "tools": ["calculator"]}
    job_id = (await http.post("/v1/jobs", json=body, headers=auth)).json()["job_id"]
    for _ in range(100):  # so a job of the same tenant waits in line behind the turn
        if await slots.counts(tenant) == (1, 1):
            break
        await asyncio.sleep(0.1)
    assert await slots.counts(tenant) == (1, 1)
    assert (await http.get(f"/v1/jobs/{job_id}", headers=auth)).json()["state"] == "queued"
    for _ in range(100):  # a message is the turn's answer once the session knows it asks
        status = (await http.get(f"/v1/sessions/{session_id}", headers=auth)).json()
        if status["turns"][0]["state"] == "waiting_for_input":
            break
        await asyncio.sleep(0.1)
    answer = await http.post(
        messages, json={"text": "Tuesday at eight"}, headers=auth, params={"wait": 60}
    )
    assert answer.json()["turn"] == asked.json()["turn"] == 1  # the message was the answer
    assert answer.json()["result"]["outcome"] == "completed"
    done = await http.get(f"/v1/jobs/{job_id}/result", headers=auth, params={"wait": 60})
    assert done.json()["outcome"] == "completed"  # it ran once the turn gave the slot back
    await http.delete(f"/v1/sessions/{session_id}", headers=auth)


async def test_bad_input_is_a_4xx_naming_the_field(http: httpx.AsyncClient, keys: ApiKeys) -> None:
    tenant, auth = await member(keys, "strict")
    cases: list[tuple[dict[str, Any], int, str]] = [
        ({"session_key": "a b"}, 422, "session_key"),
        ({"tenant": "globex"}, 422, "tenant"),  # the key decides the tenant
        ({"budget": {"max_turns": True}}, 422, "budget.max_turns"),  # a boolean, not a number
        ({"budget": {"max_cost_usd": 0}}, 422, "budget.max_cost_usd"),
        ({"turn_budget": {"max_steps": 0}}, 422, "turn_budget.max_steps"),
        ({"tools": ["rm_rf"]}, 400, "tools"),  # no such tool: every turn would fail
        ({"cache": 1}, 422, "cache"),
        ({"tier": "premium"}, 422, "tier"),
    ]
    for body, status, field in cases:
        refused = await http.post("/v1/sessions", json=body, headers=auth)
        assert refused.status_code == status, (body, refused.text)
        assert refused.json()["error"]["field"] == field, refused.text
    session_id = f"agent-session-{tenant}:{unique('s')}"
    messages = f"/v1/sessions/{session_id}/messages"
    for body, field in (({"text": "  "}, "text"), ({"text": "hi", "x": 1}, "x")):
        refused = await http.post(messages, json=body, headers=auth)
        assert refused.status_code == 422 and refused.json()["error"]["field"] == field
    bad_key = await http.post(
        messages, json={"text": "hi"}, headers=auth | {"Idempotency-Key": "a b"}
    )
    assert bad_key.status_code == 400 and bad_key.json()["error"]["field"] == "Idempotency-Key"
    not_seconds = await http.post(
        messages, json={"text": "hi"}, headers=auth, params={"wait": "yes"}
    )
    assert not_seconds.status_code == 422 and not_seconds.json()["error"]["field"] == "wait"
    opened = await open_session(http, auth)
    cursor = await http.get(
        f"/v1/sessions/{opened}/events", headers=auth | {"Last-Event-ID": "12:0-0"}
    )
    assert cursor.status_code == 400 and cursor.json()["error"]["field"] == "Last-Event-ID"
    await http.delete(f"/v1/sessions/{opened}", headers=auth)


def test_cursor_text_round_trips_and_refuses_garbage() -> None:
    for text in ("t0.d", "t3.a", "t3.s.12:1733212345678-0", "t3.s.0:0-0", "t12.d"):
        assert str(SessionCursor.parse(text)) == text
    assert SessionCursor.parse(None) == SessionCursor.parse(" ") == SessionCursor()
    for garbage in ("t3", "t3.s", "3.a", "t3.x", "t3.s.12", "t-1.d", "t3.a.0:0-0"):
        with pytest.raises(InvalidJobRequest):
            SessionCursor.parse(garbage)
