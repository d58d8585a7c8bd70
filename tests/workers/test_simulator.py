"""The LLM simulator, driven over real HTTP through the openai client, as Keel reaches it."""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import openai
import pytest
import uvicorn
from openai import AsyncOpenAI

from keel.activities.types import Plan, Verdict
from keel.workers.sim import SimConfig, create_app

CALCULATOR = {
    "name": "calculator",
    "description": "Evaluate an arithmetic expression.",
    "parameters": {
        "type": "object",
        "properties": {"expression": {"type": "string", "examples": ["1 + 1"]}},
        "required": ["expression"],
    },
}
HTTP_GET = {
    "name": "http_get",
    "description": "Fetch a URL.",
    "parameters": {
        "type": "object",
        "properties": {
            "url": {"type": "string", "examples": ["https://example.com"]},
            "timeout": {"type": "number"},
        },
        "required": ["url"],
    },
}


@contextmanager
def running(config: SimConfig) -> Iterator[str]:
    """The simulator served by uvicorn on a free port in a background thread."""
    server = uvicorn.Server(
        uvicorn.Config(create_app(config), host="127.0.0.1", port=0, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "simulator did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    with running(SimConfig()) as url:
        yield url


@pytest.fixture
async def llm(base_url: str) -> AsyncIterator[AsyncOpenAI]:
    client = AsyncOpenAI(base_url=f"{base_url}/v1", api_key="sim", max_retries=0)
    yield client
    await client.close()


async def keel(llm: AsyncOpenAI, name: str, payload: dict[str, Any], **kwargs: Any) -> Any:
    return await llm.chat.completions.create(
        model="sim-small",
        messages=[
            {"role": "system", "content": "You are Keel's planner."},
            {"role": "user", "content": json.dumps(payload)},
        ],
        response_format={
            "type": "json_schema",
            "json_schema": {"name": name, "schema": {"type": "object"}, "strict": False},
        },
        **kwargs,
    )


def plan_input(goal: str, **overrides: Any) -> dict[str, Any]:
    payload = {
        "goal": goal,
        "iteration": 0,
        "tools": [CALCULATOR, HTTP_GET],
        "retrieval_enabled": False,
        "observations": [],
        "clarifications": [],
        "critique": None,
        "correction": None,
        "may_ask": True,
    }
    return payload | overrides


async def test_plan_uses_the_named_tool_and_the_goal_expression(llm: AsyncOpenAI) -> None:
    goal = "Use the calculator to work out 2 * (3 + 4), please."
    resp = await keel(llm, "keel_plan", plan_input(goal, retrieval_enabled=True))

    plan = Plan.model_validate_json(resp.choices[0].message.content)
    assert plan.decision == "act"
    assert [(s.kind, s.tool) for s in plan.steps] == [("tool", "calculator"), ("retrieve", None)]
    assert plan.steps[0].args == {"expression": "2 * (3 + 4)"}
    assert plan.steps[1].query == goal
    assert resp.model == "sim-small" and resp.choices[0].finish_reason == "stop"
    sent = json.dumps(plan_input(goal, retrieval_enabled=True))
    total_chars = len("You are Keel's planner.") + len(sent)
    assert resp.usage.prompt_tokens == math.ceil(total_chars / 4)


async def test_plan_offers_all_tools_then_answers_after_observations(llm: AsyncOpenAI) -> None:
    first = await keel(llm, "keel_plan", plan_input("Summarise today's news [sim: steps=1]"))
    plan = Plan.model_validate_json(first.choices[0].message.content)
    assert [s.tool for s in plan.steps] == ["calculator"]
    assert plan.steps[0].args == {"expression": "1 + 1"}

    obs = [{"step_id": "s1", "kind": "tool", "name": "calculator", "ok": True, "content": "2"}]
    second = await keel(llm, "keel_plan", plan_input("Summarise", observations=obs, iteration=1))
    assert Plan.model_validate_json(second.choices[0].message.content).decision == "answer"


async def test_ask_directive_asks_once(llm: AsyncOpenAI) -> None:
    goal = "Book the usual room [sim: ask]"
    asked = Plan.model_validate_json(
        (await keel(llm, "keel_plan", plan_input(goal))).choices[0].message.content
    )
    assert asked.decision == "ask" and asked.question and "[sim" not in asked.question
    assert asked.default_assumption == "Assume the most common interpretation."

    clarified = plan_input(goal, clarifications=[{"question": "q", "answer": "Room 4"}])
    resp = await keel(llm, "keel_plan", clarified)
    assert Plan.model_validate_json(resp.choices[0].message.content).decision == "act"
    resp = await keel(llm, "keel_plan", plan_input(goal, may_ask=False))
    assert Plan.model_validate_json(resp.choices[0].message.content).decision == "act"


async def test_answer_cites_observations_critique_and_clarifications(llm: AsyncOpenAI) -> None:
    payload = {
        "goal": "What is 6 * 7? [sim: tokens=100]",
        "iteration": 1,
        "observations": [{"step_id": "s1", "kind": "tool", "name": "calculator", "content": "42"}],
        "clarifications": [{"question": "Units?", "answer": "none", "assumed": False}],
        "critique": "Be precise.",
    }
    resp = await keel(llm, "keel_answer", payload)
    answer = json.loads(resp.choices[0].message.content)["answer"]
    assert answer == (
        "Answer to: What is 6 * 7?. Result: fact-f8a41dc1. [calculator] 42"
        " Revised after critique: Be precise."
        " Clarified: none"
    )
    assert resp.usage.completion_tokens == math.ceil(len(resp.choices[0].message.content) / 4) + 100


async def test_fail_verify_fails_until_the_given_iteration(llm: AsyncOpenAI) -> None:
    goal = "Explain X [sim: fail_verify=1]"
    right = json.loads((await keel(llm, "keel_answer", {"goal": goal})).choices[0].message.content)
    verdicts = []
    for iteration in (0, 1):
        payload = {"goal": goal, "iteration": iteration, "draft": right["answer"]}
        resp = await keel(llm, "keel_verdict", payload)
        verdicts.append(Verdict.model_validate_json(resp.choices[0].message.content))
    assert [(v.passed, v.score) for v in verdicts] == [(False, 0.3), (True, 0.9)]
    assert "refine" in verdicts[0].critique


async def test_fault_503x2_then_success(llm: AsyncOpenAI) -> None:
    payload = plan_input("calculator 1 + 2 [sim: fault=503x2]")
    for _ in range(2):
        with pytest.raises(openai.InternalServerError) as err:
            await keel(llm, "keel_plan", payload)
        assert err.value.status_code == 503
    resp = await keel(llm, "keel_plan", payload)
    assert Plan.model_validate_json(resp.choices[0].message.content).decision == "act"


async def test_429_carries_retry_after_and_auth_and_bad_request(llm: AsyncOpenAI) -> None:
    with pytest.raises(openai.RateLimitError) as limited:
        await keel(llm, "keel_plan", plan_input("g [sim: fault=429x1]"))
    assert limited.value.response.headers["retry-after"] == "1"
    assert limited.value.body["code"] == "rate_limit_exceeded"
    with pytest.raises(openai.AuthenticationError):
        await keel(llm, "keel_answer", {"goal": "g [sim: fault=401]"})
    # Like OpenAI's, a 401 names the key it was sent, masked; Keel must not pass that on.
    keyed = llm.with_options(api_key="sk-simulated-0123456789-wxyz")
    with pytest.raises(openai.AuthenticationError) as denied:
        await keel(keyed, "keel_answer", {"goal": "g [sim: fault=401]"})
    assert "sk-*********************wxyz" in denied.value.message
    with pytest.raises(openai.BadRequestError):
        await keel(llm, "keel_answer", {"goal": "g [sim: fault=400]"})


async def test_malformed_content_is_not_json(llm: AsyncOpenAI) -> None:
    resp = await keel(llm, "keel_plan", plan_input("g [sim: fault=malformed_plan]"))
    with pytest.raises(json.JSONDecodeError):
        json.loads(resp.choices[0].message.content)
    # malformed_plan spares the other calls of the same job.
    resp = await keel(llm, "keel_answer", {"goal": "g [sim: fault=malformed_plan]"})
    assert json.loads(resp.choices[0].message.content)["answer"].startswith("Answer to: g.")


async def test_max_tokens_truncates_with_finish_reason_length(llm: AsyncOpenAI) -> None:
    resp = await keel(llm, "keel_plan", plan_input("calculator 2 + 2"), max_completion_tokens=5)
    choice = resp.choices[0]
    assert choice.finish_reason == "length" and len(choice.message.content) == 20
    assert resp.usage.completion_tokens == 5
    with pytest.raises(json.JSONDecodeError):
        json.loads(choice.message.content)


async def test_plain_chat_calls_the_first_tool_unless_told_not_to(llm: AsyncOpenAI) -> None:
    tools = [{"type": "function", "function": CALCULATOR}]
    messages = [{"role": "user", "content": "What is 3 * 5?"}]
    resp = await llm.chat.completions.create(model="sim-large", messages=messages, tools=tools)
    call = resp.choices[0].message.tool_calls[0]
    assert resp.choices[0].finish_reason == "tool_calls"
    assert (call.function.name, json.loads(call.function.arguments)) == (
        "calculator",
        {"expression": "3 * 5"},
    )
    resp = await llm.chat.completions.create(
        model="sim-large", messages=messages, tools=tools, tool_choice="none"
    )
    assert resp.choices[0].message.content == "Simulated reply to: What is 3 * 5?"


async def test_embeddings_are_deterministic_and_normalised(llm: AsyncOpenAI) -> None:
    texts = ["the quick brown fox", "the quick brown fox", "lorem ipsum"]
    resp = await llm.embeddings.create(model="sim-embed", input=texts)  # base64 on the wire
    floats = await llm.embeddings.create(model="sim-embed", input=texts[0], encoding_format="float")
    vectors = [d.embedding for d in resp.data]
    assert all(len(v) == 64 for v in vectors)
    assert vectors[0] == vectors[1] != vectors[2]
    assert all(math.isclose(math.fsum(x * x for x in v), 1.0, rel_tol=1e-5) for v in vectors)
    pairs = zip(floats.data[0].embedding, vectors[0], strict=True)
    assert all(math.isclose(a, b, abs_tol=1e-6) for a, b in pairs)
    assert resp.usage.prompt_tokens == 5 + 5 + 3


async def test_models_health_and_stats(llm: AsyncOpenAI, base_url: str) -> None:
    assert [m.id for m in (await llm.models.list()).data] == [
        "sim-small",
        "sim-medium",
        "sim-large",
    ]
    async with httpx.AsyncClient(base_url=base_url) as http:
        assert (await http.get("/health")).json() == {"ok": True}
        assert (await http.post("/_sim/reset")).json() == {"ok": True}
        await keel(llm, "keel_verdict", {"goal": "g", "iteration": 0, "draft": "d"})
        with pytest.raises(openai.InternalServerError):
            await keel(llm, "keel_answer", {"goal": "stats [sim: fault=500x1]"})
        stats = (await http.get("/_sim/stats")).json()
        missing = await http.get("/v1/nope")
    assert stats["requests"] == {
        "plan": 0,
        "answer": 1,
        "verify": 1,
        "route": 0,
        "summary": 0,
        "chat": 0,
        "embeddings": 0,
    }
    assert stats["faults"]["500"] == 1 and sum(stats["faults"].values()) == 1
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "invalid_request_error"


async def test_config_faults_are_seeded_and_fail_first_verify() -> None:
    config = SimConfig(
        fault_rate=0.5, fault_kinds=["503", "timeout"], timeout_seconds=0.05, fail_first_verify=True
    )
    verify = {"goal": "g", "iteration": 0, "draft": "d"}
    with running(config) as url:
        llm = AsyncOpenAI(base_url=f"{url}/v1", api_key="sim", max_retries=0)
        runs = []
        for _ in range(2):
            outcomes = []
            for _ in range(12):
                try:
                    resp = await keel(llm, "keel_verdict", verify)
                    outcomes.append(json.loads(resp.choices[0].message.content)["passed"])
                except openai.InternalServerError as exc:
                    outcomes.append(exc.status_code)
            runs.append(outcomes)
            async with httpx.AsyncClient(base_url=url) as http:
                await http.post("/_sim/reset")
        await llm.close()
    assert runs[0] == runs[1]
    assert {503, 504, False} <= set(runs[0])
