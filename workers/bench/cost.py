"""``keel bench cost``: what Keel's economics save, against an honest baseline, on one workload.

One seeded workload (``workers.bench.cost_workload``) runs several times in one invocation, the
same jobs in the same order, each run on its own worker and its own tenant names (the run's
name and a per-invocation tag are in every tenant, so no run is served another run's cache
entries, in this invocation or an earlier one sharing the same Redis):

- ``baseline``: every job forced onto the deep tier (no router, and so no escalation), the
  worker's caches off and context compression off;
- ``keel``: Keel's defaults: the router picks the tier, a rejected fast draft escalates, every
  cache is on, compression is on;
- the ablations, each the ``keel`` run with one lever removed (``no-router``,
  ``no-response-cache``, ``no-tool-cache``, ``no-compression``), and ``verifier-job`` (the
  verifier on the job's tier instead of the deep one), the figures that chose that default.
  Escalation cannot be switched off without changing the workflow, so it is credited by
  accounting instead (``workers.bench.cost_report``).

Each job is scored twice: ``verified`` is what Keel's verifier said; ``correct`` is ground truth,
the simulator's ``POST /sim/grade`` of the job's final answer against its goal (a job served
wholly from the caches never reaches the simulator, so its per-job truth record would be
missing; grading the answer text works for every job). The figures and the tables are
``workers.bench.cost_report``'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal
from uuid import uuid4

import httpx
from rich.progress import Progress
from temporalio.client import Client

from keel.activities.cache import CacheKind, CacheSettings
from keel.activities.llm import LLMConfig
from keel.client.jobs import AgentJobs
from keel.workers.bench import cost_report
from keel.workers.bench.config import Servers
from keel.workers.bench.cost_workload import (
    PAGE_BYTES,
    Job,
    corpus_documents,
    mix,
    service_names,
    workload,
)
from keel.workers.bench.stack import text_server
from keel.workers.main import build_worker
from keel.workers.plugin import KeelPlugin
from keel.workers.registry import build_deps
from keel.workers.settings import SIM_API_KEY, WorkerSettings
from keel.workflows.types import JobRequest, JobResult

__all__ = ["CostConfig", "JobRecord", "RunSpec", "measure_cost", "run_specs"]

TIER_MODELS = {"router": "sim-small", "fast": "sim-small", "deep": "sim-large"}
"""The simulator's models as Keel's tiers: the small one routes and drafts fast, the large one
drafts deep, priced as ``activities.llm.DEFAULT_PRICES`` says (about 16x apart)."""
EMBEDDING_MODEL = str(WorkerSettings.model_fields["embedding_model"].default)
"""The worker's default embedding model, so retrieval is hybrid as ``keel worker`` runs it."""
PROBE_PER_KIND = 3
"""Goals of each kind (but ``long``) the speedup probe times alone, cold and then cached."""


@dataclass(frozen=True)
class CostConfig:
    """What ``keel bench cost`` was asked to run (the command's options, validated)."""

    jobs: int = 300
    tenants: int = 5
    seed: int = 0
    sim_latency_ms: float = 150.0
    """Delay the simulator adds to every model and embeddings call."""
    concurrency: int = 16
    """Jobs in flight at most; the next starts as one ends."""
    ablations: bool = True
    json_path: Path | None = None


@dataclass(frozen=True)
class RunSpec:
    """One run of the workload: what its worker and its jobs are set to."""

    name: str
    about: str
    tier: Literal["auto", "deep"] = "auto"
    """Every job's ``JobRequest.tier``: ``auto`` lets the router pick, ``deep`` forces it."""
    cache: CacheSettings = field(default_factory=CacheSettings)
    compress: bool = True
    verifier: Literal["job", "deep"] | None = None
    """The verifier's tier in the worker's role map; None: Keel's default (``deep``)."""
    lever: str | None = None
    """The lever this run removes from Keel's defaults (an ablation), if any."""

    def llm_config(self) -> LLMConfig:
        """The worker's model configuration: the simulator's tiers and Keel's role map."""
        roles = LLMConfig().role_tiers
        if self.verifier is not None:
            roles = roles | {"verifier": self.verifier}
        return LLMConfig(tier_models=TIER_MODELS, role_tiers=roles, job_header=True)

    def settings(self) -> dict[str, Any]:
        """The run's settings as written to ``--json``."""
        return {
            "about": self.about,
            "tier": self.tier,
            "cache_enabled": self.cache.enabled,
            "cache_ttl_seconds": {k.value: v for k, v in self.cache.ttl_seconds.items()},
            "cache_normalization": self.cache.normalization,
            "compress": self.compress,
            "role_tiers": dict(self.llm_config().role_tiers),
            "verifier_not_weaker": self.llm_config().verifier_not_weaker,
            "lever": self.lever,
        }


def _without(*kinds: CacheKind) -> CacheSettings:
    ttls = CacheSettings().ttl_seconds | dict.fromkeys(kinds, 0.0)
    return CacheSettings(ttl_seconds=ttls)


def run_specs(ablations: bool) -> list[RunSpec]:
    """The runs of one invocation, in order: the baseline, Keel, then the ablations."""
    runs = [
        RunSpec(
            "baseline",
            "always deep: no router, no escalation, caches off, compression off",
            tier="deep",
            cache=CacheSettings(enabled=False),
            compress=False,
        ),
        RunSpec("keel", "Keel's defaults: router, escalation, caches, compression"),
    ]
    if ablations:
        runs += [
            RunSpec("no-router", "keel, every job forced deep", tier="deep", lever="router"),
            RunSpec(
                "no-response-cache",
                "keel, response cache off",
                cache=_without(CacheKind.RESPONSE),
                lever="response cache",
            ),
            RunSpec(
                "no-tool-cache",
                "keel, tool-result and retrieval caches off",
                cache=_without(CacheKind.TOOL, CacheKind.RETRIEVAL),
                lever="tool and retrieval caches",
            ),
            RunSpec("no-compression", "keel, compression off", compress=False, lever="compression"),
            RunSpec("verifier-job", "keel, the verifier on the job's tier", verifier="job"),
        ]
    return runs


@dataclass
class JobRecord:
    """What one job of one run did, as the benchmark measured and graded it."""

    index: int
    tenant: int
    goal_id: str
    kind: str
    repeat: str
    normalized: str
    distinct_calls: int
    job_id: str = ""
    outcome: str = ""
    verified: bool = False
    correct: bool = False
    difficulty: int | None = None
    submitted_s: float = 0.0
    """Seconds from the run's start to this job's submission."""
    ended_s: float = 0.0
    latency_s: float = 0.0
    """Submit to result."""
    cost_usd: float = 0.0
    tokens: int = 0
    tool_calls: int = 0
    by_tier_usd: dict[str, float] = field(default_factory=dict)
    by_tier_tokens: dict[str, int] = field(default_factory=dict)
    cache_hits: dict[str, int] = field(default_factory=dict)
    cache_misses: dict[str, int] = field(default_factory=dict)
    saved_usd: float = 0.0
    saved_tokens: int = 0
    escalations: int = 0
    escalation_usd: float = 0.0
    started_on: str | None = None
    final_tier: str | None = None
    route_source: str | None = None
    escalated: bool = False

    def absorb(self, result: JobResult) -> None:
        """Copy the figures of the job's result."""
        usage, routing = result.usage, result.routing
        self.job_id, self.outcome, self.verified = result.job_id, result.outcome, result.verified
        self.cost_usd, self.tokens, self.tool_calls = usage.cost_usd, usage.tokens, usage.tool_calls
        self.by_tier_usd = {t: u.cost_usd for t, u in usage.by_tier.items()}
        self.by_tier_tokens = {t: u.tokens for t, u in usage.by_tier.items()}
        self.cache_hits, self.cache_misses = dict(usage.cache_hits), dict(usage.cache_misses)
        self.saved_usd, self.saved_tokens = usage.saved_usd, usage.saved_tokens
        self.escalations, self.escalation_usd = usage.escalations, usage.escalation_usd
        if routing is not None:
            self.started_on, self.final_tier = routing.started_on, routing.tier
            self.route_source, self.escalated = routing.source, routing.escalated


def _tenant(index: int, run: str, tag: str) -> str:
    """A tenant name of one run of one invocation (an identifier of at most 64 characters)."""
    return f"t{index}-{run}-{tag}"


async def measure_cost(
    client: Client,
    servers: Servers,
    config: CostConfig,
    progress: Progress,
    work_dir: Path,
    *,
    on_run: Callable[[str, dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run the workload once per ``RunSpec`` and return every figure and setting.

    Args:
        client: A client of the Temporal server the runs' workers poll.
        servers: The Redis and the simulator (started with ``config.sim_latency_ms``) to use.
        config: Jobs, tenants, seed, concurrency, ablations.
        progress: Where each run shows its jobs done.
        work_dir: Where the generated corpus is written.
        on_run: Called with each run's name and figures as it ends (to print its table).

    Returns:
        ``workload`` (settings and mix), ``runs`` (figures per run), ``comparison`` (the
        targets), ``ablations`` (the saving credited to each lever) and ``jobs`` (every job's
        record, per run).
    """
    corpus = work_dir / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    documents = corpus_documents(config.seed)
    for name, text in documents.items():
        (corpus / name).write_text(text)
    tag = uuid4().hex[:6]
    report: dict[str, Any] = {"tag": tag, "runs": {}, "jobs": {}}
    with text_server(PAGE_BYTES) as page_url:
        base_url = page_url.rsplit("/", 1)[0]
        load = workload(
            config.jobs, config.tenants, config.seed, base_url, service_names(documents)
        )
        report["workload"] = load.settings | {"mix": mix(load.jobs), "page_base_url": base_url}
        specs = run_specs(config.ablations)
        report["run_settings"] = {spec.name: spec.settings() for spec in specs}
        for spec in specs:
            records = await _run(client, servers, config, spec, load.jobs, corpus, tag, progress)
            figures = cost_report.run_figures(records)
            report["runs"][spec.name] = figures
            report["jobs"][spec.name] = [asdict(r) for r in records]
            if on_run is not None:
                on_run(spec.name, figures)
        keel = next(spec for spec in specs if spec.name == "keel")
        probe = await _probe_speedup(client, servers, keel, load.jobs, corpus, tag, progress)
    report["speedup_probe"] = cost_report.probe_figures(probe)
    report["comparison"] = cost_report.comparison(
        report["runs"], report["jobs"], report["speedup_probe"]
    )
    report["ablations"] = cost_report.ablations(report["runs"], report["jobs"], specs)
    return report


async def _run(
    client: Client,
    servers: Servers,
    config: CostConfig,
    spec: RunSpec,
    jobs: list[Job],
    corpus: Path,
    tag: str,
    progress: Progress,
) -> list[JobRecord]:
    """Every job of the workload on a worker set up as ``spec`` says, ``concurrency`` at once."""
    queue = f"bench-cost-{spec.name}-{tag}"
    task = progress.add_task(f"{spec.name}: {len(jobs)} jobs", total=len(jobs))
    records: list[JobRecord] = []
    order = itertools.count()
    facade = AgentJobs(client, task_queue=queue)
    grader = httpx.AsyncClient(base_url=servers.sim_url.removesuffix("/v1"), timeout=30)
    start = time.perf_counter()

    async def lane() -> None:
        while (i := next(order)) < len(jobs):
            record = await _one(facade, grader, spec, jobs[i], corpus, tag, start)
            records.append(record)
            progress.advance(task)

    try:
        async with _worker(client, servers, spec, queue):
            await asyncio.gather(*(lane() for _ in range(min(config.concurrency, len(jobs)))))
    finally:
        await grader.aclose()
    return sorted(records, key=lambda r: r.index)


async def _probe_speedup(
    client: Client,
    servers: Servers,
    keel: RunSpec,
    jobs: list[Job],
    corpus: Path,
    tag: str,
    progress: Progress,
) -> list[dict[str, Any]]:
    """Time goals one at a time, on an idle worker: a first run, then an exact repeat.

    Inside the workload's runs every latency includes waiting for the machine (16 jobs in
    flight share two cores here), and a repeat runs at another moment of the run than the
    first, so their ratio measures the load as much as the cache. This probe measures the claim
    itself: up to PROBE_PER_KIND goals of each kind but ``long`` (whose repeats are never served
    wholly from the caches, see the report), each run cold and then again, alone, as tenants of
    their own. One goal of each kind runs first, untimed, as yet another tenant: a new worker's
    first jobs also pay for loading tokenizers and indexing the corpus, which is the worker's
    cost, not the goal's.
    """
    picks: list[Job] = []
    for job in jobs:
        same_kind = sum(p.goal.kind == job.goal.kind for p in picks)
        if job.repeat == "first" and job.goal.kind != "long" and same_kind < PROBE_PER_KIND:
            picks.append(job)
    spec = replace(keel, name="probe")
    queue = f"bench-cost-probe-{tag}"
    task = progress.add_task(f"speedup probe: {len(picks)} goals, one at a time", total=len(picks))
    facade = AgentJobs(client, task_queue=queue)
    grader = httpx.AsyncClient(base_url=servers.sim_url.removesuffix("/v1"), timeout=30)
    pairs: list[dict[str, Any]] = []
    start = time.perf_counter()
    try:
        async with _worker(client, servers, spec, queue):
            warm_up = replace(spec, name="probe-warm-up")
            for kind in dict.fromkeys(p.goal.kind for p in picks):
                first = next(p for p in picks if p.goal.kind == kind)
                await _one(facade, grader, warm_up, first, corpus, tag, start)
            for job in picks:
                cold = await _one(facade, grader, spec, job, corpus, tag, start)
                again = replace(job, index=job.index + len(jobs), repeat="exact")
                warm = await _one(facade, grader, spec, again, corpus, tag, start)
                pairs.append(
                    {"goal_id": job.goal.goal_id, "kind": job.goal.kind}
                    | {"cold": asdict(cold), "warm": asdict(warm)}
                )
                progress.advance(task)
    finally:
        await grader.aclose()
    return pairs


async def _one(
    facade: AgentJobs,
    grader: httpx.AsyncClient,
    spec: RunSpec,
    job: Job,
    corpus: Path,
    tag: str,
    start: float,
) -> JobRecord:
    """Run one job to its end, time it, and grade its answer against ground truth."""
    goal = job.goal
    record = JobRecord(
        index=job.index,
        tenant=job.tenant,
        goal_id=goal.goal_id,
        kind=goal.kind,
        repeat=job.repeat,
        normalized=job.normalized(),
        distinct_calls=goal.distinct_calls,
    )
    request = JobRequest(
        goal=job.text,
        tenant=_tenant(job.tenant, spec.name, tag),
        user="bench",
        tools=list(goal.tools),
        docs_dir=str(corpus) if goal.uses_docs else None,
        tier=spec.tier,
    )
    submitted = time.perf_counter()
    record.submitted_s = submitted - start
    try:
        job_id = await facade.start(
            request, request_key=f"j{job.index:05d}", compress=spec.compress
        )
        # No timeout: each job's own budget ends it (a timeout would only add a deadline to
        # the same long poll).
        result = await facade.final_result(job_id)
    except Exception as err:  # noqa: BLE001 - a broken job is a figure (its outcome), not a crash
        record.outcome = f"error: {type(err).__name__}"
        record.ended_s = time.perf_counter() - start
        record.latency_s = record.ended_s - record.submitted_s
        return record
    ended = time.perf_counter()
    record.ended_s, record.latency_s = ended - start, ended - submitted
    record.absorb(result)
    response = await grader.post(
        "/sim/grade", json={"goal": job.text, "answer": result.answer or ""}
    )
    response.raise_for_status()
    grade = response.json()
    record.correct, record.difficulty = bool(grade["correct"]), int(grade["difficulty"])
    return record


@contextlib.asynccontextmanager
async def _worker(
    client: Client, servers: Servers, spec: RunSpec, queue: str
) -> AsyncIterator[None]:
    """A Keel worker in this process for one run, tuned as ``keel worker`` is by default."""
    overrides = {  # keyed as the environment spells them (the settings' validation aliases)
        "REDIS_URL": servers.redis_url,
        "OPENAI_BASE_URL": servers.sim_url,
        "OPENAI_API_KEY": SIM_API_KEY,
    }
    settings = WorkerSettings(**overrides)  # type: ignore[arg-type]
    deps = build_deps(
        redis_url=servers.redis_url,
        openai_base_url=servers.sim_url,
        openai_api_key=SIM_API_KEY,
        llm_config=spec.llm_config(),
        # The page server of ``long`` goals listens on a free loopback port.
        http_allowed_hosts=["127.0.0.1:*"],
        cache_settings=spec.cache,
        embedding_model=EMBEDDING_MODEL,
    )
    try:
        await deps.store.ping()
        async with build_worker(client, settings, queue, plugin=KeelPlugin(deps)):
            yield
    finally:
        await deps.aclose()
