"""The tool-result cache in the execute_tool gateway, run through ActivityEnvironment.

Redis is a real redis-server (conftest); http_get fetches from a local http.server that counts
its requests, and the calculator is wrapped in a counter, so every "hit" below is proven by a
tool that did not run, and every "miss" by one that did.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import urllib.request
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from pydantic import BaseModel
from temporalio import workflow
from temporalio.client import Client
from temporalio.exceptions import ApplicationError
from temporalio.runtime import PrometheusConfig, Runtime, TelemetryConfig
from temporalio.testing import ActivityEnvironment
from temporalio.worker import Replayer, UnsandboxedWorkflowRunner

from keel.activities import errors
from keel.activities.cache import CacheKind, CacheSettings, KeelCache
from keel.activities.catalog import BUILTIN_TOOLS, SearchDocsArgs, ToolInfo, WriteNoteArgs
from keel.activities.converter import DATA_CONVERTER
from keel.activities.retrieval import Retriever
from keel.activities.store import KeelStore, blob_ref
from keel.activities.tools import ToolActivities, ToolContext, ToolImpl, ToolRegistry
from keel.activities.tools.calculator import calculator
from keel.activities.tools.http_get import HttpGet
from keel.activities.tools.notes import WriteNote
from keel.activities.tools.result_cache import canonical_args
from keel.activities.tools.search_docs import SearchDocs
from keel.activities.types import PREVIEW_CHARS, ToolCall, ToolResult
from keel.workflows import policies
from tests.conftest import free_port, reply, serving, unique

LARGE_BODY = "L" * (PREVIEW_CHARS * 4)
MAX_BYTES = 50_000


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server API)
        self.server.hits.append(self.path)  # type: ignore[attr-defined]
        port = self.server.server_port  # type: ignore[attr-defined]
        routes: dict[str, tuple[int, dict[str, str], str]] = {
            "/page": (200, {}, "page v1"),
            "/large": (200, {}, LARGE_BODY),
            "/500": (500, {}, "boom"),
            "/away": (302, {"Location": f"http://inside.test:{port}/page"}, ""),
        }
        status, headers, body = routes.get(self.path, (404, {}, "unknown"))
        reply(self, status, headers, body.encode())

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def http_server() -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.hits = []  # type: ignore[attr-defined]
    with serving(server):
        yield server


@pytest.fixture
def hits(http_server: ThreadingHTTPServer) -> list[str]:
    found: list[str] = http_server.hits  # type: ignore[attr-defined]
    found.clear()
    return found


@pytest.fixture
def origin(http_server: ThreadingHTTPServer) -> str:
    return f"127.0.0.1:{http_server.server_port}"


@pytest.fixture
def store(redis_client: aioredis.Redis) -> KeelStore:
    return KeelStore(redis_client)


@pytest.fixture
def cache(redis_client: aioredis.Redis) -> KeelCache:
    return KeelCache(redis_client)


@pytest.fixture
def tenant() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"


class Gateways:
    """Builds gateways (one per simulated worker) over one cache; the calculator counts runs."""

    def __init__(self, store: KeelStore, cache: KeelCache, origin: str) -> None:
        self.store, self.cache, self.origin = store, cache, origin
        self.runs: list[str] = []
        self.registries: list[ToolRegistry] = []

    def build(
        self,
        *,
        cache: KeelCache | None | bool = True,
        allowed: list[str] | None = None,
        by_tenant: dict[str, list[str]] | None = None,
        max_bytes: int = MAX_BYTES,
        calculator_info: ToolInfo = BUILTIN_TOOLS["calculator"],
        extra: tuple[ToolInfo, ...] = (),
    ) -> ToolActivities:
        registry = ToolRegistry()
        self.registries.append(registry)
        http = HttpGet(
            registry.http_client,
            [self.origin] if allowed is None else allowed,
            max_bytes,
            5.0,
            allowed_by_tenant=by_tenant,
            resolve=_resolve,
        )
        registry.register(BUILTIN_TOOLS["http_get"], http)
        registry.register(BUILTIN_TOOLS["write_note"], WriteNote(self.store))
        registry.register(calculator_info, self._counted(calculator))
        for info in extra:
            registry.register(info, self._counted(_echo_args))
        chosen = self.cache if cache is True else (cache or None)
        return ToolActivities(registry, self.store, cache=chosen)

    def _counted(self, impl: Callable[[Any, ToolContext], Awaitable[str]]) -> ToolImpl:
        async def counted(args: BaseModel, ctx: ToolContext) -> str:
            self.runs.append(ctx.op_key)
            return await impl(args, ctx)

        return counted


async def _resolve(host: str, port: int) -> list[str]:
    """DNS at its seam: the redirect target ``inside.test`` is this machine."""
    return ["127.0.0.1"] if host in ("inside.test", "127.0.0.1") else []


async def _echo_args(args: SearchDocsArgs, ctx: ToolContext) -> str:
    return canonical_args(args)


@pytest.fixture
async def gateways(store: KeelStore, cache: KeelCache, origin: str) -> AsyncIterator[Gateways]:
    built = Gateways(store, cache, origin)
    yield built
    for registry in built.registries:
        await registry.aclose()


def call(
    tenant: str, tool: str, args: dict[str, Any], job: str = "agent-job-1", **kw: Any
) -> ToolCall:
    fields: dict[str, Any] = {
        "job_id": job,
        "tenant": tenant,
        "op_key": f"{job}:0:{uuid.uuid4().hex[:6]}",
        "tool": tool,
        "args": args,
        "allowed_tools": [tool],
    }
    return ToolCall(**(fields | kw))


async def run(
    acts: ToolActivities, c: ToolCall, env: ActivityEnvironment | None = None
) -> ToolResult:
    return await (env or ActivityEnvironment()).run(acts.execute_tool, c)


async def fails(acts: ToolActivities, c: ToolCall) -> ApplicationError:
    with pytest.raises(ApplicationError) as info:
        await run(acts, c)
    return info.value


async def tool_keys(redis: aioredis.Redis, tenant: str) -> list[str]:
    return [k async for k in redis.scan_iter(f"keel:cache:tool:{{{tenant}}}:*")]


def calc(tenant: str, expression: str, **kw: Any) -> ToolCall:
    return call(tenant, "calculator", {"expression": expression}, **kw)


# --- declarations -----------------------------------------------------------------------------


def test_catalog_declares_read_only_tools_and_their_ttls() -> None:
    declared = {n: (t.read_only, t.cacheable) for n, t in BUILTIN_TOOLS.items()}
    assert declared == {
        "calculator": (True, True),
        "http_get": (True, True),
        # Read-only, but served by the Retriever's retrieval cache, keyed by index version.
        "search_docs": (True, False),
        "write_note": (False, False),
        "http_post": (False, False),
    }
    assert BUILTIN_TOOLS["calculator"].cache_ttl_seconds >= 86_400
    assert 0 < BUILTIN_TOOLS["http_get"].cache_ttl_seconds <= 600


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"side_effecting": True, "read_only": True}, "both side-effecting and read-only"),
        ({"side_effecting": True, "cache_ttl_seconds": 60.0}, "not declared read-only"),
        ({"cache_ttl_seconds": 60.0}, "not declared read-only"),
        ({"read_only": True, "cache_ttl_seconds": -1.0}, "finite and >= 0"),
        ({"read_only": True, "cache_ttl_seconds": float("inf")}, "finite and >= 0"),
        ({"read_only": True, "version": ""}, "needs a version"),
    ],
)
def test_tool_info_refuses_declarations_the_gateway_cannot_honour(
    kw: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        ToolInfo("t", "A tool.", WriteNoteArgs, **kw)


def test_canonical_args_sort_keys_and_fill_defaults() -> None:
    one = SearchDocsArgs.model_validate({"query": "q", "filters": {"b": "2", "a": "1"}})
    two = SearchDocsArgs.model_validate({"filters": {"a": "1", "b": "2"}, "top_k": 5, "query": "q"})
    assert canonical_args(one) == canonical_args(two)
    assert canonical_args(one) == '{"filters":{"a":"1","b":"2"},"query":"q","top_k":5}'


# --- hits and misses --------------------------------------------------------------------------


async def test_same_tenant_tool_and_args_hit(
    gateways: Gateways, cache: KeelCache, tenant: str
) -> None:
    acts = gateways.build()
    first = await run(acts, calc(tenant, "6 * 7"))
    second = await run(acts, calc(tenant, "6 * 7", job="agent-job-2"))
    assert first == ToolResult(content="42", cached=False)  # looked up, missed
    assert second == ToolResult(content="42", cached=True)
    assert len(gateways.runs) == 1
    assert cache.stats.hits.get("tool", 0) >= 1


async def test_argument_order_and_defaults_share_an_entry(gateways: Gateways, tenant: str) -> None:
    info = ToolInfo(
        "lookup", "Echo the arguments.", SearchDocsArgs, read_only=True, cache_ttl_seconds=60
    )
    acts = gateways.build(extra=(info,))
    same: list[dict[str, Any]] = [
        {"query": "retry", "filters": {"ext": "md", "dir": "a"}},
        {"filters": {"dir": "a", "ext": "md"}, "query": "retry"},
        {"top_k": 5, "query": "retry", "filters": {"dir": "a", "ext": "md"}},
    ]
    results = [await run(acts, call(tenant, "lookup", args)) for args in same]
    assert [r.cached for r in results] == [False, True, True]
    assert len({r.content for r in results}) == 1
    differing: list[dict[str, Any]] = [
        {"query": "retry", "top_k": 6, "filters": {"dir": "a", "ext": "md"}},
        {"query": "retry", "filters": {"dir": "a"}},
        {"query": "Retry", "filters": {"dir": "a", "ext": "md"}},
    ]
    for differs in differing:
        result = await run(acts, call(tenant, "lookup", differs))
        assert not result.cached, differs
    assert len(gateways.runs) == 4


async def test_no_hit_across_tenants(gateways: Gateways, tenant: str) -> None:
    acts = gateways.build()
    other = f"{tenant}x"
    await run(acts, calc(tenant, "2 ** 10"))
    result = await run(acts, calc(other, "2 ** 10"))
    assert result == ToolResult(
        content="1024", cached=False
    )  # not cached: the other tenant's tool ran
    assert len(gateways.runs) == 2
    assert (await run(acts, calc(other, "2 ** 10"))).cached


async def test_no_hit_across_tool_versions_or_arguments(gateways: Gateways, tenant: str) -> None:
    v1 = gateways.build()
    v2 = gateways.build(
        calculator_info=dataclasses.replace(BUILTIN_TOOLS["calculator"], version="2")
    )
    await run(v1, calc(tenant, "1 + 1"))
    assert not (await run(v2, calc(tenant, "1 + 1"))).cached  # the new version runs the tool
    assert not (await run(v1, calc(tenant, "1 + 2"))).cached
    assert not (await run(v1, calc(tenant, "1+1"))).cached  # arguments are not reparsed
    assert (await run(v2, calc(tenant, "1 + 1"))).cached
    assert len(gateways.runs) == 4


async def test_write_tools_are_never_cached(
    gateways: Gateways, store: KeelStore, redis_client: aioredis.Redis, tenant: str
) -> None:
    acts = gateways.build()
    args = {"title": "Same", "body": "Same body."}
    first = await run(acts, call(tenant, "write_note", args))
    second = await run(acts, call(tenant, "write_note", args))
    assert not first.cached and not second.cached
    assert [n["title"] for n in await store.list_notes(tenant)] == ["Same", "Same"]
    assert await tool_keys(redis_client, tenant) == []


async def test_tool_errors_are_not_cached(
    gateways: Gateways, redis_client: aioredis.Redis, hits: list[str], origin: str, tenant: str
) -> None:
    acts = gateways.build()
    for _ in range(2):
        err = await fails(acts, calc(tenant, "1 / 0"))
        assert err.type == errors.TOOL_FAILED
        err = await fails(acts, call(tenant, "http_get", {"url": f"http://{origin}/500"}))
        assert err.type == errors.TOOL_TRANSIENT
    assert len(gateways.runs) == 2 and hits == ["/500", "/500"]
    assert await tool_keys(redis_client, tenant) == []


async def test_ttl_is_per_tool_and_expires(
    gateways: Gateways, redis_client: aioredis.Redis, origin: str, tenant: str
) -> None:
    acts = gateways.build()
    await run(acts, calc(tenant, "3 * 3"))
    await run(acts, call(tenant, "http_get", {"url": f"http://{origin}/page"}))
    ttls = sorted([await redis_client.pttl(k) for k in await tool_keys(redis_client, tenant)])
    # http_get's own 5 minutes; the calculator's 7 days, capped by the worker's tool TTL.
    assert 290_000 < ttls[0] <= 300_000
    assert 3_590_000 < ttls[1] <= CacheSettings().ttl_seconds[CacheKind.TOOL] * 1000

    brief = dataclasses.replace(BUILTIN_TOOLS["calculator"], cache_ttl_seconds=0.2)
    short = gateways.build(calculator_info=brief)
    runs = len(gateways.runs)
    await run(short, calc(tenant, "4 * 4"))
    assert (await run(short, calc(tenant, "4 * 4"))).cached
    await asyncio.sleep(0.3)
    assert not (await run(short, calc(tenant, "4 * 4"))).cached
    assert len(gateways.runs) == runs + 2


async def test_cache_outage_degrades_to_misses(gateways: Gateways, tenant: str) -> None:
    down = aioredis.Redis.from_url(
        f"redis://127.0.0.1:{free_port()}", socket_connect_timeout=1, socket_timeout=1
    )
    broken = KeelCache(down)
    acts = gateways.build(cache=broken)
    try:
        results = [await run(acts, calc(tenant, "5 + 5")) for _ in range(2)]
    finally:
        await down.aclose()
    assert results == [ToolResult(content="10", cached=False)] * 2  # misses
    assert len(gateways.runs) == 2
    assert broken.stats.errors["tool"] >= 1  # a lookup failed and was counted, not raised


async def test_job_that_opted_out_neither_reads_nor_writes(
    gateways: Gateways, redis_client: aioredis.Redis, tenant: str
) -> None:
    acts = gateways.build()
    await run(acts, calc(tenant, "7 * 7", cache=False))
    assert await tool_keys(redis_client, tenant) == []
    await run(acts, calc(tenant, "7 * 7"))  # a job that caches stores the result
    opted_out = await run(acts, calc(tenant, "7 * 7", cache=False))
    assert opted_out == ToolResult(content="49")
    assert len(gateways.runs) == 3
    assert len(await tool_keys(redis_client, tenant)) == 1


async def test_no_cache_on_the_worker_runs_every_call(gateways: Gateways, tenant: str) -> None:
    acts = gateways.build(cache=None)
    results = [await run(acts, calc(tenant, "8 * 8")) for _ in range(2)]
    assert not any(r.cached for r in results) and len(gateways.runs) == 2


# --- http_get: its allow-list and body cap decide its output ---------------------------------


async def test_http_get_hit_does_not_fetch(
    gateways: Gateways, hits: list[str], origin: str, tenant: str
) -> None:
    acts = gateways.build()
    url = {"url": f"http://{origin}/page"}
    first = await run(acts, call(tenant, "http_get", url))
    second = await run(acts, call(tenant, "http_get", url))
    assert second == first.model_copy(update={"cached": True})
    assert hits == ["/page"]


async def test_http_get_refuses_a_removed_host_even_when_cached(
    gateways: Gateways, hits: list[str], origin: str, tenant: str
) -> None:
    url = {"url": f"http://{origin}/page"}
    await run(
        gateways.build(by_tenant={tenant: [origin]}, allowed=[]), call(tenant, "http_get", url)
    )
    for removed in (gateways.build(allowed=[]), gateways.build(allowed=["example.com"])):
        err = await fails(removed, call(tenant, "http_get", url))
        assert err.type == errors.TOOL_PERMISSION and err.non_retryable
    assert hits == ["/page"]  # one fetch: the refusals neither fetched nor served the entry


async def test_http_get_allow_list_and_body_cap_are_part_of_the_key(
    gateways: Gateways, hits: list[str], origin: str, tenant: str
) -> None:
    away = {"url": f"http://{origin}/away"}  # redirects to inside.test, listed too
    both = [origin, f"inside.test:{origin.split(':')[1]}"]
    assert (
        await run(gateways.build(allowed=both), call(tenant, "http_get", away))
    ).content.endswith("page v1")
    # inside.test is gone: a hit would serve a page fetched through a hop the list now refuses.
    err = await fails(gateways.build(allowed=[origin]), call(tenant, "http_get", away))
    assert err.type == errors.TOOL_PERMISSION
    smaller = gateways.build(allowed=both, max_bytes=3)
    assert (await run(smaller, call(tenant, "http_get", away))).content.startswith("HTTP 200\npag")
    assert hits == ["/away", "/page", "/away", "/away", "/page"]


async def test_large_cached_output_gets_the_serving_jobs_own_ref(
    gateways: Gateways, store: KeelStore, hits: list[str], origin: str, tenant: str
) -> None:
    acts = gateways.build()
    url = {"url": f"http://{origin}/large"}
    first = await run(acts, call(tenant, "http_get", url, job="agent-job-1"))
    second_call = call(tenant, "http_get", url, job="agent-job-2")
    second = await run(acts, second_call)
    full = f"HTTP 200\n{LARGE_BODY}"
    assert hits == ["/large"] and second.cached
    assert second.ref == blob_ref(tenant, second_call.op_key) != first.ref
    assert (second.content, second.size) == (full[:PREVIEW_CHARS], len(full))
    assert await store.get_blob(second.ref, job_id="agent-job-2", tenant=tenant) == full
    with pytest.raises(ApplicationError) as info:
        await store.get_blob(second.ref, job_id="agent-job-1", tenant=tenant)
    assert info.value.type == errors.REF_NOT_OWNED


# --- search_docs: served by the Retriever's retrieval cache, not this one -------------------


async def test_search_docs_goes_through_the_retrieval_cache(
    store: KeelStore,
    cache: KeelCache,
    redis_client: aioredis.Redis,
    tmp_path: Path,
    tenant: str,
) -> None:
    (tmp_path / "retry.md").write_text("Retry policies bound every activity's attempts.")
    registry = ToolRegistry()
    registry.register(BUILTIN_TOOLS["search_docs"], SearchDocs(Retriever(cache=cache)))
    acts = ToolActivities(registry, store, cache=cache)
    args = {"query": "retry policies"}

    def search(**kw: Any) -> ToolCall:
        return call(tenant, "search_docs", args, docs_dir=str(tmp_path), **kw)

    first = await run(acts, search())
    second = await run(acts, search())
    assert second == first and "retry.md" in first.content
    assert (cache.stats.misses.get("retrieval"), cache.stats.hits.get("retrieval")) == (1, 1)
    await run(acts, search(cache=False))  # the job's opt-out reaches the retrieval cache
    assert (cache.stats.misses.get("retrieval"), cache.stats.hits.get("retrieval")) == (1, 1)
    # A changed document is a new index version: a miss, and the new text.
    (tmp_path / "retry.md").write_text("Retry policies: at most three attempts, then fail.")
    changed = await run(acts, search())
    assert "three attempts" in changed.content and cache.stats.misses["retrieval"] == 2
    assert await tool_keys(redis_client, tenant) == []  # never a tool-cache entry


# --- a real worker, wired by workers/registry.py ---------------------------------------------


@workflow.defn(sandboxed=False)
class TwoSameCalls:
    """Calls the calculator twice with the same arguments, as two steps of one job would."""

    @workflow.run
    async def run(self, tenant: str) -> list[ToolResult]:
        results = []
        for step in ("a", "b"):
            tool_call = ToolCall(
                tenant=tenant,
                step_key=f"0:{step}",
                tool="calculator",
                args={"expression": "12 * 12"},
                allowed_tools=["calculator"],
            )
            results.append(
                await workflow.execute_activity_method(
                    ToolActivities.execute_tool, tool_call, **policies.TOOL_CALL
                )
            )
        return results


async def test_worker_serves_a_hit_recorded_like_a_miss(
    client: Client, make_worker: Any, tenant: str
) -> None:
    async with make_worker(client, workflows=[TwoSameCalls], cache=CacheSettings()) as worker:
        handle = await client.start_workflow(
            TwoSameCalls.run, tenant, id=unique("tool-cache"), task_queue=worker.task_queue
        )
        first, second = await handle.result()
    assert (first.content, first.cached) == ("144", False)
    assert (second.content, second.cached) == ("144", True)
    # Replay reads the recorded results: no worker, no Redis, the same run.
    replayer = Replayer(
        workflows=[TwoSameCalls],
        data_converter=DATA_CONVERTER,
        workflow_runner=UnsandboxedWorkflowRunner(),
    )
    await replayer.replay_workflow(await handle.fetch_history())


# --- counters ---------------------------------------------------------------------------------


async def test_hits_and_misses_are_prometheus_counters(gateways: Gateways, tenant: str) -> None:
    port = free_port()
    runtime = Runtime(
        telemetry=TelemetryConfig(metrics=PrometheusConfig(bind_address=f"127.0.0.1:{port}"))
    )
    env = ActivityEnvironment()
    env.metric_meter = runtime.metric_meter
    acts = gateways.build()
    for _ in range(3):
        await run(acts, calc(tenant, "9 * 9"), env)

    def scrape() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            body: bytes = resp.read()
        return body.decode()

    text = await asyncio.to_thread(scrape)
    counts = {
        m.group(1): float(m.group(2))
        for m in re.finditer(
            r'^keel_cache_requests\w*\{[^}]*result="(\w+)"[^}]*\} (\S+)$', text, re.M
        )
        if 'cache="tool"' in m.group(0)
    }
    assert counts == {"miss": 1.0, "hit": 2.0}
