"""Worker settings, read once from the environment (pydantic-settings).

Names follow the ecosystem: ``REDIS_URL``, ``OPENAI_BASE_URL``, ``OPENAI_API_KEY``; Temporal's
own connection variables (``TEMPORAL_ADDRESS``, ``TEMPORAL_NAMESPACE``, ``TEMPORAL_API_KEY``,
``TEMPORAL_TLS*``) are read by ``temporalio.envconfig`` in ``client.connect``. Keel's own knobs
are prefixed ``KEEL_``. Secrets are ``SecretStr`` so they never print.
"""

from __future__ import annotations

import json
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from keel.activities.breakers import BreakerSettings
from keel.activities.cache import CacheKind, CacheSettings
from keel.activities.llm import DEFAULT_PRICES, LLMConfig, RoleTier
from keel.activities.tools.http_get import parse_allow_list
from keel.activities.types import Role
from keel.workflows import TASK_QUEUES
from keel.workflows.types import IDENT_RE

SIM_API_KEY = "sim-local-key"
"""The key ``keel dev`` hands the worker when it runs the simulator; refused anywhere else."""


class WorkerSettings(BaseSettings):
    """Everything a worker process needs to build its dependencies."""

    model_config = SettingsConfigDict(env_prefix="KEEL_", extra="ignore", populate_by_name=True)

    task_queues: str = Field(
        default=",".join(TASK_QUEUES.values()),
        validation_alias=AliasChoices("KEEL_TASK_QUEUES", "KEEL_TASK_QUEUE"),
    )
    """Comma-separated task queues this worker polls (default: interactive and batch)."""
    max_concurrent_activities: int = Field(default=2000, gt=0)
    """Activity slots. Thousands, not dozens: nearly every activity is an async model
    call that waits seconds to a minute on the provider while holding its slot and almost no
    CPU, so slots sized for CPU-bound work queue 1,000 waiting jobs behind a few dozen calls
    (issue 16: 300 jobs took 5x one job's time at 64 slots, 1.39x at 2,000)."""
    max_concurrent_workflow_tasks: int = Field(default=32, gt=0)
    """Workflow tasks run at once. They are short and CPU-bound, and a waiting job holds none."""
    max_cached_workflows: int = Field(default=4000, ge=0)
    """Jobs kept in the worker's sticky cache. A job evicted from it replays its whole history
    on its next task (CPU on the worker and a history fetch on the server), so the cache holds
    every job in flight with room over 1,000 (what a cached job costs in memory: the README's
    load figures)."""
    poller_autoscaling: bool = True
    """Let the SDK scale each queue's pollers with its backlog (1 to ``max_pollers``) instead
    of a fixed five, so a burst of finished model calls does not wait for a free poller."""
    max_pollers: int = Field(default=100, ge=2)
    """The most pollers per task queue and task kind when ``poller_autoscaling`` is on."""
    llm_max_connections: int = Field(default=2000, gt=0)
    """Connections the model client may hold open at once, and keep alive between calls. As
    many as activity slots: every model call in flight holds one for its whole length."""
    resource_tuner: bool = False
    """Size slots by CPU and memory use (Temporal's resource-based tuner) instead of counts."""
    target_cpu: float = Field(default=0.8, gt=0, le=1)
    target_memory: float = Field(default=0.8, gt=0, le=1)
    graceful_shutdown_seconds: float = Field(default=30.0, ge=0)
    """On SIGTERM: stop polling, give running activities this long to finish, then exit."""
    identity: str | None = None
    uvloop: bool = True
    """Run the worker on uvloop's event loop (libuv) where it is installed, else asyncio's own.
    A worker's loop carries every model call's socket, heartbeat and Redis round trip, and
    hands workflow tasks to their thread: on uvloop it spends less CPU per event, so workflow
    tasks wait less behind thousands of waiting calls (the README's load figures)."""
    workflow_sandbox: bool = False
    """Run workflow code in Temporal's sandbox. Off by default for throughput: the sandbox
    re-imports the workflow module per run and re-enters itself for every activation and payload
    (about a third of a small job's worker CPU). Determinism is guarded instead by the ruff bans
    in ``workflows/ruff.toml``, the replay tests, and the test suite, whose workers run
    sandboxed. Turn it on for workflow code you have not vetted."""
    metrics_port: int | None = Field(default=None, ge=1, le=65535)
    """Serve Prometheus metrics (SDK runtime metrics and queue backlog gauges) on this port."""
    metrics_poll_seconds: float = Field(default=10.0, gt=0)
    deployment_name: str | None = None
    """Worker Deployment name; with ``build_id`` it turns on worker versioning."""
    build_id: str | None = None
    versioning_behavior: Literal["auto_upgrade", "pinned"] = "auto_upgrade"
    """How running jobs move between builds; see the README's worker-versioning section."""

    redis_url: str = Field(
        default="redis://127.0.0.1:6379/0",
        validation_alias=AliasChoices("REDIS_URL", "KEEL_REDIS_URL"),
    )
    """``redis://``, ``rediss://`` or ``unix://``; a Redis Cluster as ``redis+cluster://`` (or
    ``rediss+cluster://``) with any of its nodes, comma-separated (``activities.redis_client``)."""
    openai_base_url: str = Field(
        default="http://127.0.0.1:8089/v1",
        validation_alias=AliasChoices("OPENAI_BASE_URL", "KEEL_OPENAI_BASE_URL"),
    )
    openai_api_key: SecretStr = Field(
        default=SecretStr(SIM_API_KEY),
        validation_alias=AliasChoices("OPENAI_API_KEY", "KEEL_OPENAI_API_KEY"),
    )
    fallback_openai_base_url: str | None = None
    """A second OpenAI-compatible endpoint calls go to while a model's breaker is open."""
    fallback_openai_api_key: SecretStr | None = None
    """Its API key; by default the main endpoint's."""
    fallback_models: dict[str, str] = Field(default_factory=dict)
    """Stand-in per model while its breaker is open (a model of the same tier), e.g.
    ``{"gpt-4.1-mini": "gpt-4.1-nano"}``; a model not named is asked for by its own name at
    the fallback endpoint. Neither set: an open breaker fails the call, and the job's next
    tier serves it."""
    breaker: bool = True
    """Circuit breakers per model endpoint and model, and per tool, shared in Redis (issue 16)."""
    breaker_window_seconds: float = Field(default=30.0, gt=0)
    breaker_min_calls: int = Field(default=5, ge=1)
    breaker_failure_rate: float = Field(default=0.5, gt=0, le=1)
    breaker_open_seconds: float = Field(default=10.0, gt=0)
    breaker_trial_calls: int = Field(default=3, ge=1)
    model_router: str = "gpt-4.1-nano"
    """The router's model: one cheap call per job picks the tier it starts on."""
    model_fast: str = "gpt-4.1-mini"
    """The fast tier's model."""
    model_deep: str = "gpt-4.1"
    """The deep tier's model."""
    role_tiers: dict[Role, RoleTier] = Field(default_factory=dict)
    """JSON ``{"verifier": "deep", ...}`` over the default role map: ``planner``, ``answerer``
    and ``verifier`` run on the job's tier (``job``), ``router`` on the router, ``summarizer``
    on ``fast``."""
    default_tier: Literal["fast", "deep"] = "deep"
    """The tier of calls recorded before routing existed, and of jobs the router failed."""
    verifier_not_weaker: bool = True
    """The verifier runs on at least the tier that drafted what it judges."""
    model_planner: str | None = None
    """Pins the planner to one model whatever the tier (the role's tier is then only a label)."""
    model_verifier: str | None = None
    model_answerer: str | None = None
    max_output_tokens: int = Field(default=1024, gt=0)
    llm_decoding: dict[str, float | int | str | bool] = Field(default_factory=dict)
    """JSON decoding parameters sent with every model call (``{"temperature": 0}``)."""
    prices_json: str | None = None
    """JSON object ``{"model": [usd_per_mtok_in, usd_per_mtok_out]}`` merged over the defaults."""
    llm_job_header: bool = False
    """Send ``X-Keel-Job-Id`` with model calls (``keel dev`` turns it on for the simulator)."""
    cache: bool = True
    """Keel's caches (responses, tool results, embeddings, retrieval); off: all misses."""
    cache_ttl_seconds: dict[str, float] = Field(default_factory=dict)
    """JSON ``{"response": 86400, "tool": 3600, ...}`` over the default TTLs; 0 turns one off."""
    cache_normalization: Literal["exact", "whitespace", "casefold"] = "casefold"
    """How prompts are normalised into response-cache keys (``activities/cache.py``)."""
    embedding_model: str = "text-embedding-3-small"
    """``KEEL_EMBEDDING_MODEL``: the model that embeds documents and queries for hybrid
    retrieval (``activities/embeddings.py``); empty turns dense retrieval off (BM25 only)."""

    http_allowed_hosts: str = ""
    """Comma-separated ``host:port``, ``host:*`` (any port) or ``host`` (port 80 or 443) entries
    the http_get tool may reach; empty: none. A loopback, private or link-local address is
    reached only through an entry naming its exact port or the IP (``keel dev`` lists the
    simulator's ``127.0.0.1:port``)."""
    http_allowed_hosts_by_tenant: dict[str, list[str]] = Field(default_factory=dict)
    """JSON ``{"tenant": ["host:port", ...]}``: entries added for that tenant's calls only."""
    http_max_bytes: int = Field(default=256_000, gt=0)

    @model_validator(mode="after")
    def _refuse_sim_key_remotely(self) -> WorkerSettings:
        local = any(h in self.openai_base_url for h in ("127.0.0.1", "localhost", "[::1]"))
        if self.openai_api_key.get_secret_value() == SIM_API_KEY and not local:
            raise ValueError(
                "OPENAI_API_KEY is unset but OPENAI_BASE_URL points at a remote endpoint; "
                "set OPENAI_API_KEY (the simulator's placeholder key is for local use only)"
            )
        return self

    @model_validator(mode="after")
    def _check_http_allow_lists(self) -> WorkerSettings:
        # Parsed here so a malformed entry stops the worker at start, naming the entry.
        parse_allow_list(self.allowed_hosts())
        for tenant, entries in self.http_allowed_hosts_by_tenant.items():
            if not IDENT_RE.match(tenant):
                raise ValueError(f"KEEL_HTTP_ALLOWED_HOSTS_BY_TENANT: {tenant!r} is not a tenant")
            parse_allow_list(entries)
        return self

    def queues(self) -> list[str]:
        """The task queues as a list."""
        return [q.strip() for q in self.task_queues.split(",") if q.strip()]

    def allowed_hosts(self) -> list[str]:
        """The http_get allow-list as a list."""
        return [h.strip() for h in self.http_allowed_hosts.split(",") if h.strip()]

    def llm_config(self) -> LLMConfig:
        """The LLM activities' configuration: models per role and the price table."""
        prices = dict(DEFAULT_PRICES)
        if self.prices_json:
            prices |= {
                k: (float(v[0]), float(v[1])) for k, v in json.loads(self.prices_json).items()
            }
        return LLMConfig(
            tier_models={
                "router": self.model_router,
                "fast": self.model_fast,
                "deep": self.model_deep,
            },
            role_tiers=LLMConfig().role_tiers | self.role_tiers,
            default_tier=self.default_tier,
            verifier_not_weaker=self.verifier_not_weaker,
            planner_model=self.model_planner,
            verifier_model=self.model_verifier,
            answerer_model=self.model_answerer,
            max_output_tokens=self.max_output_tokens,
            prices=prices,
            job_header=self.llm_job_header,
            decoding=self.llm_decoding,
        )

    def breaker_settings(self) -> BreakerSettings:
        """The circuit breakers' thresholds and timings."""
        return BreakerSettings(
            enabled=self.breaker,
            window_seconds=self.breaker_window_seconds,
            min_calls=self.breaker_min_calls,
            failure_rate=self.breaker_failure_rate,
            open_seconds=self.breaker_open_seconds,
            trial_calls=self.breaker_trial_calls,
        )

    def cache_settings(self) -> CacheSettings:
        """The caches' configuration."""
        defaults = CacheSettings()
        ttls = defaults.ttl_seconds | {CacheKind(k): v for k, v in self.cache_ttl_seconds.items()}
        return CacheSettings(
            enabled=self.cache, ttl_seconds=ttls, normalization=self.cache_normalization
        )
