"""Sessions (issue 15): turns in order, each once, with the conversation carried and bounded.

Real Temporal, Redis and the simulator, which records what each model call of a job received
(``GET /sim/calls/{job}``), so the tests see the context a turn sent, not what Keel meant to send.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from temporalio.client import Client

from keel.activities.llm import LLMConfig
from keel.client.sessions import AgentSessions, SessionNotFound, SessionRefused
from keel.workflows.session_types import SessionBudget, SessionRequest, session_id_for
from tests.conftest import SESSION_CACHE, unique
from tests.workflows.test_agent_loop import replay_own_history

PINNED = LLMConfig(
    planner_model="sim-small",
    verifier_model="sim-small",
    answerer_model="sim-small",
    tier_models={"router": "sim-small", "fast": "sim-small", "deep": "sim-large"},
    job_header=True,
)


async def calls(sim_url: str, job_id: str) -> list[dict[str, Any]]:
    async with httpx.AsyncClient() as http:
        response = await http.get(f"{sim_url.removesuffix('/v1')}/sim/calls/{job_id}")
        response.raise_for_status()
        return list(response.json()["calls"])


async def test_later_turns_see_earlier_answers_and_nothing_of_another_session(
    client: Client, make_worker, sim_url: str
) -> None:
    tenant = unique("chat")
    req = SessionRequest(tenant=tenant, tools=["calculator"])
    async with make_worker(client, llm_config=PINNED, max_cached_workflows=SESSION_CACHE) as w:
        sessions = AgentSessions(client, task_queue=w.task_queue, tenant=tenant)
        key, other = unique("s"), unique("s")
        # Another session of the same tenant talks at the same time about something else.
        elsewhere = await sessions.send(req, other, "What is 5 + 5? mention zebra-other")
        turns = []
        for text in ("What is 17 * 23? use calculator", "and add 100 to that", "and double it"):
            accepted = await sessions.send(req, key, text)
            turns.append((accepted, await sessions.turn_result(accepted, timeout=60)))
        await sessions.turn_result(elsewhere, timeout=60)
        status = await sessions.status(session_id_for(tenant, key))

    assert [a.turn for a, _ in turns] == [1, 2, 3]
    assert all(r.outcome == "completed" for _, r in turns)
    assert "391" in (turns[0][1].answer or "")
    for accepted, _ in turns[1:]:
        prompts = [c["prompt"] for c in await calls(sim_url, accepted.job_id)]
        assert prompts and all('"conversation"' in p for p in prompts)
        assert all("391" in p for p in prompts), prompts[0][:500]
        assert not any("zebra-other" in p for p in prompts)
    assert status.usage.turns == 3 and status.phase == "idle"
    assert [t.state for t in status.turns] == ["done"] * 3
    assert [e.user for e in status.recent][-1] == "and double it"
    await replay_own_history(client, session_id_for(tenant, key), record_as="session_three_turns")


async def test_messages_sent_at_once_run_in_order_each_once(client: Client, make_worker) -> None:
    tenant = unique("order")
    req = SessionRequest(tenant=tenant, tools=["calculator"])
    async with make_worker(client, llm_config=PINNED, max_cached_workflows=SESSION_CACHE) as w:
        sessions = AgentSessions(client, task_queue=w.task_queue, tenant=tenant)
        key = unique("s")
        first = await sessions.send(req, key, "What is 1 + 1?", message_id="m1")
        second, third = await asyncio.gather(
            sessions.send(req, key, "What is 2 + 2?", message_id="m2"),
            sessions.send(req, key, "What is 3 + 3?", message_id="m3"),
        )
        again = await sessions.send(req, key, "What is 2 + 2?", message_id="m2")
        results = [await sessions.turn_result(a, timeout=60) for a in (first, second, third)]
        status = await sessions.status(session_id_for(tenant, key))
        history = await client.get_workflow_handle(session_id_for(tenant, key)).fetch_history()

    assert sorted([second.turn, third.turn]) == [2, 3] and first.turn == 1
    assert again.duplicate and again.turn == second.turn and again.job_id == second.job_id
    assert all(r.outcome == "completed" for r in results)
    assert [t.turn for t in status.turns] == [1, 2, 3] and status.usage.turns == 3
    started = [
        e
        for e in history.events
        if e.HasField("start_child_workflow_execution_initiated_event_attributes")
    ]
    assert len(started) == 3  # the resend started nothing
    ids = [e.start_child_workflow_execution_initiated_event_attributes.workflow_id for e in started]
    assert ids == [first.job_id, *sorted([second.job_id, third.job_id], key=lambda j: j[-1])]


async def test_a_question_inside_a_turn_is_answered_by_the_next_message(
    client: Client, make_worker
) -> None:
    tenant = unique("ask")
    req = SessionRequest(tenant=tenant, tools=["calculator"])
    async with make_worker(client, llm_config=PINNED, max_cached_workflows=SESSION_CACHE) as w:
        sessions = AgentSessions(client, task_queue=w.task_queue, tenant=tenant)
        key = unique("s")
        asked = await sessions.send(req, key, "Book the usual table [sim: ask]")
        session_id = session_id_for(tenant, key)
        for _ in range(100):
            status = await sessions.status(session_id)
            if status.turns and status.turns[0].state == "waiting_for_input":
                break
            await asyncio.sleep(0.1)
        assert status.turns[0].state == "waiting_for_input"
        reply = await sessions.send(req, key, "Tuesday at eight, by the window")
        result = await sessions.turn_result(asked, timeout=60)
        status = await sessions.status(session_id)
    assert reply.turn == asked.turn and reply.job_id == asked.job_id
    assert result.outcome == "completed" and "Tuesday at eight" in (result.answer or "")
    assert status.usage.turns == 1 and len(status.turns) == 1


async def test_an_exhausted_session_refuses_the_next_turn_and_stays_readable(
    client: Client, make_worker
) -> None:
    tenant = unique("broke")
    req = SessionRequest(
        tenant=tenant, tools=["calculator"], budget=SessionBudget(max_cost_usd=0.0003)
    )
    async with make_worker(client, llm_config=PINNED, max_cached_workflows=SESSION_CACHE) as w:
        sessions = AgentSessions(client, task_queue=w.task_queue, tenant=tenant)
        key = unique("s")
        first = await sessions.send(req, key, "What is 40 + 2? use calculator")
        await sessions.turn_result(first, timeout=60)
        with pytest.raises(SessionRefused) as refused:
            for n in range(5):  # the session charges the turn, then refuses the next
                await sessions.turn_result(await sessions.send(req, key, f"And {n}?"), timeout=60)
        status = await sessions.status(session_id_for(tenant, key))
    assert "max_cost_usd" in refused.value.reason
    assert status.usage.cost_usd <= 0.0003 + 1e-9
    assert status.turns and status.turns[0].outcome is not None


async def test_another_tenants_session_is_not_found(client: Client, make_worker) -> None:
    tenant, other = unique("a"), unique("b")
    async with make_worker(client, llm_config=PINNED, max_cached_workflows=SESSION_CACHE) as w:
        mine = AgentSessions(client, task_queue=w.task_queue, tenant=tenant)
        accepted = await mine.send(SessionRequest(tenant=tenant), "s1", "What is 1 + 2?")
        theirs = AgentSessions(client, task_queue=w.task_queue, tenant=other)
        with pytest.raises(SessionNotFound):
            await theirs.status(accepted.session_id)
        with pytest.raises(SessionNotFound):
            await theirs.end(accepted.session_id)
        # The same key in another tenant is another session.
        own = await theirs.send(SessionRequest(tenant=other), "s1", "What is 1 + 2?")
        assert own.session_id != accepted.session_id and own.turn == 1
        await mine.turn_result(accepted, timeout=60)
        await theirs.turn_result(own, timeout=60)


async def test_an_idle_session_ends_and_its_stored_outputs_expire(
    client: Client, make_worker, redis_url: str
) -> None:
    from keel.activities.store import KeelStore
    from keel.workflows.contract import Session

    tenant = unique("idle")
    req = SessionRequest(tenant=tenant, budget=SessionBudget(idle_timeout_seconds=2))
    store = KeelStore.from_url(redis_url)
    try:
        async with make_worker(client, llm_config=PINNED, max_cached_workflows=SESSION_CACHE) as w:
            sessions = AgentSessions(client, task_queue=w.task_queue, tenant=tenant)
            accepted = await sessions.send(req, unique("s"), "What is 2 + 9?")
            await sessions.turn_result(accepted, timeout=60)
            ref = await store.put_blob(tenant, f"{accepted.job_id}:0:s1", "stored output")
            other = await store.put_blob(tenant, f"agent-job-{tenant}:elsewhere:0:s1", "kept")
            handle = client.get_workflow_handle_for(Session.run, accepted.session_id)
            final = await asyncio.wait_for(handle.result(), timeout=30)
        assert final.phase == "ended" and final.usage.turns == 1
        raw = aioredis.Redis.from_url(redis_url)
        assert await raw.exists(ref) == 0  # the session's turn's output is gone
        assert await raw.exists(other) == 1  # another job's is not
        await raw.aclose()
    finally:
        await store.aclose()


async def test_an_ended_session_refuses_messages_and_is_never_reopened(
    client: Client, make_worker
) -> None:
    tenant = unique("ended")
    req = SessionRequest(tenant=tenant)
    async with make_worker(client, llm_config=PINNED, max_cached_workflows=SESSION_CACHE) as w:
        sessions = AgentSessions(client, task_queue=w.task_queue, tenant=tenant)
        key = unique("s")
        first = await sessions.send(req, key, "What is 3 + 4?")
        await sessions.turn_result(first, timeout=60)
        ended = await sessions.end(first.session_id)
        # The turn's job has finished, but the session may not have taken its result yet.
        assert ended.phase in ("ending", "ended")
        from keel.workflows.contract import Session

        final = await client.get_workflow_handle_for(Session.run, first.session_id).result()
        assert final.phase == "ended" and final.usage.turns == 1
        with pytest.raises(SessionRefused) as refused:
            await sessions.send(req, key, "What is 5 + 6?")
    assert refused.value.code == "ended"


async def test_status_reads_the_snapshot_the_session_writes_as_it_changes(
    client: Client, make_worker, redis_url: str
) -> None:
    from keel.activities.snapshots import SessionSnapshots, snapshot_key
    from keel.workflows.contract import Session

    tenant = unique("snap")
    req = SessionRequest(tenant=tenant, tools=["calculator"])
    raw = aioredis.Redis.from_url(redis_url)
    snapshots = SessionSnapshots(raw)
    try:
        async with make_worker(client, llm_config=PINNED, max_cached_workflows=SESSION_CACHE) as w:
            queried = AgentSessions(client, task_queue=w.task_queue, tenant=tenant)
            fast = AgentSessions(
                client, task_queue=w.task_queue, tenant=tenant, snapshots=snapshots
            )
            key = unique("s")
            # Four turns: the fourth runs beside the fold of the first into the summary.
            for n in range(4):
                first = await fast.send(req, key, f"What is 6 + {n}?")
                await fast.turn_result(first, timeout=60)
            sid = first.session_id
            # The session writes after it has taken the turn's result; wait for that write.
            for _ in range(100):
                status = await fast.status(sid)
                if status.usage.turns == 4 and status.phase == "idle":
                    break
                await asyncio.sleep(0.05)
            assert status.summary and len(status.recent) == 3
            assert status == await queried.status(sid)  # the snapshot is the query's answer
            assert all(t.outcome == "completed" for t in status.turns)

            # Written by the workflow, not by the reader: a snapshot planted in Redis is what
            # the snapshot reader returns (and a missing one falls back to the query).
            planted = status.model_copy(update={"summary": "planted"})
            key = snapshot_key(tenant, sid)
            await raw.set(key, planted.model_dump_json())
            assert (await fast.status(sid)).summary == "planted"
            await raw.delete(key)
            assert (await fast.status(sid)) == await queried.status(sid)
            assert await raw.exists(key) == 0  # reading never writes

            # Another tenant's client finds nothing, snapshot or not.
            intruder = AgentSessions(client, tenant=unique("other"), snapshots=snapshots)
            with pytest.raises(SessionNotFound):
                await intruder.status(sid)

            await fast.end(sid)
            await client.get_workflow_handle_for(Session.run, sid).result()
            await replay_own_history(client, sid, record_as="session_folded_snapshots")
        final = await fast.status(sid)  # the ended session's last snapshot, worker gone
        assert final.phase == "ended" and final.usage.turns == 4
        assert 0 < await raw.ttl(key) <= 7 * 86_400 + 3_600
    finally:
        await raw.aclose()


def test_a_snapshot_key_belongs_to_the_tenant_it_names() -> None:
    from keel.activities.snapshots import snapshot_key

    assert (
        snapshot_key("acme", "agent-session-acme:chat")
        == "keel:session:acme:agent-session-acme:chat"
    )
    for tenant, session in [
        ("acme", "agent-session-evil:chat"),
        ("ac:me", "agent-session-ac:me:chat"),
        ("", "agent-session-:chat"),
        ("acme", "agent-job-acme:chat"),
    ]:
        with pytest.raises(ValueError):
            snapshot_key(tenant, session)


def test_a_session_request_is_checked_as_its_turns_will_be(tmp_path) -> None:
    from keel.client.errors import InvalidJobRequest

    sessions = AgentSessions.__new__(AgentSessions)
    sessions.tenant = "acme"
    with pytest.raises(InvalidJobRequest) as bad_tool:
        sessions.request({"tools": ["calculator", "rm_rf"]})
    assert bad_tool.value.field == "tools" and "rm_rf" in bad_tool.value.reason
    with pytest.raises(InvalidJobRequest) as bad_dir:
        sessions.request({"docs_dir": str(tmp_path / "missing")})
    assert bad_dir.value.field == "docs_dir"
    with pytest.raises(InvalidJobRequest) as bad_turn:
        sessions.request({"turn_budget": {"max_steps": 0}})
    assert bad_turn.value.field.startswith("turn_budget")
    ok = sessions.request({"docs_dir": str(tmp_path)})
    assert ok.tenant == "acme" and ok.docs_dir == str(tmp_path.resolve())
