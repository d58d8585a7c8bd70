"""Hybrid retrieval: BM25 and the simulator's vectors fused, embedded once per index version.

The simulator's vectors are hashed bags of words, stopwords included, while BM25 drops
stopwords and weighs rare terms. So on the crafted corpus below, the "paraphrase" shares the
query's function words and only one common content word (BM25 ranks it third), and the
document naming the rare code shares little else with the query (dense ranks it third): each
single ranker misses one of them at k=2, and fusion finds both.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import openai
import pytest
import redis.asyncio as aioredis
from temporalio.testing import ActivityEnvironment

from keel.activities.cache import CacheKind, KeelCache
from keel.activities.catalog import SearchDocsArgs
from keel.activities.corpora import Corpora
from keel.activities.embeddings import Embedder
from keel.activities.retrieval import MAX_TOP_K, RetrievalActivities, Retriever
from keel.activities.tools.base import ToolContext
from keel.activities.tools.search_docs import SearchDocs
from keel.activities.types import RetrievalQuery
from tests.conftest import free_port, unique

MODEL = "sim-embed"
QUERY = "is it stuck on XQ41 or is it idle"
CORPUS = {
    "rare.md": "XQ41 is the lease expiry code: it is raised once a slot timer lapses.",
    "lexical.md": "Idle workers and stuck workers show in the fleet dashboard, sorted by age "
    "and queue.",
    "paraphrase.md": "Is it on, or is it just idle, waiting for work from the queue?",
    "dense.md": "Is it on? It is, or it is not.",
    "f1.md": "Budgets cap tokens, cost and wall-clock time for each job in the fleet.",
    "f2.md": "Redis stores blobs and idempotency records with a time to live.",
    "f3.md": "Webhooks deliver outcomes to callback addresses signed with a shared secret.",
}


def write(root: Path, rel: str, text: str) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def touch_later(path: Path, text: str) -> None:
    """Rewrite ``path`` with a later mtime, so the change shows even within one clock tick."""
    path.write_text(text, encoding="utf-8")
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


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


@pytest.fixture
def crafted(tmp_path: Path) -> Path:
    for rel, text in CORPUS.items():
        write(tmp_path, rel, text)
    return tmp_path


async def test_fusion_finds_what_each_ranker_alone_misses(
    crafted: Path, llm: openai.AsyncOpenAI
) -> None:
    retriever = Retriever(embedder=Embedder(llm, MODEL))
    assert retriever.default_mode == "hybrid"
    wanted = {"rare.md", "paraphrase.md"}
    found = {}
    for mode in ("bm25", "dense", "hybrid"):
        result = await retriever.retrieve(str(crafted), QUERY, top_k=2, mode=mode)
        assert result.mode == mode and result.degraded is None
        found[mode] = {h.path for h in result.hits}
    assert "paraphrase.md" not in found["bm25"] and "rare.md" in found["bm25"]
    assert "rare.md" not in found["dense"] and "paraphrase.md" in found["dense"]
    assert found["hybrid"] == wanted
    recall = {mode: len(paths & wanted) for mode, paths in found.items()}
    assert recall["hybrid"] >= max(recall["bm25"], recall["dense"])
    # Fused scores: reciprocal rank fusion scaled to (0, 1], best first.
    hits = await retriever.search(str(crafted), QUERY, top_k=MAX_TOP_K)
    assert all(0 < h.score <= 1 for h in hits)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    # Without an embedding model the default is BM25, with BM25's own scores.
    plain = await Retriever().retrieve(str(crafted), QUERY, top_k=2)
    assert plain.mode == "bm25" and {h.path for h in plain.hits} == found["bm25"]


async def test_filters_apply_before_ranking_in_every_mode(
    tmp_path: Path, llm: openai.AsyncOpenAI
) -> None:
    # Ten strong matches outside the filter must not crowd out the one weak match inside it.
    for i in range(10):
        write(tmp_path, f"a/doc{i}.md", "retry retry retry retry backoff")
    write(tmp_path, "b/weak.txt", "one retry mention among many other words here")
    write(tmp_path, "b/unrelated.txt", "zeppelins float over the harbour at dawn")
    retriever = Retriever(embedder=Embedder(llm, MODEL))
    for mode in ("hybrid", "dense", "bm25"):
        hits = await retriever.search(
            str(tmp_path), "retry backoff", top_k=1, filters={"dir": "b"}, mode=mode
        )
        assert [h.path for h in hits] == ["b/weak.txt"], mode
    assert await retriever.search(str(tmp_path), "retry", filters={"dir": "nowhere"}) == []


async def test_top_k_is_capped(tmp_path: Path, llm: openai.AsyncOpenAI) -> None:
    for i in range(25):
        write(tmp_path, f"doc{i:02}.md", f"keel document number {i}")
    retriever = Retriever(embedder=Embedder(llm, MODEL))
    for mode in ("hybrid", "dense"):
        hits = await retriever.search(str(tmp_path), "keel document", top_k=100, mode=mode)
        assert len(hits) == MAX_TOP_K == 20
    assert await retriever.search(str(tmp_path), "   ") == []


async def test_documents_are_embedded_once_per_index_version(
    crafted: Path, llm: openai.AsyncOpenAI
) -> None:
    embedder = Embedder(llm, MODEL)
    retriever = Retriever(embedder=embedder)
    # Five concurrent searches of a fresh index share one embedding run.
    results = await asyncio.gather(
        *(retriever.retrieve(str(crafted), f"{QUERY} {i}", cache=False) for i in range(5))
    )
    assert retriever.doc_embeddings == 1
    assert embedder.embedded == len(CORPUS) + 5  # the documents once, each query once
    assert len({r.index_version for r in results}) == 1 and results[0].index_version
    await retriever.search(str(crafted), "webhooks secret")
    assert retriever.doc_embeddings == 1 and embedder.embedded == len(CORPUS) + 6
    # BM25 searches never embed anything.
    await retriever.search(str(crafted), "redis blobs", mode="bm25")
    assert embedder.embedded == len(CORPUS) + 6

    touch_later(crafted / "f2.md", "Redis keeps zeppelin blobs for a while.")
    changed = await retriever.retrieve(str(crafted), "zeppelin")
    assert retriever.doc_embeddings == 2 and retriever.builds == 2
    assert changed.index_version != results[0].index_version
    assert changed.hits[0].path == "f2.md"


async def test_a_search_does_not_wait_for_ever_on_the_documents(
    crafted: Path, llm: openai.AsyncOpenAI
) -> None:
    retriever = Retriever(embedder=Embedder(llm, MODEL), embed_wait_seconds=0)
    first = await retriever.retrieve(str(crafted), QUERY)
    assert first.mode == "bm25"
    assert first.degraded and "still being embedded" in first.degraded
    # The run went on without the search that started it; the next search uses its vectors.
    for _ in range(200):
        if retriever.doc_embeddings:
            break
        await asyncio.sleep(0.01)
    later = await retriever.retrieve(str(crafted), QUERY)
    assert later.mode == "hybrid" and later.degraded is None and retriever.doc_embeddings == 1


async def test_embedding_cache_is_shared_by_workers_of_one_tenant_only(
    crafted: Path, llm: openai.AsyncOpenAI, cache: KeelCache
) -> None:
    acme, globex = unique("acme"), unique("globex")

    def worker() -> tuple[Retriever, Embedder]:
        embedder = Embedder(llm, MODEL, cache)
        return Retriever(embedder=embedder, cache=cache), embedder

    first, first_embedder = worker()
    await first.search(str(crafted), QUERY, tenant=acme, cache=False)
    assert first_embedder.embedded == len(CORPUS) + 1
    second, second_embedder = worker()  # another process: its own index, the same Redis
    hits = await second.search(str(crafted), QUERY, tenant=acme, cache=False)
    assert second.doc_embeddings == 1 and second_embedder.requests == 0
    assert {h.path for h in hits[:2]} == {"rare.md", "paraphrase.md"}
    third, third_embedder = worker()
    await third.search(str(crafted), QUERY, tenant=globex, cache=False)
    assert third_embedder.embedded == len(CORPUS) + 1


async def test_retrieval_cache_hits_only_the_same_search(
    crafted: Path, llm: openai.AsyncOpenAI, cache: KeelCache
) -> None:
    tenant = unique("acme")
    embedder = Embedder(llm, MODEL, cache)
    retriever = Retriever(embedder=embedder, cache=cache)
    first = await retriever.retrieve(str(crafted), QUERY, top_k=3, tenant=tenant)
    assert not first.cached and first.hits
    again = await retriever.retrieve(
        str(crafted), f"  {QUERY.replace(' ', '  ')} ", 3, tenant=tenant
    )
    assert again.cached and again.hits == first.hits and again.mode == first.mode
    assert again.index_version == first.index_version

    async def cached(query: str = QUERY, **changes: Any) -> bool:
        args: dict[str, Any] = {"top_k": 3, "tenant": tenant} | changes
        return (await retriever.retrieve(str(crafted), query, **args)).cached

    assert not await cached(top_k=4)
    assert not await cached(filters={"ext": "md"})
    assert not await cached(query="Is it stuck on XQ41 or is it idle")  # case is kept
    assert not await cached(query="what is XQ41")
    assert not await cached(mode="bm25")
    assert not await cached(rerank=True)
    assert not await cached(tenant=unique("globex"))
    assert not await cached(cache=False)
    assert await cached(top_k=4)  # each of those is now an entry of its own
    assert await cached(tenant=tenant)
    # Another corpus reference naming the same folder is another key.
    corpora = Corpora({tenant: {"ops": str(crafted)}})
    named = Retriever(corpora=corpora, embedder=embedder, cache=cache)
    assert not (await named.retrieve("corpus:ops", QUERY, 3, tenant=tenant)).cached
    assert (await named.retrieve("corpus:ops", QUERY, 3, tenant=tenant)).cached
    # A changed document is a new index version: a miss, and the new hits.
    touch_later(crafted / "f1.md", "XQ41 also appears in budgets.")
    changed = await retriever.retrieve(str(crafted), QUERY, 3, tenant=tenant)
    assert not changed.cached and changed.index_version != first.index_version
    assert cache.stats.hits[CacheKind.RETRIEVAL.value] >= 4


async def test_a_cache_outage_is_a_miss_and_the_search_still_works(
    crafted: Path, llm: openai.AsyncOpenAI
) -> None:
    dead = aioredis.Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_timeout=1)
    cache = KeelCache(dead)
    retriever = Retriever(embedder=Embedder(llm, MODEL, cache), cache=cache)
    for _ in range(2):
        result = await retriever.retrieve(str(crafted), QUERY, top_k=2, tenant="acme")
        assert not result.cached and result.degraded is None
        assert {h.path for h in result.hits} == {"rare.md", "paraphrase.md"}
    # Whichever lookup failed first, the others were misses without trying Redis again.
    assert sum(cache.stats.errors.values()) >= 1
    assert cache.stats.misses[CacheKind.RETRIEVAL.value] >= 1
    assert cache.stats.misses[CacheKind.EMBEDDING.value] >= 1
    await dead.aclose()


async def test_an_embeddings_outage_degrades_to_bm25_and_is_not_cached(
    crafted: Path, sim_url: str, cache: KeelCache
) -> None:
    tenant = unique("acme")
    down = openai.AsyncOpenAI(
        base_url=f"http://127.0.0.1:{free_port()}/v1", api_key="sim", max_retries=0
    )
    wrong = openai.AsyncOpenAI(base_url=sim_url + "/nope", api_key="sim", max_retries=0)
    bm25 = await Retriever().search(str(crafted), QUERY, top_k=3)
    for client, error_type in ((down, "LLMTransient"), (wrong, "LLMRequestRejected")):
        retriever = Retriever(embedder=Embedder(client, MODEL, cache), cache=cache)
        for mode in ("hybrid", "dense", "hybrid"):
            result = await retriever.retrieve(str(crafted), QUERY, 3, tenant=tenant, mode=mode)
            assert result.mode == "bm25" and result.hits == bm25
            assert result.degraded == (
                f"the embeddings endpoint failed ({error_type}); ranked by BM25"
            )
            # A degraded search is never stored, so the same search asks the endpoint again.
            assert not result.cached
    await down.close()
    await wrong.close()


async def test_rerank_drops_near_duplicates(tmp_path: Path, llm: openai.AsyncOpenAI) -> None:
    text = "retry policies set backoff and attempts for activities"
    write(tmp_path, "a.md", text)
    write(tmp_path, "a-copy.md", text + " copy")
    write(tmp_path, "b.md", "retry budgets cap the attempts of a job")
    write(tmp_path, "c.md", "redis keeps blobs")
    retriever = Retriever(embedder=Embedder(llm, MODEL))
    query = "retry policies backoff attempts"
    plain = await retriever.search(str(tmp_path), query, top_k=2)
    assert [h.path for h in plain] == ["a.md", "a-copy.md"]
    reranked = await retriever.search(str(tmp_path), query, top_k=2, rerank=True)
    assert [h.path for h in reranked] == ["a.md", "b.md"]
    # Without vectors there is nothing to rerank by: BM25 order, and a note saying so.
    bare = await Retriever().retrieve(str(tmp_path), query, top_k=2, rerank=True)
    assert [h.path for h in bare.hits] == ["a.md", "a-copy.md"]
    assert (
        bare.degraded
        == "no embedding model is configured on this worker; ranked by BM25 without rerank"
    )


async def test_search_corpus_and_search_docs_share_the_retrieval_cache(
    crafted: Path, llm: openai.AsyncOpenAI, cache: KeelCache
) -> None:
    tenant = unique("acme")
    retriever = Retriever(embedder=Embedder(llm, MODEL, cache), cache=cache)
    acts = RetrievalActivities(retriever)
    query = RetrievalQuery(
        job_id="job-1", tenant=tenant, docs_dir=str(crafted), query=QUERY, top_k=5
    )
    env = ActivityEnvironment()
    first = await env.run(acts.search_corpus, query)
    assert first.mode == "hybrid" and not first.cached and first.attempt == 1
    second = await env.run(acts.search_corpus, query)
    assert second.cached and second.hits == first.hits
    opted_out = await env.run(acts.search_corpus, query.model_copy(update={"cache": False}))
    assert not opted_out.cached and opted_out.hits == first.hits
    bm25 = await env.run(acts.search_corpus, query.model_copy(update={"mode": "bm25"}))
    assert bm25.mode == "bm25" and not bm25.cached

    # The search_docs tool searches through the same Retriever with the job's tenant.
    tool = SearchDocs(retriever)
    ctx = ToolContext(job_id="job-1", tenant=tenant, op_key="job-1:0:s1", docs_dir=str(crafted))
    hits_before = cache.stats.hits[CacheKind.RETRIEVAL.value]
    text = await tool(SearchDocsArgs(query=QUERY, top_k=5), ctx)
    assert cache.stats.hits[CacheKind.RETRIEVAL.value] == hits_before + 1
    assert text.splitlines()[0].startswith(first.hits[0].path)


async def test_the_worker_wires_hybrid_retrieval_from_its_settings(
    crafted: Path, redis_url: str, sim_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Wiring of workers/registry.py and workers/settings.py, tested beside the feature it wires.
    from keel.activities.llm import LLMConfig
    from keel.workers.registry import build_deps
    from keel.workers.settings import WorkerSettings

    monkeypatch.delenv("KEEL_EMBEDDING_MODEL", raising=False)
    assert WorkerSettings().embedding_model == "text-embedding-3-small"
    monkeypatch.setenv("KEEL_EMBEDDING_MODEL", "")
    assert WorkerSettings().embedding_model == ""

    common: dict[str, Any] = {
        "redis_url": redis_url,
        "openai_base_url": sim_url,
        "openai_api_key": "sim-local-key",
        "llm_config": LLMConfig(),
        "http_allowed_hosts": [],
    }
    plain = build_deps(**common)
    hybrid = build_deps(**common, embedding_model=MODEL)
    try:
        assert plain.retriever.default_mode == "bm25"
        assert hybrid.retriever.default_mode == "hybrid"
        tenant = unique("acme")
        first = await hybrid.retriever.retrieve(str(crafted), QUERY, 2, tenant=tenant)
        assert {h.path for h in first.hits} == {"rare.md", "paraphrase.md"}
        # The retrieval cache is the worker's KeelCache over its Redis.
        assert (await hybrid.retriever.retrieve(str(crafted), QUERY, 2, tenant=tenant)).cached
        assert hybrid.cache is not None and hybrid.cache.stats.hits["retrieval"] == 1
    finally:
        await plain.aclose()
        await hybrid.aclose()
