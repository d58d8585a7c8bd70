"""Economics in whole jobs (issue 14): router-first tiers, escalation, caches, compression.

Real Temporal, real Redis and the simulator's quality model: ``sim-small`` (the fast tier)
drafts a wrong answer to a goal of difficulty 3, ``sim-large`` (the deep tier) a right one, and
``GET /sim/truth/{job}`` says which the job's last draft was, whatever the verifier said.
"""

from __future__ import annotations

import asyncio

import httpx
import redis.asyncio as aioredis
from temporalio.client import Client

from keel.activities.cache import CacheSettings
from keel.activities.llm import LLMConfig
from keel.client import AgentJobs, Budget, JobRequest, JobResult
from keel.workflows import search_attributes as sa
from tests.conftest import unique
from tests.workflows.test_agent_loop import replay_own_history

TIERS = LLMConfig(
    tier_models={"router": "sim-small", "fast": "sim-small", "deep": "sim-large"},
    job_header=True,
)
"""The simulator's models as tiers; the verifier runs on the job's tier (the default map)."""
DEEP_VERIFIER = TIERS.model_copy(
    update={"role_tiers": TIERS.role_tiers | {"verifier": "deep"}}  # type: ignore[operator]
)


async def run(client: Client, make_worker, req: JobRequest, **worker: object) -> JobResult:
    async with make_worker(client, **worker) as w:
        jobs = AgentJobs(client, task_queue=w.task_queue)
        job_id = await jobs.start(req, request_key=unique("econ"))
        return await jobs.result(job_id, timeout=120)


async def truth(sim_url: str, job_id: str) -> dict[str, object]:
    base = sim_url.removesuffix("/v1")
    async with httpx.AsyncClient() as http:
        response = await http.get(f"{base}/sim/truth/{job_id}")
        response.raise_for_status()
        return dict(response.json())


async def test_the_router_picks_the_tier_and_every_view_shows_it(
    client: Client, make_worker, sim_url: str
) -> None:
    req = JobRequest(goal="What is 2 + 3? use calculator [sim: difficulty=1]", tenant=unique("r"))
    async with make_worker(client, llm_config=TIERS) as w:
        jobs = AgentJobs(client, task_queue=w.task_queue)
        job_id = await jobs.start(req, request_key=unique("route"))
        result = await jobs.result(job_id, timeout=60)
        status = await jobs.status(job_id)
        desc = await client.get_workflow_handle(job_id).describe()

    routing = result.routing
    assert routing is not None and routing.source == "router" and routing.reason
    assert routing.tier == routing.started_on and not routing.escalated
    assert status.routing == routing
    attrs = {k.name: v for k, v in desc.typed_search_attributes}  # type: ignore[attr-defined]
    assert attrs[sa.KEEL_TIER.name] == routing.tier
    assert "router" in result.usage.by_tier and routing.tier in result.usage.by_tier
    assert sum(t.cost_usd for t in result.usage.by_tier.values()) == (
        pytest_approx(result.usage.cost_usd)
    )
    assert any(e.kind == "routed" for e in status.events)
    assert (await truth(sim_url, job_id))["correct"] is True


def pytest_approx(value: float) -> object:
    import pytest

    return pytest.approx(value, abs=1e-6)


async def test_a_forced_tier_skips_the_router(client: Client, make_worker) -> None:
    req = JobRequest(goal="What is 4 + 4? [sim: difficulty=1]", tier="deep", tenant=unique("f"))
    result = await run(client, make_worker, req, llm_config=TIERS)
    assert result.routing is not None and result.routing.source == "caller"
    assert result.routing.tier == "deep"
    assert "router" not in result.usage.by_tier and set(result.usage.by_tier) == {"deep"}


async def test_a_rejected_fast_draft_is_refined_on_the_deep_tier(
    client: Client, make_worker, sim_url: str
) -> None:
    # Difficulty 3: the fast tier's model drafts a wrong result; the deep verifier catches it.
    req = JobRequest(
        goal="Work out 17 * 23 with the calculator [sim: difficulty=3]",
        tier="fast",
        tenant=unique("esc"),
        tools=["calculator"],
    )
    async with make_worker(client, llm_config=DEEP_VERIFIER) as w:
        jobs = AgentJobs(client, task_queue=w.task_queue)
        job_id = await jobs.start(req, request_key=unique("esc"))
        result = await jobs.result(job_id, timeout=120)
        status = await jobs.status(job_id)
        desc = await client.get_workflow_handle(job_id).describe()

    assert result.outcome == "completed" and result.verified
    routing = result.routing
    assert routing is not None and routing.escalated
    assert (routing.started_on, routing.tier) == ("fast", "deep")
    assert result.usage.escalations == 1 and result.usage.escalation_usd > 0
    assert set(result.usage.by_tier) >= {"fast", "deep"}
    escalated = [e for e in status.events if e.kind == "escalated"]
    assert len(escalated) == 1 and "fast → deep" in escalated[0].detail
    assert "$" in escalated[0].detail  # what the fast tier had spent
    attrs = {k.name: v for k, v in desc.typed_search_attributes}  # type: ignore[attr-defined]
    assert attrs[sa.KEEL_TIER.name] == "deep"
    # Ground truth, not the verifier's word: the final draft is right.
    assert (await truth(sim_url, job_id))["correct"] is True
    await replay_own_history(client, job_id, record_as="routed_escalated")


async def test_escalation_is_reserved_like_any_call(client: Client, make_worker) -> None:
    # Too little money for the deep tier's drafts: the job ends within its budget.
    req = JobRequest(
        goal="Work out 17 * 29 [sim: difficulty=3]",
        tier="fast",
        tenant=unique("escb"),
        budget=Budget(max_cost_usd=0.0015),
    )
    result = await run(client, make_worker, req, llm_config=DEEP_VERIFIER)
    assert result.outcome == "budget_exhausted", result
    assert result.exhausted_budget == "max_cost_usd"
    assert result.usage.cost_usd <= 0.0015


async def test_invalid_plans_retry_on_the_tier_then_once_a_tier_up(
    client: Client, make_worker
) -> None:
    req = JobRequest(
        goal="What is 3 + 3? [sim: fault=malformed_planx2]", tier="fast", tenant=unique("inv")
    )
    async with make_worker(client, llm_config=TIERS) as w:
        jobs = AgentJobs(client, task_queue=w.task_queue)
        job_id = await jobs.start(req, request_key=unique("inv"))
        result = await jobs.result(job_id, timeout=60)
        status = await jobs.status(job_id)
    assert result.outcome == "completed"
    kinds = [e.kind for e in status.events]
    assert kinds.count("invalid_plan") == 2
    escalated = [e for e in status.events if e.kind == "escalated"]
    assert len(escalated) == 1 and escalated[0].detail.startswith("plan:")
    assert "deep" in result.usage.by_tier  # the third plan call ran a tier up
    assert result.routing is not None and result.routing.tier == "fast"  # the job did not move


async def test_the_response_cache_serves_a_repeat_within_a_tenant_only(
    client: Client, make_worker
) -> None:
    tenant, other = unique("cache"), unique("cache")
    goal = f"What is 12 + 30? use calculator ({unique('g')}) [sim: difficulty=1]"
    near = "  " + goal.upper().replace(" ", "   ") + "\n"  # case and whitespace only
    cache = CacheSettings()
    async with make_worker(client, llm_config=TIERS, cache=cache) as w:
        jobs = AgentJobs(client, task_queue=w.task_queue)

        async def job(goal: str, tenant: str, **extra: object) -> JobResult:
            req = JobRequest(goal=goal, tenant=tenant, tools=["calculator"], **extra)  # type: ignore[arg-type]
            return await jobs.result(await jobs.start(req, request_key=unique("c")), timeout=60)

        first = await job(goal, tenant)
        repeat = await job(near, tenant)
        elsewhere = await job(goal, other)
        # A hit is recorded like a miss: the repeat replays without Redis or the simulator.
        await replay_own_history(client, repeat.job_id, record_as="cache_hits")

    assert first.outcome == repeat.outcome == elsewhere.outcome == "completed"
    assert first.usage.cache_hits.get("response", 0) == 0 and first.usage.cost_usd > 0
    calls = first.usage.cache_misses["response"]
    assert repeat.usage.cache_hits["response"] == calls, repeat.usage
    assert repeat.usage.cache_misses.get("response", 0) == 0
    assert repeat.usage.cost_usd == 0 and repeat.usage.tokens == 0
    assert repeat.usage.saved_usd == first.usage.cost_usd
    assert repeat.usage.cache_hits.get("tool") == 1  # the calculator's result, too
    assert elsewhere.usage.cache_hits == {} and elsewhere.usage.cost_usd > 0


async def test_a_job_that_opts_out_neither_reads_nor_writes_the_cache(
    client: Client, make_worker
) -> None:
    tenant = unique("nocache")
    goal = f"What is 5 + 8? use calculator ({unique('g')})"
    async with make_worker(client, llm_config=TIERS, cache=CacheSettings()) as w:
        jobs = AgentJobs(client, task_queue=w.task_queue)
        reqs = [
            JobRequest(goal=goal, tenant=tenant, tools=["calculator"], cache=False),
            JobRequest(goal=goal, tenant=tenant, tools=["calculator"]),
        ]
        results = []
        for req in reqs:
            job_id = await jobs.start(req, request_key=unique("nc"))
            results.append(await jobs.result(job_id, timeout=60))
    opted_out, after = results
    assert opted_out.usage.cache_hits == opted_out.usage.cache_misses == {}
    assert after.usage.cache_hits == {}  # nothing was written by the first
    assert after.usage.cache_misses["response"] > 0


async def test_a_cache_outage_degrades_to_misses(client: Client, make_worker, redis_url: str):
    # The worker's caches point at a Redis that is not there; jobs run as if uncached.
    from keel.workers.registry import Deps

    tenant = unique("outage")
    async with make_worker(client, llm_config=TIERS, cache=CacheSettings()) as w:
        deps: Deps = w.config()["plugins"][0].deps  # type: ignore[attr-defined]
        assert deps.cache is not None
        # Only the cache's client: the limits share the real one and must keep it.
        deps.cache.redis = aioredis.Redis(port=1, socket_connect_timeout=0.2)
        jobs = AgentJobs(client, task_queue=w.task_queue)
        req = JobRequest(goal="What is 1 + 9?", tenant=tenant, tools=["calculator"])
        results = await asyncio.gather(
            *[jobs.result(await jobs.start(req, request_key=unique("o")), timeout=60)]
        )
    assert results[0].outcome == "completed"
    assert results[0].usage.cache_hits == {} and results[0].usage.cost_usd > 0


async def test_an_attempt_that_timed_out_after_sending_is_charged_its_worst_case(
    client: Client, make_worker
) -> None:
    # The first plan request stalls past the client's 1 s timeout: the provider may have billed
    # it in full, so the retry that succeeds carries that attempt's worst case into usage.
    config = TIERS.model_copy(update={"request_timeout_seconds": 1.0, "max_output_tokens": 900})
    req = JobRequest(
        goal=f"What is 7 + 7? ({unique('g')}) [sim: fault=timeoutx1]",
        tier="fast",
        tenant=unique("late"),
    )
    result = await run(client, make_worker, req, llm_config=config)
    assert result.outcome == "completed"
    # Without the charge a job like this completes in a few hundred tokens.
    assert result.usage.completion_tokens >= 900, result.usage
    assert result.usage.by_tier["fast"].tokens >= 900


async def test_older_observations_are_folded_into_a_bounded_summary(
    client: Client, make_worker
) -> None:
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Pages(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = f"{self.path} ".encode() * 2_000
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Pages)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/page"
    req = JobRequest(
        goal=f"Fetch {url} with http_get [sim: replan, fail_verify=6]",
        tools=["http_get"],
        tier="fast",
        tenant=unique("fold"),
        budget=Budget(max_iterations=8, max_steps=200, max_tool_calls=100),
    )
    try:
        async with make_worker(client, llm_config=TIERS) as w:
            jobs = AgentJobs(client, task_queue=w.task_queue)
            job_id = await jobs.start(req, request_key=unique("fold"))
            result = await jobs.result(job_id, timeout=120)
            status = await jobs.status(job_id)
    finally:
        server.shutdown()
    assert result.outcome == "completed"
    folds = [e for e in status.events if e.kind == "summarized"]
    assert folds, [e.kind for e in status.events]
    # The summarizer runs on the fast tier and is charged like any call.
    assert result.usage.by_tier["fast"].cost_usd > 0
    await replay_own_history(client, job_id, record_as="summarized")
