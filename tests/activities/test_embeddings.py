"""The Embedder against the real simulator's /v1/embeddings and a real Redis cache.

Every request counted below is one the simulator answered (its /_sim/stats agree with the
Embedder's counter), and every cache hit is a request that was not sent.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import numpy as np
import openai
import pytest
import redis.asyncio as aioredis
from temporalio.exceptions import ApplicationError

from keel.activities.cache import CacheKind, KeelCache
from keel.activities.embeddings import MAX_BATCH, Embedder
from keel.activities.errors import LLM_REJECTED, LLM_TRANSIENT
from keel.workers.sim import wire
from tests.conftest import free_port, unique

MODEL = "sim-embed"


@pytest.fixture
async def llm(sim_url: str) -> AsyncIterator[openai.AsyncOpenAI]:
    client = openai.AsyncOpenAI(base_url=sim_url, api_key="sim-local-key", max_retries=0)
    yield client
    await client.close()


@pytest.fixture
async def cache(redis_url: str) -> AsyncIterator[KeelCache]:
    redis = aioredis.Redis.from_url(redis_url)
    yield KeelCache(redis)
    await redis.aclose()


async def sim_embedding_requests(sim_url: str) -> int:
    async with httpx.AsyncClient() as http:
        stats = (await http.get(sim_url.removesuffix("/v1") + "/_sim/stats")).json()
    return int(stats["requests"]["embeddings"])


async def test_vectors_are_the_endpoints_unit_vectors_in_order_and_batched(
    llm: openai.AsyncOpenAI, sim_url: str
) -> None:
    texts = [f"document number {i} about topic {i % 7}" for i in range(2 * MAX_BATCH + 44)]
    embedder = Embedder(llm, MODEL, None)
    before = await sim_embedding_requests(sim_url)
    vectors = await embedder.embed([*texts, texts[0]], tenant="acme")  # a repeat is sent once
    assert vectors.shape == (len(texts) + 1, wire.EMBEDDING_DIM)
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
    expected = np.array([wire.embed(t) for t in texts], dtype=np.float32)
    np.testing.assert_allclose(vectors[: len(texts)], expected, atol=1e-6)
    np.testing.assert_array_equal(vectors[-1], vectors[0])
    # 300 distinct texts in requests of at most 128: three requests, as the simulator saw.
    assert embedder.requests == 3 and embedder.embedded == len(texts)
    assert await sim_embedding_requests(sim_url) - before == 3
    assert (await embedder.embed([], tenant="acme")).shape[0] == 0


async def test_cache_hits_for_the_same_tenant_only(
    llm: openai.AsyncOpenAI, cache: KeelCache, redis_client: aioredis.Redis
) -> None:
    acme, globex = unique("acme"), unique("globex")
    texts = ["retry policies with backoff", "budgets cap tokens", "redis keeps blobs"]
    first = Embedder(llm, MODEL, cache)
    cold = await first.embed(texts, tenant=acme)
    assert first.requests == 1 and first.embedded == 3
    keys = await redis_client.keys(f"keel:cache:embedding:{{{acme}}}:*")
    assert len(keys) == 3  # one entry per text, in the tenant's key space

    # Another worker (another Embedder, same Redis), same tenant: every vector from the cache.
    second = Embedder(llm, MODEL, cache)
    warm = await second.embed([texts[2], texts[0], texts[1]], tenant=acme)
    assert second.requests == 0
    np.testing.assert_array_equal(warm, cold[[2, 0, 1]])
    # One new text among cached ones: only that one is sent.
    await second.embed([*texts, "a brand new text"], tenant=acme)
    assert second.requests == 1 and second.embedded == 1

    # Another tenant never reads acme's entries, so it cannot learn from timing what acme sent.
    other = Embedder(llm, MODEL, cache)
    await other.embed(texts, tenant=globex)
    assert other.embedded == 3
    # Another model's vectors are other entries too.
    model_b = Embedder(llm, "sim-embed-b", cache)
    await model_b.embed(texts, tenant=acme)
    assert model_b.embedded == 3
    # No tenant: no cache at all (nothing read, nothing written).
    anonymous = Embedder(llm, MODEL, cache)
    await anonymous.embed(texts, tenant="")
    assert anonymous.embedded == 3


async def test_unreadable_entries_are_misses_and_are_replaced(
    llm: openai.AsyncOpenAI, cache: KeelCache, redis_client: aioredis.Redis
) -> None:
    tenant = unique("acme")
    embedder = Embedder(llm, MODEL, cache)
    await embedder.embed(["one text"], tenant=tenant)
    (key,) = await redis_client.keys(f"keel:cache:embedding:{{{tenant}}}:*")
    for garbage in ('{"f32": "not base64!"}', '{"f32": "AAA="}', "[1, 2]", "{not json"):
        await redis_client.set(key, garbage)
        again = Embedder(llm, MODEL, cache)
        vector = await again.embed(["one text"], tenant=tenant)
        assert again.embedded == 1
        np.testing.assert_allclose(vector[0], wire.embed("one text"), atol=1e-6)
    assert "f32" in (await redis_client.get(key) or "")


async def test_a_cache_outage_reads_as_misses(llm: openai.AsyncOpenAI) -> None:
    dead = aioredis.Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_timeout=1)
    cache = KeelCache(dead)
    embedder = Embedder(llm, MODEL, cache)
    vectors = await embedder.embed(["still embedded", "without a cache"], tenant="acme")
    assert vectors.shape == (2, wire.EMBEDDING_DIM)
    assert cache.stats.errors[CacheKind.EMBEDDING.value] == 1  # the read; the write then waits
    await dead.aclose()


async def test_endpoint_failures_are_classified(sim_url: str) -> None:
    down = openai.AsyncOpenAI(
        base_url=f"http://127.0.0.1:{free_port()}/v1", api_key="sk-secret-key", max_retries=0
    )
    with pytest.raises(ApplicationError) as refused:
        await Embedder(down, MODEL, None).embed(["x"], tenant="acme")
    assert refused.value.type == LLM_TRANSIENT and not refused.value.non_retryable
    assert "sk-secret-key" not in str(refused.value)
    # A path the endpoint does not serve answers 404: repeating the request cannot help.
    wrong = openai.AsyncOpenAI(base_url=sim_url + "/nope", api_key="sim", max_retries=0)
    with pytest.raises(ApplicationError) as rejected:
        await Embedder(wrong, MODEL, None).embed(["x"], tenant="acme")
    assert rejected.value.type == LLM_REJECTED and rejected.value.non_retryable
    await down.close()
    await wrong.close()


def test_no_model_or_no_client_turns_dense_off(llm: openai.AsyncOpenAI) -> None:
    assert Embedder(llm, MODEL).enabled
    assert not Embedder(llm, "").enabled
    assert not Embedder(None, MODEL).enabled


async def test_embedding_without_a_model_is_refused(llm: openai.AsyncOpenAI) -> None:
    with pytest.raises(RuntimeError, match="no embedding model"):
        await Embedder(llm, "").embed(["x"], tenant="acme")
