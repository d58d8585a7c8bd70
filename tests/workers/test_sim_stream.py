"""The LLM simulator's streamed chat completions, over real HTTP through the openai client."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import pytest
from hypothesis import given
from hypothesis import strategies as st
from openai import AsyncOpenAI

from keel.workers.sim import SimConfig
from keel.workers.sim.streaming import pieces
from tests.conftest import unique
from tests.workers.test_simulator import CALCULATOR, running

USAGE = {"include_usage": True}


@pytest.fixture
async def llm(sim_url: str) -> AsyncIterator[AsyncOpenAI]:
    client = AsyncOpenAI(base_url=sim_url, api_key="sim", max_retries=0)
    yield client
    await client.close()


def answer_request(goal: str) -> dict[str, Any]:
    payload = {"goal": goal, "iteration": 0, "observations": [], "clarifications": []}
    return {
        "model": "sim-small",
        "messages": [
            {"role": "system", "content": "You write the answer."},
            {"role": "user", "content": json.dumps(payload)},
        ],
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "keel_answer", "schema": {"type": "object"}},
        },
    }


async def collect(llm: AsyncOpenAI, request: dict[str, Any], **kwargs: Any) -> list[Any]:
    stream = await llm.chat.completions.create(**request, stream=True, **kwargs)
    return [chunk async for chunk in stream]


@pytest.mark.parametrize("kind", ["answer", "plan", "chat"])
async def test_chunks_reassemble_to_the_non_streaming_reply(llm: AsyncOpenAI, kind: str) -> None:
    request = answer_request(f"Explain streaming in a few words {unique()}")
    if kind == "plan":
        request["response_format"]["json_schema"]["name"] = "keel_plan"
    elif kind == "chat":
        request = {"model": "sim-large", "messages": [{"role": "user", "content": "Say hi."}]}
    whole = await llm.chat.completions.create(**request)
    chunks = await collect(llm, request, stream_options=USAGE)

    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert len(chunks) > 5  # split into pieces, not sent whole
    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(len((c.choices[0].delta.content or "").strip()) <= 8 for c in chunks if c.choices)
    assert chunks[-2].choices[0].finish_reason == whole.choices[0].finish_reason == "stop"
    # With include_usage, the last chunk has no choices and the whole reply's usage.
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert all(c.usage is None for c in chunks[:-1])


async def test_usage_only_when_asked_and_truncation_streams_too(llm: AsyncOpenAI) -> None:
    request = answer_request("Explain streaming in some more words")
    chunks = await collect(llm, request)
    assert all(c.usage is None for c in chunks) and chunks[-1].choices[0].finish_reason == "stop"

    cut = await collect(llm, request, max_tokens=3, stream_options=USAGE)
    text = "".join(c.choices[0].delta.content or "" for c in cut if c.choices)
    assert len(text) == 12 and cut[-2].choices[0].finish_reason == "length"
    assert cut[-1].usage is not None and cut[-1].usage.completion_tokens == 3


async def test_tool_call_arguments_stream_in_pieces(llm: AsyncOpenAI) -> None:
    request = {
        "model": "sim-large",
        "messages": [{"role": "user", "content": "What is 12 * (3 + 4)?"}],
        "tools": [{"type": "function", "function": CALCULATOR}],
    }
    whole = (await llm.chat.completions.create(**request)).choices[0].message.tool_calls
    chunks = await collect(llm, request)
    calls = [call for c in chunks if c.choices for call in c.choices[0].delta.tool_calls or []]
    assert whole is not None and calls[0].id == whole[0].id
    assert calls[0].function is not None and calls[0].function.name == "calculator"
    arguments = "".join((call.function.arguments or "") for call in calls if call.function)
    assert arguments == whole[0].function.arguments and len(calls) > 2
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


async def test_faults_are_answered_before_the_stream_starts(llm: AsyncOpenAI) -> None:
    request = answer_request(f"g {unique()} [sim: fault=429x1]")
    with pytest.raises(openai.RateLimitError) as limited:
        await llm.chat.completions.create(**request, stream=True)
    assert limited.value.response.headers["retry-after"] == "1"
    with pytest.raises(openai.InternalServerError):
        await collect(llm, answer_request(f"g {unique()} [sim: fault=503x1]"))
    assert len(await collect(llm, request)) > 5  # the fault was counted once


async def test_a_cut_stream_breaks_off_midway_and_only_streams_are_cut(
    llm: AsyncOpenAI, sim_url: str
) -> None:
    request = answer_request(f"Explain cuts {unique()} [sim: fault=cutx1]")
    whole = await llm.chat.completions.create(**request)  # not a stream: spared, not counted
    received: list[str] = []
    stream = await llm.chat.completions.create(**request, stream=True)
    with pytest.raises(openai.APIConnectionError):
        async for chunk in stream:
            received.append(chunk.choices[0].delta.content or "")
    assert received and 0 < len("".join(received)) < len(whole.choices[0].message.content or "")
    again = await collect(llm, request)
    assert (
        "".join(c.choices[0].delta.content or "" for c in again) == whole.choices[0].message.content
    )
    async with httpx.AsyncClient() as http:
        stats = (await http.get(sim_url.removesuffix("/v1") + "/_sim/stats")).json()
    assert stats["faults"]["cut"] >= 1


async def arrival_times(llm: AsyncOpenAI, request: dict[str, Any]) -> list[float]:
    stream = await llm.chat.completions.create(**request, stream=True)
    return [time.monotonic() async for _ in stream]


async def test_per_token_delay_paces_the_stream_from_config_and_directive(
    llm: AsyncOpenAI,
) -> None:
    with running(SimConfig(token_delay_ms=15)) as url:
        paced = AsyncOpenAI(base_url=f"{url}/v1", api_key="sim", max_retries=0)
        request = answer_request("Explain pacing")
        started = time.monotonic()
        await paced.chat.completions.create(**request)
        unpaced_s = time.monotonic() - started
        times = await arrival_times(paced, request)
        await paced.close()
    assert times[-1] - times[0] >= (len(times) - 1) * 0.015
    assert unpaced_s < 0.5  # a non-streaming reply is not slowed by the token delay

    times = await arrival_times(llm, answer_request(f"Explain {unique()} [sim: token_ms=10]"))
    assert times[-1] - times[0] >= (len(times) - 1) * 0.010


@given(st.text(alphabet=st.sampled_from("ab \n\tcdé😀"), max_size=80))
def test_pieces_join_back_to_the_text(text: str) -> None:
    parts = pieces(text)
    assert "".join(parts) == text
    assert all(parts) and all(len(p.strip()) <= 8 for p in parts)
