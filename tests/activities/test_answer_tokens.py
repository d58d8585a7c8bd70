"""The answer-token side channel against a real redis-server: publish, batch, read, resume."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
from structlog.testing import capture_logs

from keel.activities.answer_tokens import (
    END_TIMEOUT_SECONDS,
    AnswerTokens,
    TokenDelta,
    read_tokens,
    tokens_key,
)
from tests.conftest import free_port, unique


@pytest.fixture
async def raw_redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    """A client like the worker's: bytes replies, the same timeouts."""
    client = aioredis.Redis.from_url(redis_url, socket_connect_timeout=5, socket_timeout=5)
    yield client
    await client.aclose()


@pytest.fixture
async def dead_redis() -> AsyncIterator[aioredis.Redis]:
    """A client of a port nobody listens on: every command fails to connect."""
    client = aioredis.Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_timeout=1)
    yield client
    await client.aclose()


def delta(text: str, *, attempt: int = 1, end: bool = False) -> TokenDelta:
    return TokenDelta(iteration=2, attempt=attempt, text=text, end=end)


async def test_published_deltas_read_back_in_order_and_resume_from_an_id(
    raw_redis: aioredis.Redis, redis_client: aioredis.Redis
) -> None:
    job = unique("job")
    tokens = AnswerTokens(raw_redis, ttl_seconds=600)
    sent = [delta("Hello"), delta(", wörld 😀"), delta("", end=True)]
    for item in sent:
        await tokens.publish(job, item)

    assert tokens_key(job) == f"keel:tokens:{job}"
    for client in (raw_redis, redis_client):  # bytes and decoded replies read the same
        entries = await read_tokens(client, job)
        assert [d for _, d in entries] == sent
    ids = [entry_id for entry_id, _ in entries]
    assert ids == sorted(ids) and all("-" in i for i in ids)
    assert [d for _, d in await read_tokens(raw_redis, job, after=ids[0])] == sent[1:]
    assert await read_tokens(raw_redis, job, after=ids[-1]) == []
    assert [d for _, d in await read_tokens(raw_redis, job, count=2)] == sent[:2]
    assert 590 <= await raw_redis.ttl(tokens_key(job)) <= 600
    assert await read_tokens(raw_redis, unique("nobody")) == []


async def test_streams_are_trimmed_to_about_maxlen(raw_redis: aioredis.Redis) -> None:
    job = unique("job")
    tokens = AnswerTokens(raw_redis, maxlen=100)
    for i in range(1000):
        await tokens.publish(job, delta(str(i)))
    length = await raw_redis.xlen(tokens_key(job))
    # Approximate trimming drops whole radix-tree nodes (100 entries by default), never more
    # than it must: the newest maxlen entries always remain.
    assert 100 <= length <= 250
    newest = await raw_redis.xrevrange(tokens_key(job), count=1)
    assert newest[0][1][b"text"] == b"999"


async def test_a_blocking_read_wakes_on_the_next_delta(raw_redis: aioredis.Redis) -> None:
    job = unique("job")
    tokens = AnswerTokens(raw_redis)
    started = time.monotonic()
    assert await read_tokens(raw_redis, job, block_ms=100) == []
    assert time.monotonic() - started >= 0.09

    waiting = asyncio.create_task(read_tokens(raw_redis, job, "0-0", block_ms=5000))
    await asyncio.sleep(0.1)
    await tokens.publish(job, delta("late"))
    got = await asyncio.wait_for(waiting, 2)
    assert [d.text for _, d in got] == ["late"]


async def test_a_draft_is_batched_in_order_and_ends_with_end(raw_redis: aioredis.Redis) -> None:
    job = unique("job")
    tokens = AnswerTokens(raw_redis, flush_every_seconds=0.03, flush_chars=10_000)
    draft = tokens.draft(job, iteration=2, attempt=3)
    words = [f"w{i} " for i in range(150)]
    started = time.monotonic()
    for word in words:
        draft.feed(word)
        await asyncio.sleep(0.002)  # a model writing about 400 tokens a second
    fed_s = time.monotonic() - started
    await draft.finish("tail")

    deltas = [d for _, d in await read_tokens(raw_redis, job)]
    assert "".join(d.text for d in deltas) == "".join(words) + "tail" == draft.fed
    assert [d.end for d in deltas] == [False] * (len(deltas) - 1) + [True]
    assert {(d.iteration, d.attempt) for d in deltas} == {(2, 3)}
    assert 0 < await raw_redis.ttl(tokens_key(job)) <= 86_400  # set by the first write
    # Batched by time: about one write per 30 ms of writing, far fewer than 150.
    assert 3 <= len(deltas) <= fed_s / 0.03 + 3


async def test_a_large_batch_goes_out_at_once_and_abort_sends_nothing_more(
    raw_redis: aioredis.Redis,
) -> None:
    job = unique("job")
    tokens = AnswerTokens(raw_redis, flush_every_seconds=60, flush_chars=100)
    draft = tokens.draft(job, iteration=0, attempt=1)
    draft.feed("x" * 20)
    draft.feed("y" * 100)
    await asyncio.sleep(0.2)
    assert [d.text for _, d in await read_tokens(raw_redis, job)] == ["x" * 20 + "y" * 100]
    draft.feed("z" * 10)
    await draft.abort()
    await asyncio.sleep(0.05)
    assert len(await read_tokens(raw_redis, job)) == 1  # no end, no pending text


async def test_redis_down_is_logged_and_never_raised(dead_redis: aioredis.Redis) -> None:
    job = unique("job")
    tokens = AnswerTokens(dead_redis, flush_every_seconds=0.01)
    with capture_logs() as logs:
        await tokens.publish(job, delta("lost"))
        draft = tokens.draft(job, iteration=0, attempt=1)
        started = time.monotonic()
        for word in ("a", "b", "c"):
            draft.feed(word)
            await asyncio.sleep(0.02)
        await draft.finish("d")
        finished_s = time.monotonic() - started
    failures = [e for e in logs if e["event"].startswith("answer_tokens.")]
    assert failures and all(e["job_id"] == job for e in failures)
    assert failures[0]["event"] == "answer_tokens.publish_failed"
    assert finished_s < 0.06 + END_TIMEOUT_SECONDS + 0.5
