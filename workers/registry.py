"""What a Keel worker runs: workflows, activities built from dependencies, interceptors.

Tests build workers from these same names, so a worker in a test runs exactly what a
production worker runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import redis.asyncio as aioredis
from temporalio.worker import Interceptor

from keel.activities._backoff import JitteredBackoff
from keel.activities.corpora import Corpora
from keel.activities.llm import LLMActivities, LLMConfig
from keel.activities.retrieval import RetrievalActivities, Retriever
from keel.activities.store import KeelStore
from keel.activities.tools import ToolActivities, ToolRegistry
from keel.activities.usage import UsageLedger
from keel.activities.webhook_hosts import WebhookHosts
from keel.activities.webhooks import WebhookActivities
from keel.workers.settings import WorkerSettings
from keel.workflows.agent_loop import AgentLoopWorkflow

WORKFLOWS: list[type] = [AgentLoopWorkflow]
INTERCEPTORS: list[Interceptor] = [JitteredBackoff()]
"""Every retryable activity failure waits a jittered interval before its next attempt."""


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

    async def aclose(self) -> None:
        """Close the network clients."""
        await self.tools.aclose()
        await self.llm.close()
        await self.store.aclose()
        if self.webhook_http is not None:
            await self.webhook_http.aclose()
        if self.usage is not None:
            await self.usage.redis.aclose()


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
) -> Deps:
    """Build the real dependencies: Redis, the OpenAI client (vendor retries off), the tools.

    ``http_allowed_hosts`` are ``host:port``, ``host:*`` or ``host`` entries for ``http_get``;
    ``http_allowed_hosts_by_tenant`` adds entries for one tenant's calls.
    """
    store = KeelStore.from_url(redis_url)
    retriever = Retriever(corpora=corpora)
    tools = ToolRegistry.builtin(
        store,
        retriever,
        http_allowed_hosts=http_allowed_hosts,
        http_max_bytes=http_max_bytes,
        http_allowed_by_tenant=http_allowed_hosts_by_tenant,
    )
    # aiohttp under the openai client (its supported ``aiohttp`` extra): about half the CPU and
    # wall time per call of the default httpx transport, measured against the simulator.
    llm = openai.AsyncOpenAI(
        base_url=openai_base_url,
        api_key=openai_api_key,
        max_retries=0,
        http_client=openai.DefaultAioHttpClient(),
    )
    redis = aioredis.Redis.from_url(redis_url, socket_connect_timeout=5, socket_timeout=5)
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
    )


def build_activities(deps: Deps) -> list[Callable[..., Any]]:
    """Every activity a Keel worker registers."""
    llm = LLMActivities(deps.llm, deps.llm_config, deps.tools.specs, deps.store, deps.usage)
    tools = ToolActivities(deps.tools, deps.store)
    retrieval = RetrievalActivities(deps.retriever)
    webhooks = [deps.webhooks.deliver_webhook] if deps.webhooks is not None else []
    return [
        *webhooks,
        llm.plan_step,
        llm.draft_answer,
        llm.verify_draft,
        tools.execute_tool,
        retrieval.search_corpus,
    ]
