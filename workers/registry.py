"""What a Keel worker runs: workflows, activities built from dependencies, interceptors.

Tests build workers from these same names, so a worker in a test runs exactly what a
production worker runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
import httpx2
import openai
from temporalio.worker import Interceptor

from keel.activities._backoff import JitteredBackoff
from keel.activities.answer_tokens import AnswerTokens
from keel.activities.breakers import Breakers, BreakerSettings
from keel.activities.cache import CacheSettings, KeelCache
from keel.activities.corpora import Corpora
from keel.activities.costing import CarryAttemptCharges, preload
from keel.activities.embeddings import Embedder
from keel.activities.gateway_limits import GatewayLimits
from keel.activities.llm import Fallback, LLMActivities, LLMConfig, endpoint_name
from keel.activities.redis_client import connect
from keel.activities.retrieval import RetrievalActivities, Retriever
from keel.activities.sessions import SessionActivities
from keel.activities.slots import JobSlotActivities, JobSlots
from keel.activities.store import KeelStore
from keel.activities.tools import ToolActivities, ToolRegistry
from keel.activities.usage import UsageLedger
from keel.activities.webhook_hosts import WebhookHosts
from keel.activities.webhooks import WebhookActivities
from keel.workers.settings import WorkerSettings
from keel.workflows.agent_loop import AgentLoopWorkflow
from keel.workflows.session import SessionWorkflow

WORKFLOWS: list[type] = [AgentLoopWorkflow, SessionWorkflow]
INTERCEPTORS: list[Interceptor] = [JitteredBackoff(), CarryAttemptCharges()]
"""Every retryable activity failure waits a jittered interval before its next attempt; a model
call's heartbeats carry what its failed attempts may have cost to the next attempt."""


@dataclass
class Deps:
    """The clients a worker's activities share. Built once per process."""

    llm: openai.AsyncOpenAI
    llm_config: LLMConfig
    store: KeelStore
    tools: ToolRegistry
    retriever: Retriever
    usage: UsageLedger | None = None
    """Where model calls' cost is charged per tenant and day (quotas, ``GET /v1/usage``)."""
    webhooks: WebhookActivities | None = None
    """Delivers jobs' outcomes to their callback URLs."""
    webhook_http: httpx.AsyncClient | None = None
    gateway: GatewayLimits | None = None
    """The model and tool gateways' fleet-wide limits (in flight, per minute); None: none."""
    slots: JobSlots | None = None
    """Running-job slots per tenant and user; None: every job runs at once."""
    answer_tokens: AnswerTokens | None = None
    """Where ``draft_answer`` streams answer tokens (a Redis stream per job); None: no streaming."""
    cache: KeelCache | None = None
    """Response, tool-result, embedding and retrieval caches (``activities/cache.py``)."""
    breakers: Breakers | None = None
    """Circuit breakers per model endpoint and model and per tool, fleet-wide (issue 16)."""
    fallback: Fallback | None = None
    """Where model calls go while their breaker is open; None: they fail fast."""

    async def aclose(self) -> None:
        """Close the network clients."""
        limit_stores = {id(s.redis): s.redis for s in (self.gateway, self.slots) if s and s.redis}
        for limit_store in limit_stores.values():
            await limit_store.aclose()
        await self.tools.aclose()
        await self.llm.close()
        if self.fallback is not None:
            await self.fallback.client.close()
        if self.breakers is not None:
            await self.breakers.aclose()
        await self.store.aclose()
        if self.webhook_http is not None:
            await self.webhook_http.aclose()
        if self.usage is not None:
            await self.usage.redis.aclose()
        if self.answer_tokens is not None and (
            self.usage is None or self.answer_tokens.redis is not self.usage.redis
        ):
            await self.answer_tokens.redis.aclose()


def build_deps(
    *,
    redis_url: str,
    openai_base_url: str,
    openai_api_key: str,
    llm_config: LLMConfig,
    http_allowed_hosts: list[str],
    http_max_bytes: int = 256_000,
    http_allowed_hosts_by_tenant: dict[str, list[str]] | None = None,
    corpora: Corpora | None = None,
    webhook_hosts: WebhookHosts | None = None,
    cache_settings: CacheSettings | None = None,
    embedding_model: str = "",
    breaker_settings: BreakerSettings | None = None,
    fallback_base_url: str | None = None,
    fallback_api_key: str | None = None,
    fallback_models: dict[str, str] | None = None,
    llm_max_connections: int = 2000,
) -> Deps:
    """Build the real dependencies: Redis, the OpenAI client (vendor retries off), the tools.

    ``redis_url`` names one Redis (``redis://``, ``rediss://``, ``unix://``) or a Redis Cluster
    (``redis+cluster://host:port[,host:port...]``, ``rediss+cluster://``); every client below
    is built from it by ``keel.activities.redis_client.connect``.

    ``http_allowed_hosts`` are ``host:port``, ``host:*`` or ``host`` entries for ``http_get``;
    ``http_allowed_hosts_by_tenant`` adds entries for one tenant's calls. ``embedding_model``
    turns on hybrid retrieval (empty: BM25 only; ``keel worker`` passes its setting).
    ``llm_max_connections`` bounds the model clients' connection pools (each call in flight
    holds one).
    """
    # The tokenizers the models need, loaded now (a second or two, once per process) rather
    # than inside the first model call, where they would stall the worker's event loop.
    preload({*llm_config.tier_models.values(), *llm_config.prices})
    store = KeelStore.from_url(redis_url)
    # aiohttp under the openai client (its supported ``aiohttp`` extra): about half the CPU and
    # wall time per call of the default httpx transport, measured against the simulator.
    llm = openai.AsyncOpenAI(
        base_url=openai_base_url,
        api_key=openai_api_key,
        max_retries=0,
        http_client=openai.DefaultAioHttpClient(limits=_pool(llm_max_connections)),
    )
    redis = connect(redis_url, socket_connect_timeout=5, socket_timeout=5)
    # Limits have their own client with short timeouts: a slow limit store degrades open in
    # about a second instead of holding every call for five.
    limits = connect(redis_url, socket_connect_timeout=1, socket_timeout=1)
    # The caches share the limits' short timeouts: a slow cache is a miss within a second.
    cache = KeelCache(limits, cache_settings)
    # Hybrid retrieval embeds through the worker's model client and caches vectors and top-k
    # hits per tenant (issue 14); no embedding model means BM25 only.
    embedder = Embedder(llm, embedding_model, cache)
    retriever = Retriever(corpora=corpora, embedder=embedder, cache=cache)
    tools = ToolRegistry.builtin(
        store,
        retriever,
        http_allowed_hosts=http_allowed_hosts,
        http_max_bytes=http_max_bytes,
        http_allowed_by_tenant=http_allowed_hosts_by_tenant,
    )
    # Breakers keep their state in Redis for the whole fleet, through a client of their own
    # with short timeouts: a slow breaker store never holds a call (it falls back to local).
    breakers = Breakers.from_url(redis_url, breaker_settings)
    fallback = None
    if fallback_base_url or fallback_models:
        fallback_client = openai.AsyncOpenAI(
            base_url=fallback_base_url or openai_base_url,
            api_key=fallback_api_key or openai_api_key,
            max_retries=0,
            http_client=openai.DefaultAioHttpClient(limits=_pool(llm_max_connections)),
        )
        fallback = Fallback(
            client=fallback_client,
            models=dict(fallback_models or {}),
            endpoint=endpoint_name(fallback_base_url or openai_base_url),
        )
    # Webhooks go only where the allow-list says: no environment proxy, no redirects.
    webhook_http = httpx.AsyncClient(trust_env=False, follow_redirects=False)
    webhooks = WebhookActivities(redis, webhook_http, webhook_hosts or WebhookHosts())
    return Deps(
        llm=llm,
        llm_config=llm_config,
        store=store,
        tools=tools,
        retriever=retriever,
        usage=UsageLedger(redis),
        webhooks=webhooks,
        webhook_http=webhook_http,
        answer_tokens=AnswerTokens(redis, only_when_watched=True),
        gateway=GatewayLimits(limits),
        slots=JobSlots(limits),
        cache=cache,
        breakers=breakers,
        fallback=fallback,
    )


def deps_from_settings(
    settings: WorkerSettings, *, http_allowed_hosts: list[str] | None = None
) -> Deps:
    """The real dependencies as ``keel worker`` builds them from its settings.

    Args:
        settings: The worker's settings (environment).
        http_allowed_hosts: Overrides the settings' ``http_get`` allow-list.
    """
    return build_deps(
        redis_url=settings.redis_url,
        openai_base_url=settings.openai_base_url,
        openai_api_key=settings.openai_api_key.get_secret_value(),
        llm_config=settings.llm_config(),
        http_allowed_hosts=settings.allowed_hosts()
        if http_allowed_hosts is None
        else http_allowed_hosts,
        http_max_bytes=settings.http_max_bytes,
        http_allowed_hosts_by_tenant=settings.http_allowed_hosts_by_tenant,
        corpora=Corpora.from_env(),
        webhook_hosts=WebhookHosts.from_env(),
        cache_settings=settings.cache_settings(),
        embedding_model=settings.embedding_model,
        breaker_settings=settings.breaker_settings(),
        fallback_base_url=settings.fallback_openai_base_url,
        fallback_api_key=settings.fallback_openai_api_key.get_secret_value()
        if settings.fallback_openai_api_key
        else None,
        fallback_models=settings.fallback_models,
        llm_max_connections=settings.llm_max_connections,
    )


def _pool(connections: int) -> httpx2.Limits:
    """The model client's connection pool: ``connections`` open at once, all kept alive.

    The openai client's own default allows 1,000 and keeps 100 alive: past 1,000 model calls
    in flight the rest wait for a connection, and with hundreds in flight most calls open a
    new one, as only 100 idle connections are kept. ``httpx2`` is the openai client's own
    transport library.
    """
    return httpx2.Limits(max_connections=connections, max_keepalive_connections=connections)


def build_activities(deps: Deps) -> list[Callable[..., Any]]:
    """Every activity a Keel worker registers."""
    llm = LLMActivities(
        deps.llm,
        deps.llm_config,
        deps.tools.specs,
        deps.store,
        deps.usage,
        deps.answer_tokens,
        limits=deps.gateway,
        cache=deps.cache,
        breakers=deps.breakers,
        fallback=deps.fallback,
    )
    tools = ToolActivities(deps.tools, deps.store, deps.gateway, deps.cache, deps.breakers)
    slots = JobSlotActivities(deps.slots)
    retrieval = RetrievalActivities(deps.retriever)
    sessions = SessionActivities(deps.store)
    webhooks = [deps.webhooks.deliver_webhook] if deps.webhooks is not None else []
    return [
        *webhooks,
        slots.acquire_job_slot,
        slots.release_job_slot,
        llm.route_job,
        llm.plan_step,
        llm.draft_answer,
        llm.verify_draft,
        llm.summarize_observations,
        tools.execute_tool,
        retrieval.search_corpus,
        sessions.expire_session_outputs,
        sessions.write_session_snapshot,
    ]
