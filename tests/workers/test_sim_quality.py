"""The LLM simulator's quality model, router and summary replies and per-job ground truth.

Driven over real HTTP through the openai client and httpx, as Keel and the benchmark reach it.
Every draw is a hash of the seed and the goal, so the measured rates below are exact counts that
any simulator with the same config reproduces; each also sits inside a binomial tolerance of the
configured probability, which is what the counts are for.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import openai
import pytest
from openai import AsyncOpenAI

from keel.activities.types import Verdict
from keel.workers.sim import SimConfig
from keel.workers.sim.replies import SUMMARY_MAX_CHARS
from tests.conftest import free_port, unique, wait_port
from tests.workers.test_simulator import running

FACT = re.compile(r"Result: (fact-[0-9a-f]{8})\.")
TIERS = {"fast": "sim-small", "deep": "sim-large"}
WEIGHTS = [0.5, 0.2, 0.3]


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    with running(SimConfig(difficulty_weights=WEIGHTS)) as url:
        yield url


@pytest.fixture
async def llm(base_url: str) -> AsyncIterator[AsyncOpenAI]:
    client = AsyncOpenAI(base_url=f"{base_url}/v1", api_key="sim", max_retries=0)
    yield client
    await client.close()


@pytest.fixture
async def http(base_url: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=base_url) as client:
        yield client


async def call(
    llm: AsyncOpenAI,
    name: str,
    payload: dict[str, Any],
    model: str = "sim-small",
    job: str | None = None,
    **kwargs: Any,
) -> Any:
    """One of Keel's structured calls; the reply's JSON document."""
    resp = await llm.chat.completions.create(
        model=model,
        messages=[
            {"role": "system", "content": "Keel"},
            {"role": "user", "content": json.dumps(payload)},
        ],
        response_format={"type": "json_schema", "json_schema": {"name": name, "schema": {}}},
        extra_headers={"X-Keel-Job-Id": job} if job else None,
        **kwargs,
    )
    return json.loads(resp.choices[0].message.content or "null")


def fact_of(answer: str) -> str:
    """The checkable result a simulated draft states."""
    match = FACT.search(answer)
    assert match is not None, answer
    return match[1]


async def draft(llm: AsyncOpenAI, goal: str, model: str, **payload: Any) -> str:
    doc = {"goal": goal, "iteration": 0, "observations": [], "clarifications": []} | payload
    answer: str = (await call(llm, "keel_answer", doc, model))["answer"]
    return answer


async def verdict(
    llm: AsyncOpenAI, goal: str, text: str, model: str, iteration: int = 0
) -> Verdict:
    doc = {"goal": goal, "iteration": iteration, "draft": text}
    return Verdict.model_validate(await call(llm, "keel_verdict", doc, model))


async def grade(http: httpx.AsyncClient, goal: str, answer: str) -> dict[str, Any]:
    resp = await http.post("/sim/grade", json={"goal": goal, "answer": answer})
    assert resp.status_code == 200, resp.text
    body: dict[str, Any] = resp.json()
    return body


async def gather(coros: list[Any], width: int = 16) -> list[Any]:
    """Run many requests, ``width`` at a time, keeping their order."""
    gate = asyncio.Semaphore(width)

    async def one(coro: Any) -> Any:
        async with gate:
            return await coro

    return list(await asyncio.gather(*(one(c) for c in coros)))


async def test_models_below_the_difficulty_draft_wrong_whatever_the_critique(
    llm: AsyncOpenAI, http: httpx.AsyncClient
) -> None:
    hard = f"Prove the lemma {unique()} [sim: difficulty=3]"
    drafts = {
        m: await draft(llm, hard, m) for m in ("sim-small", "sim-medium", "sim-large", "gpt-x")
    }
    facts = {m: fact_of(text) for m, text in drafts.items()}
    graded = {m: (await grade(http, hard, text))["correct"] for m, text in drafts.items()}
    # A model the capability map does not list has its highest level.
    assert graded == {"sim-small": False, "sim-medium": False, "sim-large": True, "gpt-x": True}
    assert facts["sim-small"] == facts["sim-medium"] != facts["sim-large"] == facts["gpt-x"]
    subject = hard.removesuffix(" [sim: difficulty=3]")
    assert drafts["sim-large"].startswith(f"Answer to: {subject}. Result: fact-")
    digest = hashlib.sha256(subject.casefold().encode()).hexdigest()[:8]
    assert facts["sim-large"] == f"fact-{digest}"  # seed-independent: any simulator agrees
    assert (await grade(http, hard, "no result at all")) == {"correct": False, "difficulty": 3}

    refined = await draft(llm, hard, "sim-small", iteration=1, critique="The result is wrong.")
    assert "Revised after critique: The result is wrong." in refined
    assert fact_of(refined) == facts["sim-small"]
    assert not (await grade(http, hard, refined))["correct"]

    easy = f"Say hello {unique()} [sim: difficulty=1]"
    for model in ("sim-small", "sim-medium", "sim-large"):
        assert (await grade(http, easy, await draft(llm, easy, model)))["correct"]


async def test_near_repeats_share_difficulty_and_truth(
    llm: AsyncOpenAI, http: httpx.AsyncClient
) -> None:
    goal = f"Compare the Two  Offers {unique()}"
    repeat = "  " + goal.upper().replace(" ", " \t ") + "\n"
    answer = await draft(llm, goal, "sim-large")
    assert await grade(http, goal, answer) == await grade(http, repeat, answer)
    assert (await grade(http, repeat, answer))["correct"]
    assert fact_of(await draft(llm, repeat, "sim-large")) == fact_of(answer)
    # Full-width letters are the same goal after NFKC; other words are another goal.
    assert (await grade(http, goal.replace("Offers", "Ｏｆｆｅｒｓ"), answer))["correct"]
    assert not (await grade(http, goal + " today", answer))["correct"]


async def test_difficulty_draws_follow_the_weights(http: httpx.AsyncClient) -> None:
    levels = [(await grade(http, f"weighted goal {i}", ""))["difficulty"] for i in range(1000)]
    counts = [levels.count(level) for level in (1, 2, 3)]
    assert sum(counts) == 1000
    for count, weight in zip(counts, WEIGHTS, strict=True):
        assert abs(count - 1000 * weight) < 4 * math.sqrt(1000 * weight * (1 - weight))
    assert counts == [487, 212, 301]  # exact: the draws are hashes of the seed and the goal


@pytest.mark.parametrize(
    ("verifier", "catch", "caught"),
    [("sim-small", 0.6, 234), ("sim-medium", 0.85, 329), ("sim-large", 0.97, 387)],
)
async def test_verifiers_catch_wrong_drafts_at_their_configured_rate(
    llm: AsyncOpenAI, verifier: str, catch: float, caught: int
) -> None:
    goals = [f"Hard question number {i} [sim: difficulty=3]" for i in range(400)]
    drafts = await gather([draft(llm, g, "sim-small") for g in goals])
    verdicts = await gather(
        [verdict(llm, g, d, verifier) for g, d in zip(goals, drafts, strict=True)]
    )
    failed = [v for v in verdicts if not v.passed]
    assert abs(len(failed) - 400 * catch) < 4 * math.sqrt(400 * catch * (1 - catch))
    assert len(failed) == caught
    assert all(v.score <= 0.4 and "wrong" in v.critique for v in failed)
    assert all(v.score == 0.8 for v in verdicts if v.passed)
    # The same draft judged again gets the same verdict.
    again = await verdict(llm, goals[0], drafts[0], verifier)
    assert again == verdicts[0]


async def test_right_drafts_pass_and_fail_verify_still_forces_a_refine(llm: AsyncOpenAI) -> None:
    goal = f"Easy one {unique()} [sim: difficulty=1, fail_verify=1]"
    right = await draft(llm, goal, "sim-small")
    first, second = [await verdict(llm, goal, right, "sim-small", i) for i in (0, 1)]
    assert (first.passed, first.score) == (False, 0.3) and "refine" in first.critique
    assert (second.passed, second.score) == (True, 0.9)
    with running(SimConfig(fail_first_verify=True)) as url:
        other = AsyncOpenAI(base_url=f"{url}/v1", api_key="sim", max_retries=0)
        plain = f"Easy two {unique()}"
        text = await draft(other, plain, "sim-small")
        verdicts = [await verdict(other, plain, text, "sim-small", i) for i in (0, 1)]
        await other.close()
    assert [v.passed for v in verdicts] == [False, True]


def route_doc(goal: str, tiers: dict[str, str] = TIERS) -> dict[str, Any]:
    return {"goal": goal, "tools": ["calculator"], "retrieval_enabled": False, "tiers": tiers}


async def test_the_router_is_right_at_its_configured_rate(
    llm: AsyncOpenAI, http: httpx.AsyncClient
) -> None:
    goals = [f"Route me {i}" for i in range(500)]
    routes = await gather([call(llm, "keel_route", route_doc(g)) for g in goals])
    levels = [doc["difficulty"] for doc in await gather([grade(http, g, "") for g in goals])]
    right = 0
    for level, route in zip(levels, routes, strict=True):
        assert set(route) == {"tier", "complexity", "needs_tools", "risk", "reason"}
        assert route["tier"] in TIERS and route["needs_tools"] is True and route["reason"]
        right += route["tier"] == ("fast" if level == 1 else "deep")
        if route["tier"] == ("fast" if level == 1 else "deep"):
            assert route["complexity"] == ["low", "medium", "high"][level - 1]
        assert route["risk"] == ("high" if route["complexity"] == "high" else "low")
    assert abs(right - 400) < 4 * math.sqrt(500 * 0.8 * 0.2)
    assert right == 409


async def test_the_router_names_a_listed_tier_and_is_counted(
    llm: AsyncOpenAI, http: httpx.AsyncClient
) -> None:
    three = {"fast": "sim-small", "balanced": "sim-medium", "deep": "sim-large"}
    before = (await http.get("/_sim/stats")).json()["requests"]["route"]
    routes = await gather(
        [call(llm, "keel_route", route_doc(f"Pick {i}", three)) for i in range(200)]
    )
    assert {r["tier"] for r in routes} == set(three)
    assert (await http.get("/_sim/stats")).json()["requests"]["route"] == before + 200
    with running(SimConfig(router_accuracy=0.0)) as url:
        wrong = AsyncOpenAI(base_url=f"{url}/v1", api_key="sim", max_retries=0)
        doc = route_doc("An easy goal [sim: difficulty=1]")
        always_wrong = await call(wrong, "keel_route", doc)
        hard = await call(wrong, "keel_route", route_doc("A hard one [sim: difficulty=3]"))
        with pytest.raises(openai.BadRequestError):
            await call(wrong, "keel_route", {"goal": "no tiers"})
        await wrong.close()
    assert (always_wrong["tier"], always_wrong["complexity"]) == ("deep", "medium")
    assert (hard["tier"], hard["complexity"], hard["risk"]) == ("fast", "low", "low")


async def test_summaries_stay_bounded_and_keep_the_newest_observations(
    llm: AsyncOpenAI, http: httpx.AsyncClient
) -> None:
    before = (await http.get("/_sim/stats")).json()["requests"]["summary"]
    summary = ""
    for step in range(40):
        observations = [
            {"name": f"tool{step}_{i}", "content": f"result {step}.{i}; " + "x" * 5000}
            for i in range(8)
        ]
        doc = {"goal": "Long job " + "y" * 9000, "summary": summary, "observations": observations}
        reply = await call(llm, "keel_summary", doc)
        assert set(reply) == {"summary"} and reply == await call(llm, "keel_summary", doc)
        summary = reply["summary"]
        assert len(summary) <= SUMMARY_MAX_CHARS
        assert f"tool{step}_7: result {step}.7, xxx" in summary
    assert "tool38_" in summary  # the previous summary's newest clauses survive a step
    assert (await http.get("/_sim/stats")).json()["requests"]["summary"] == before + 80
    empty = await call(llm, "keel_summary", {"goal": "g", "summary": "", "observations": []})
    assert empty == {"summary": "No observations yet."}
    kept = await call(
        llm, "keel_summary", {"goal": "g", "summary": "a: 1; b: 2", "observations": []}
    )
    assert kept == {"summary": "a: 1; b: 2"}


async def stream_answer(llm: AsyncOpenAI, doc: dict[str, Any], model: str, job: str) -> str:
    stream = await llm.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": json.dumps(doc)}],
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "keel_answer", "schema": {}},
        },
        extra_headers={"X-Keel-Job-Id": job},
        stream=True,
    )
    return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])


async def test_truth_per_job_follows_the_last_draft_not_the_verifier(
    llm: AsyncOpenAI, http: httpx.AsyncClient
) -> None:
    job = f"agent-job-acme:{unique()}/x"
    goal = f"Hard job {unique()} [sim: difficulty=2, fault=cutx1]"
    doc = {"goal": goal, "iteration": 0, "observations": [], "clarifications": []}
    await call(llm, "keel_plan", doc | {"tools": []}, job=job)
    truth = (await http.get(f"/sim/truth/{job}")).json()
    assert truth == {
        "job_id": job,
        "goal": goal,
        "difficulty": 2,
        "correct": False,
        "drafts": 0,
        "verifier_passed": None,
    }
    wrong = (await call(llm, "keel_answer", doc, "sim-small", job))["answer"]
    seen = await call(llm, "keel_verdict", doc | {"draft": wrong}, "sim-small", job)
    truth = (await http.get(f"/sim/truth/{job}")).json()
    assert (truth["correct"], truth["drafts"]) == (False, 1)
    assert truth["verifier_passed"] is seen["passed"]

    # A cut stream or a truncated reply serves no draft, so it changes nothing.
    with pytest.raises(openai.APIConnectionError):
        await stream_answer(llm, doc, "sim-large", job)
    with pytest.raises(json.JSONDecodeError):
        await call(llm, "keel_answer", doc, "sim-large", job, max_tokens=5)
    assert (await http.get(f"/sim/truth/{job}")).json()["drafts"] == 1

    streamed = json.loads(await stream_answer(llm, doc, "sim-medium", job))["answer"]
    assert streamed == await draft(llm, goal, "sim-medium")  # same text as a plain reply
    truth = (await http.get(f"/sim/truth/{job}")).json()
    assert (truth["correct"], truth["drafts"]) == (True, 2)
    assert truth["verifier_passed"] is seen["passed"]  # truth never waits for a verdict
    assert (await grade(http, goal, streamed))["correct"]

    # A job whose only request failed was still seen; it has no draft.
    failed = f"agent-job-{unique()}"
    with pytest.raises(openai.InternalServerError):
        await call(
            llm, "keel_answer", {"goal": "Flaky [sim: fault=503x1, difficulty=1]"}, job=failed
        )
    truth = (await http.get(f"/sim/truth/{failed}")).json()
    assert (truth["drafts"], truth["correct"], truth["difficulty"]) == (0, False, 1)


async def test_unknown_jobs_are_404_and_reset_forgets_jobs(llm: AsyncOpenAI, base_url: str) -> None:
    job = f"agent-job-{unique()}"
    async with httpx.AsyncClient(base_url=base_url) as http:
        missing = await http.get(f"/sim/truth/{job}")
        assert missing.status_code == 404
        assert missing.json()["error"]["code"] == "job_not_found"
        assert missing.json()["error"]["type"] == "invalid_request_error"
        await call(llm, "keel_answer", {"goal": "Remember me"}, job=job)
        assert (await http.get(f"/sim/truth/{job}")).json()["drafts"] == 1
        assert (await http.post("/_sim/reset")).json() == {"ok": True}
        assert (await http.get(f"/sim/truth/{job}")).status_code == 404
        bad = await http.post("/sim/grade", json={"goal": "g"})
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "answer"
    with pytest.raises(openai.BadRequestError):
        await call(llm, "keel_answer", {"goal": "g"}, job="j" * 1001)


async def test_the_cli_takes_the_new_knobs_and_processes_with_one_seed_agree(
    llm: AsyncOpenAI, http: httpx.AsyncClient
) -> None:
    port = free_port()
    cmd = [sys.executable, "-m", "keel.workers.cli", "sim-llm", "--port", str(port)]
    knobs = ["--difficulty-weights", "0.5,0.2,0.3", "--router-accuracy", "0"]
    proc = subprocess.Popen([*cmd, *knobs], stdout=subprocess.DEVNULL)
    try:
        wait_port(port, proc, "LLM simulator")
        other = AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sim", max_retries=0)
        goals = [f"Shared goal {i}" for i in range(30)]
        for goal in goals:
            assert await draft(other, goal, "sim-small") == await draft(llm, goal, "sim-small")
            route = await call(other, "keel_route", route_doc(goal))
            level = (await grade(http, goal, ""))["difficulty"]
            assert route["tier"] == ("deep" if level == 1 else "fast")  # always wrong
        await other.close()
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_the_simulated_summariser_keeps_within_the_length_it_is_asked_for() -> None:
    from keel.workers.sim.replies import SUMMARY_MAX_CHARS, summary_reply

    observations = [{"name": f"turn {n}", "content": "x " * 200} for n in range(12)]
    previous = None
    for _ in range(5):
        previous = summary_reply(
            {"summary": previous, "observations": observations, "max_chars": 300}
        )["summary"]
        assert 0 < len(previous) <= 300
    unbounded = summary_reply({"observations": observations, "max_chars": 10**6})["summary"]
    assert 300 < len(unbounded) <= SUMMARY_MAX_CHARS
