"""``draft_answer`` streaming its answer to the token side channel.

Real Redis and the simulator over HTTP through the client a worker builds; a job on a real
worker shows that the tokens stay out of history. The vendor's transport is faked only for
what the simulator never sends (no usage, an error event mid-stream).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import openai
import pytest
import redis.asyncio as aioredis
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment, WorkflowEnvironment
from temporalio.worker import Worker

from keel.activities import errors
from keel.activities.answer_tokens import AnswerTokens, TokenDelta, mark_watched, read_tokens
from keel.activities.costing import count_chat_tokens, count_tokens, worst_case_usd
from keel.activities.llm import LLMActivities, LLMConfig
from keel.activities.types import AnswerInput, AnswerResult, Observation
from keel.client import AgentJobs, JobRequest
from keel.workers.plugin import KeelPlugin
from keel.workers.registry import Deps, build_deps
from keel.workflows.types import job_id_for
from tests.conftest import free_port, unique
from tests.workers.test_logs import history_text


@pytest.fixture
async def deps(redis_url: str, sim_url: str) -> AsyncIterator[Deps]:
    built = build_deps(
        redis_url=redis_url,
        openai_base_url=sim_url,
        openai_api_key="sim-local-key",
        llm_config=LLMConfig(answerer_model="sim-small"),
        http_allowed_hosts=["127.0.0.1"],
    )
    yield built
    await built.aclose()


def llm(deps: Deps, tokens: AnswerTokens | None) -> LLMActivities:
    return LLMActivities(deps.llm, deps.llm_config, deps.tools.specs, deps.store, None, tokens)


def answer_input(goal: str, iteration: int = 2) -> AnswerInput:
    observations = [Observation(step_id="s1", name="calculator", content="42 and change")]
    return AnswerInput(
        tenant="t", goal=goal, iteration=iteration, max_output_tokens=400, observations=observations
    )


async def draft(acts: LLMActivities, inp: AnswerInput, job: str, attempt: int = 1) -> AnswerResult:
    env = ActivityEnvironment()
    env.info = dataclasses.replace(env.info, workflow_id=job, attempt=attempt)
    return await env.run(acts.draft_answer, inp)


async def deltas(redis: aioredis.Redis, job: str) -> list[TokenDelta]:
    return [d for _, d in await read_tokens(redis, job)]


async def test_a_streamed_draft_publishes_its_answer_and_returns_the_same_result(
    deps: Deps,
) -> None:
    assert deps.answer_tokens is not None  # build_deps streams by default
    tokens = AnswerTokens(deps.answer_tokens.redis, flush_every_seconds=0.02)
    job, inp = unique("job"), answer_input(f"Explain 6 * 7 at length {unique()} [sim: token_ms=3]")

    streamed = await draft(llm(deps, tokens), inp, job)
    plain = await draft(llm(deps, None), inp, unique("job"))

    assert streamed == plain  # the same answer and the same usage, streamed or not
    assert "[calculator] 42 and change" in streamed.answer
    published = await deltas(tokens.redis, job)
    assert "".join(d.text for d in published) == streamed.answer
    assert len(published) >= 3 and [d.end for d in published][-2:] == [False, True]
    assert {(d.iteration, d.attempt) for d in published} == {(2, 1)}


async def test_a_cut_stream_is_retryable_and_the_retry_restarts_the_draft(deps: Deps) -> None:
    assert deps.answer_tokens is not None
    tokens = AnswerTokens(deps.answer_tokens.redis, flush_every_seconds=0.005)
    acts = llm(deps, tokens)
    job, inp = (
        unique("job"),
        answer_input(f"Explain cuts {unique()} [sim: fault=cutx1, token_ms=5]"),
    )

    with pytest.raises(ApplicationError) as caught:
        await draft(acts, inp, job, attempt=1)
    assert caught.value.type == errors.LLM_TRANSIENT and not caught.value.non_retryable
    first = await deltas(tokens.redis, job)
    assert first and not any(d.end for d in first) and {d.attempt for d in first} == {1}

    result = await draft(acts, inp, job, attempt=2)
    retried = [d for d in await deltas(tokens.redis, job) if d.attempt == 2]
    assert "".join(d.text for d in retried) == result.answer and retried[-1].end
    assert "".join(d.text for d in first) in result.answer  # the cut draft was a prefix


async def test_redis_down_does_not_fail_the_draft(deps: Deps) -> None:
    dead = aioredis.Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_timeout=1)
    try:
        inp = answer_input(f"Explain outages {unique()}")
        streamed = await draft(llm(deps, AnswerTokens(dead)), inp, unique("job"))
    finally:
        await dead.aclose()
    assert streamed == await draft(llm(deps, None), inp, unique("job"))


def sse(*events: dict[str, Any] | str) -> str:
    return "".join(f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n" for e in events)


def chunk(content: str | None = None, finish: str | None = None) -> dict[str, Any]:
    delta = {} if content is None else {"content": content}
    return {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


def faked(body: str, seen: list[dict[str, Any]]) -> Callable[[httpx.Request], httpx.Response]:
    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content))
        return httpx.Response(200, text=body, headers={"content-type": "text/event-stream"})

    return handle


def faked_acts(body: str, tokens: AnswerTokens) -> tuple[LLMActivities, list[dict[str, Any]]]:
    seen: list[dict[str, Any]] = []
    client = openai.AsyncOpenAI(
        api_key="k",
        base_url="http://llm.test/v1",
        max_retries=0,
        http_client=httpx.AsyncClient(transport=httpx.MockTransport(faked(body, seen))),
    )
    return LLMActivities(client, LLMConfig(), lambda _: [], None, None, tokens), seen


async def test_an_endpoint_without_usage_is_charged_its_reservation(
    redis_url: str,
) -> None:
    redis = aioredis.Redis.from_url(redis_url)
    pieces = ['{"ans', 'wer": "Fo', "rty-t\\u00", 'e9wo \\"q', 'uoted\\""}']
    body = sse(*(chunk(p) for p in pieces), chunk(finish="stop"), "[DONE]")
    acts, seen = faked_acts(body, AnswerTokens(redis))
    job = unique("job")
    try:
        result = await draft(acts, answer_input("g"), job)
        published = await deltas(redis, job)
    finally:
        await redis.aclose()

    assert seen[0]["stream"] is True and seen[0]["stream_options"] == {"include_usage": True}
    assert result.answer == 'Forty-t\u00e9wo "quoted"'
    assert "".join(d.text for d in published) == result.answer and published[-1].end
    # Charged the whole reservation: the prompt's exact count (schema included) and every
    # completion token the request allowed, never a guess below what the endpoint could bill.
    sent = seen[0]
    model = sent["model"]
    prompt = count_chat_tokens(model, sent["messages"]) + count_tokens(
        model, json.dumps(sent["response_format"])
    )
    assert result.usage.prompt_tokens == prompt
    assert result.usage.completion_tokens == sent["max_tokens"]
    assert result.usage.cost_usd == worst_case_usd(
        LLMConfig().price(model), prompt, sent["max_tokens"]
    )


@pytest.mark.parametrize(
    "body",
    [
        sse(chunk('{"answer": "x'), {"error": {"message": "overloaded", "type": "server_error"}}),
        sse(chunk('{"answer": "x')),  # ended cleanly, but before any finish reason
        sse(chunk('{"answer": "x'), {"choices": "not a list"}),
    ],
    ids=["error-event", "no-finish", "malformed-chunk"],
)
async def test_a_broken_stream_is_a_retryable_transient_failure(redis_url: str, body: str) -> None:
    redis = aioredis.Redis.from_url(redis_url)
    acts, _ = faked_acts(body, AnswerTokens(redis))
    job = unique("job")
    try:
        with pytest.raises(ApplicationError) as caught:
            await draft(acts, answer_input("g"), job)
        published = await deltas(redis, job)
    finally:
        await redis.aclose()
    assert caught.value.type == errors.LLM_TRANSIENT and not caught.value.non_retryable
    assert not any(d.end for d in published)


async def run_job(
    client: Client, worker: Worker, goal: str, watch: aioredis.Redis | None = None
) -> tuple[str, str]:
    jobs = AgentJobs(client, task_queue=worker.task_queue)
    key = unique("job")
    if watch is not None:  # a reader is there: the worker streams only then
        await mark_watched(watch, job_id_for("default", key))
    job_id = await jobs.start(JobRequest(goal=goal), request_key=key)
    result = await jobs.result(job_id, timeout=120)
    assert result.outcome == "completed" and result.answer
    return job_id, result.answer


async def test_a_jobs_tokens_stream_beside_history_and_never_enter_it(
    env: WorkflowEnvironment, client: Client, make_worker: Any, redis_url: str, sim_url: str
) -> None:
    goal = "What is 6 * 7? Explain with the calculator [sim: fail_verify=1, token_ms=2]"
    watcher = aioredis.Redis.from_url(redis_url)
    async with make_worker(client) as worker:
        streamed_id, answer = await run_job(client, worker, goal, watch=watcher)
        unwatched_id, _ = await run_job(client, worker, goal)
    await watcher.aclose()
    # The same job on a worker built without a token channel: the history to compare with.
    model = "sim-small"
    deps = build_deps(
        redis_url=redis_url,
        openai_base_url=sim_url,
        openai_api_key="sim-local-key",
        llm_config=LLMConfig(planner_model=model, verifier_model=model, answerer_model=model),
        http_allowed_hosts=["127.0.0.1:*"],
    )
    deps.answer_tokens = None
    plugin = KeelPlugin(deps, tracing=False, close_deps=True)
    async with Worker(
        client, task_queue=unique("tq"), plugins=[plugin], max_cached_workflows=0
    ) as plain_worker:
        plain_id, plain_answer = await run_job(client, plain_worker, goal)
    assert plain_answer == answer

    redis = aioredis.Redis.from_url(redis_url)
    try:
        published = await deltas(redis, streamed_id)
        unread = await deltas(redis, unwatched_id)
    finally:
        await redis.aclose()
    assert unread == []  # nobody read that job: its drafts did not stream
    assert {d.iteration for d in published} == {0, 1}  # one draft per iteration, refined once
    final = [d for d in published if d.iteration == 1]
    assert "".join(d.text for d in final) == answer and final[-1].end

    histories = []
    for job_id in (streamed_id, plain_id):
        events = (await client.get_workflow_handle(job_id).fetch_history()).events
        text = await history_text(env, job_id)
        # Workflow-task events are left out: a task a worker failed and retried says nothing
        # about what the job recorded.
        kinds = [EventType.Name(e.event_type) for e in events]
        recorded = [k for k in kinds if not k.startswith("EVENT_TYPE_WORKFLOW_TASK_")]
        histories.append((recorded, text.count(answer)))
    # Same events, and the answer in as many places: streaming added nothing to history.
    assert histories[0] == histories[1]
    assert histories[0][1] >= 1
