"""LLM activities with the vendor client faked at its HTTP transport (httpx.MockTransport)."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

import httpx
import openai
import pytest
from pydantic import ValidationError
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from keel.activities import errors
from keel.activities.catalog import BUILTIN_TOOLS, tool_schema
from keel.activities.costing import count_chat_tokens, count_tokens
from keel.activities.llm import PLANNER_PROMPT, LLMActivities, LLMConfig
from keel.activities.store import KeelStore
from keel.activities.types import (
    LLM_REQUEST_TIMEOUT_SECONDS,
    AnswerInput,
    Observation,
    PlanInput,
    VerifyInput,
)
from keel.workers.registry import build_deps
from keel.workflows._budget import CHARS_PER_TOKEN, PROMPT_OVERHEAD_TOKENS

Handler = Callable[[httpx.Request], httpx.Response]


def completion(content: str, finish: str = "stop") -> dict[str, Any]:
    return {
        "id": "c1",
        "object": "chat.completion",
        "created": 0,
        "model": "m",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": finish,
            }
        ],
        "usage": {"prompt_tokens": 100, "completion_tokens": 50, "total_tokens": 150},
    }


def activities(
    handler: Handler, store: KeelStore | None = None, api_key: str = "k"
) -> tuple[LLMActivities, list[httpx.Request]]:
    seen: list[httpx.Request] = []

    def record(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return handler(request)

    client = openai.AsyncOpenAI(
        api_key=api_key,
        base_url="http://llm.test/v1",
        max_retries=0,
        http_client=httpx.AsyncClient(transport=httpx.MockTransport(record)),
    )
    config = LLMConfig(planner_model="gpt-4.1-mini")

    def specs(names: Sequence[str]) -> list[dict[str, Any]]:
        return [tool_schema(n) for n in names]

    return LLMActivities(client, config, specs, store), seen


async def plan_input(acts: LLMActivities) -> PlanInput:
    return PlanInput(
        tenant="t",
        goal="What is 2 + 2?",
        iteration=0,
        max_output_tokens=300,
        allowed_tools=["calculator"],
    )


async def test_plan_request_is_exact_and_usage_is_priced() -> None:
    plan = {"decision": "act", "steps": [{"id": "s1", "kind": "tool", "tool": "calculator"}]}
    acts, seen = activities(lambda _: httpx.Response(200, json=completion(json.dumps(plan))))
    result = await ActivityEnvironment().run(acts.plan_step, await plan_input(acts))

    assert result.plan is not None and result.plan.steps[0].tool == "calculator"
    body = json.loads(seen[0].content)
    assert body["model"] == "gpt-4.1-mini" and body["max_tokens"] == 300
    assert body["response_format"]["json_schema"]["name"] == "keel_plan"
    assert body["messages"][0] == {"role": "system", "content": PLANNER_PROMPT}
    context = json.loads(body["messages"][1]["content"])
    assert [t["name"] for t in context["tools"]] == ["calculator"]
    assert len(seen) == 1  # vendor retries are off
    assert result.usage.prompt_tokens == 100 and result.usage.completion_tokens == 50
    assert result.usage.cost_usd == pytest.approx((100 * 0.40 + 50 * 1.60) / 1e6)


async def test_invalid_output_is_returned_not_raised() -> None:
    acts, _ = activities(lambda _: httpx.Response(200, json=completion("Sure! {oops")))
    result = await ActivityEnvironment().run(acts.plan_step, await plan_input(acts))
    assert result.plan is None and result.invalid_reason
    acts, _ = activities(lambda _: httpx.Response(200, json=completion('{"decision": "act"}')))
    result = await ActivityEnvironment().run(acts.plan_step, await plan_input(acts))
    assert result.plan is None and "at least one step" in (result.invalid_reason or "")


async def test_truncated_output_says_so() -> None:
    acts, _ = activities(lambda _: httpx.Response(200, json=completion('{"passed": tr', "length")))
    inp = (await plan_input(acts)).model_dump() | {"draft": "d"}
    verify = VerifyInput.model_validate(
        {k: v for k, v in inp.items() if k in VerifyInput.model_fields}
    )
    result = await ActivityEnvironment().run(acts.verify_draft, verify)
    assert result.verdict is None and "truncated" in (result.invalid_reason or "")


@pytest.mark.parametrize(
    ("status", "headers", "error_type", "non_retryable", "delay"),
    [
        (429, {"retry-after": "7"}, errors.LLM_RATE_LIMITED, False, timedelta(seconds=7)),
        (500, {}, errors.LLM_TRANSIENT, False, None),
        (503, {}, errors.LLM_TRANSIENT, False, None),
        (400, {}, errors.LLM_REJECTED, True, None),
        (404, {}, errors.LLM_REJECTED, True, None),
        (401, {}, errors.LLM_AUTH, True, None),
        (403, {}, errors.LLM_AUTH, True, None),
    ],
)
async def test_http_errors_are_classified(
    status: int,
    headers: dict[str, str],
    error_type: str,
    non_retryable: bool,
    delay: timedelta | None,
) -> None:
    body = {"error": {"message": "nope", "type": "x", "code": None}}
    acts, seen = activities(lambda _: httpx.Response(status, json=body, headers=headers))
    with pytest.raises(ApplicationError) as raised:
        await ActivityEnvironment().run(acts.plan_step, await plan_input(acts))
    assert raised.value.type == error_type
    assert raised.value.non_retryable is non_retryable
    assert raised.value.next_retry_delay == delay
    assert len(seen) == 1


@pytest.mark.parametrize(
    "echo",
    [
        "Incorrect API key provided: {key}.",  # a proxy that echoes the whole key
        "Incorrect API key provided: sk-liv**********************wxyz.",  # OpenAI masks it
        "upstream said: Authorization: Bearer {key}",
    ],
)
async def test_an_echoed_key_never_reaches_the_failure(echo: str) -> None:
    key = "sk-live-0123456789abcdefwxyz"
    body = {"error": {"message": echo.format(key=key), "type": "invalid_request_error"}}
    acts, _ = activities(lambda _: httpx.Response(401, json=body), api_key=key)
    with pytest.raises(ApplicationError) as raised:
        await ActivityEnvironment().run(acts.plan_step, await plan_input(acts))
    message = str(raised.value)
    assert raised.value.type == errors.LLM_AUTH
    assert errors.REDACTED in message
    assert key not in message and "wxyz" not in message and "0123456789" not in message


def test_redact_leaves_ordinary_text_and_short_values_alone() -> None:
    text = "skip-the-task: risk-free desk; token budget 500"
    assert errors.redact(text, secrets=("k", "", "task")) == text
    assert errors.redact("key=my-very-own-secret!", ("my-very-own-secret",)) == "key=[redacted]!"


async def test_timeouts_and_connection_errors_are_retryable() -> None:
    def boom(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("slow", request=request)

    acts, _ = activities(boom)
    with pytest.raises(ApplicationError) as raised:
        await ActivityEnvironment().run(acts.plan_step, await plan_input(acts))
    assert raised.value.type == errors.LLM_TRANSIENT and not raised.value.non_retryable

    def refused(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    acts, _ = activities(refused)
    with pytest.raises(ApplicationError) as raised:
        await ActivityEnvironment().run(acts.plan_step, await plan_input(acts))
    assert raised.value.type == errors.LLM_TRANSIENT and not raised.value.non_retryable


def test_retry_after_http_date_and_cap() -> None:
    assert errors.parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0
    assert errors.parse_retry_after("9999") == 300.0
    assert errors.parse_retry_after(None) is None
    assert errors.parse_retry_after("soon") is None


def test_prompt_overhead_bound_covers_real_prompts() -> None:
    specs = json.dumps([tool_schema(n) for n in BUILTIN_TOOLS])
    assert (len(PLANNER_PROMPT) + len(specs)) // CHARS_PER_TOKEN < PROMPT_OVERHEAD_TOKENS


def test_real_client_is_built_with_vendor_retries_off(redis_url: str) -> None:
    deps = build_deps(
        redis_url=redis_url,
        openai_base_url="http://127.0.0.1:1/v1",
        openai_api_key="k",
        llm_config=LLMConfig(),
        http_allowed_hosts=[],
    )
    assert deps.llm.max_retries == 0


async def test_activity_chooses_its_model_and_caps_output_by_money_left() -> None:
    acts, seen = activities(lambda _: httpx.Response(200, json=completion('{"answer": "4"}')))
    # gpt-4.1-mini: $0.40 / $1.60 per million tokens. $0.0006 pays for the prompt and a couple
    # of hundred output tokens, fewer than the 300 the token budget would allow.
    inp = PlanInput(
        tenant="t", goal="What is 2 + 2?", iteration=0, max_output_tokens=300, max_cost_usd=0.0006
    )
    await ActivityEnvironment().run(acts.plan_step, inp)
    body = json.loads(seen[0].content)
    assert body["model"] == "gpt-4.1-mini"
    # The prompt is counted exactly, with the model's tokenizer, the response schema included.
    prompt = count_chat_tokens("gpt-4.1-mini", body["messages"]) + count_tokens(
        "gpt-4.1-mini", json.dumps(body["response_format"])
    )
    prompt_usd = prompt * 0.40 / 1_000_000
    assert body["max_tokens"] == int((0.0006 - prompt_usd) * 1_000_000 / 1.60) - 1
    assert body["max_tokens"] < 300


async def test_activity_refuses_a_call_the_money_left_cannot_pay_for() -> None:
    acts, seen = activities(lambda _: httpx.Response(200, json=completion('{"answer": "4"}')))
    inp = PlanInput(
        tenant="t", goal="What is 2 + 2?", iteration=0, max_output_tokens=300, max_cost_usd=1e-5
    )
    with pytest.raises(ApplicationError) as caught:
        await ActivityEnvironment().run(acts.plan_step, inp)
    assert caught.value.type == errors.BUDGET_EXHAUSTED
    assert caught.value.non_retryable
    assert "max_cost_usd" in str(caught.value)
    assert seen == []  # refused before any request was sent


async def test_a_body_that_is_not_a_completion_is_a_retryable_failure() -> None:
    acts, _ = activities(lambda _: httpx.Response(200, text="<html>gateway hiccup</html>"))
    with pytest.raises(ApplicationError) as caught:
        await ActivityEnvironment().run(acts.plan_step, await plan_input(acts))
    assert caught.value.type == errors.LLM_TRANSIENT
    assert not caught.value.non_retryable


async def test_stored_observations_reach_the_prompt_from_redis(redis_url: str) -> None:
    """Outputs stored by reference travel without their preview and are read back in one go."""
    store = KeelStore.from_url(redis_url)
    reply = completion('{"answer": "ok"}')
    acts, seen = activities(lambda _: httpx.Response(200, json=reply), store)
    try:
        kept = await store.put_blob("t", "test:0:s1", "A" * 5000)
        gone = "keel:blob:t:test:0:never-written"
        observations = [
            Observation(step_id="s1", name="http_get", ref=kept, size=5000),
            Observation(step_id="s2", name="http_get", ref=gone, size=900),
            Observation(step_id="s3", name="calculator", content="4"),
        ]
        inp = AnswerInput(
            tenant="t", goal="g", iteration=0, max_output_tokens=100, observations=observations
        )
        await ActivityEnvironment().run(acts.draft_answer, inp)
    finally:
        await store.aclose()
    context = json.loads(json.loads(seen[0].content)["messages"][1]["content"])
    contents = [o["content"] for o in context["observations"]]
    assert contents[0] == "A" * 4000  # PROMPT_CHARS_PER_OBSERVATION of the stored output
    assert contents[1] == "(output of 900 characters no longer stored)"
    assert contents[2] == "4"


async def test_without_a_workflow_cap_the_worker_cap_applies() -> None:
    acts, seen = activities(lambda _: httpx.Response(200, json=completion('{"answer": "4"}')))
    inp = PlanInput(tenant="t", goal="What is 2 + 2?", iteration=0)
    assert inp.max_output_tokens is None
    await ActivityEnvironment().run(acts.plan_step, inp)
    assert json.loads(seen[0].content)["max_tokens"] == LLMConfig().max_output_tokens


def test_request_timeout_cannot_outgrow_the_attempt_timeout() -> None:
    assert LLMConfig().request_timeout_seconds == LLM_REQUEST_TIMEOUT_SECONDS
    with pytest.raises(ValidationError):
        LLMConfig(request_timeout_seconds=LLM_REQUEST_TIMEOUT_SECONDS + 1)
