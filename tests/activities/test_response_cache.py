"""The response cache in the LLM activities: what hits, what never does, and outages.

Real Redis and the simulator over HTTP. A hit is proven by the simulator not seeing the call
(its ``/_sim/stats`` counters) and by the result's ``cached`` flag and zero usage; each key part
is varied alone, and each variation must miss.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from temporalio.testing import ActivityEnvironment

from keel.activities import prompts
from keel.activities.cache import CacheSettings, KeelCache
from keel.activities.llm import LLMActivities, LLMConfig
from keel.activities.types import AnswerInput, PlanInput, VerifyInput
from keel.workers.registry import Deps, build_deps
from tests.conftest import unique

CONFIG = LLMConfig(tier_models={"router": "sim-small", "fast": "sim-small", "deep": "sim-large"})


@pytest.fixture
async def deps(redis_url: str, sim_url: str) -> AsyncIterator[Deps]:
    built = build_deps(
        redis_url=redis_url,
        openai_base_url=sim_url,
        openai_api_key="sim-local-key",
        llm_config=CONFIG,
        http_allowed_hosts=["127.0.0.1"],
    )
    yield built
    await built.aclose()


def acts(
    deps: Deps, config: LLMConfig = CONFIG, settings: CacheSettings | None = None
) -> LLMActivities:
    cache = KeelCache(deps.cache.redis if deps.cache else None, settings or CacheSettings())
    return LLMActivities(deps.llm, config, deps.tools.specs, deps.store, cache=cache)


async def sim_requests(sim_url: str) -> int:
    async with httpx.AsyncClient() as http:
        stats = (await http.get(sim_url.removesuffix("/v1") + "/_sim/stats")).json()
    return int(sum(stats["requests"].values()))


def plan_input(goal: str, **fields: Any) -> PlanInput:
    base: dict[str, Any] = {
        "tenant": "acme",
        "goal": goal,
        "iteration": 0,
        "max_output_tokens": 512,
        "allowed_tools": ["calculator"],
        "tier": "fast",
    }
    return PlanInput(**(base | fields))


async def plan_twice(
    sim_url: str, first: tuple[LLMActivities, PlanInput], second: tuple[LLMActivities, PlanInput]
) -> tuple[bool | None, int]:
    """Run two plan calls; return the second's ``cached`` and how many reached the simulator."""
    before = await sim_requests(sim_url)
    one = await ActivityEnvironment().run(first[0].plan_step, first[1])
    assert one.cached is False and one.usage.cost_usd > 0
    two = await ActivityEnvironment().run(second[0].plan_step, second[1])
    return two.cached, await sim_requests(sim_url) - before


async def test_a_repeat_is_served_from_the_cache(deps: Deps, sim_url: str) -> None:
    a = acts(deps)
    goal = f"Compute 2 + 2 with calculator {unique()}"
    before = await sim_requests(sim_url)
    first = await ActivityEnvironment().run(a.plan_step, plan_input(goal))
    second = await ActivityEnvironment().run(a.plan_step, plan_input(goal))
    assert await sim_requests(sim_url) - before == 1
    assert second.cached is True and second.plan == first.plan
    assert second.usage.total_tokens == 0 and second.usage.cost_usd == 0
    assert second.saved is not None and second.saved.cost_usd == first.usage.cost_usd
    assert second.model == first.model == "sim-small" and second.tier == "fast"


async def test_case_and_whitespace_are_normalised_but_not_numbers(deps: Deps, sim_url: str) -> None:
    a = acts(deps)
    goal = f"Compute 2 + 3 with calculator {unique()}"
    near = "  " + goal.upper().replace(" ", " \t ") + "\n"
    assert await plan_twice(sim_url, (a, plan_input(goal)), (a, plan_input(near))) == (True, 1)
    swapped = goal.replace("2 + 3", "3 + 2")
    assert await plan_twice(sim_url, (a, plan_input(goal + "!")), (a, plan_input(swapped))) == (
        False,
        2,
    )
    # Where case carries meaning, a worker keeps it.
    exact = acts(deps, settings=CacheSettings(normalization="whitespace"))
    goal = f"Compute 4 + 4 with calculator {unique()}"
    cased = (exact, plan_input(goal.upper()))
    assert await plan_twice(sim_url, (exact, plan_input(goal)), cased) == (False, 2)


@pytest.mark.parametrize(
    "vary",
    ["tenant", "tier", "template", "decoding", "tools", "critique", "iteration"],
)
async def test_no_hit_across_anything_that_changes_the_output(
    deps: Deps, sim_url: str, vary: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    goal = f"Compute 6 * 7 with calculator {unique()}"
    first = (acts(deps), plan_input(goal))
    second_acts, second_inp = acts(deps), plan_input(goal)
    if vary == "tenant":
        second_inp = plan_input(goal, tenant="other")
    elif vary == "tier":
        second_inp = plan_input(goal, tier="deep")  # another model
    elif vary == "decoding":
        second_acts = acts(deps, CONFIG.model_copy(update={"decoding": {"temperature": 0.7}}))
    elif vary == "tools":
        second_inp = plan_input(goal, allowed_tools=["calculator", "write_note"])
    elif vary == "critique":
        second_inp = plan_input(goal, critique="Use more detail.")
    elif vary == "iteration":
        second_inp = plan_input(goal, iteration=1)
    cached, reached = await plan_twice_with(
        sim_url, first, (second_acts, second_inp), monkeypatch if vary == "template" else None
    )
    assert (cached, reached) == (False, 2)


async def plan_twice_with(
    sim_url: str,
    first: tuple[LLMActivities, PlanInput],
    second: tuple[LLMActivities, PlanInput],
    monkeypatch: pytest.MonkeyPatch | None,
) -> tuple[bool | None, int]:
    """``plan_twice``, changing the planner's template between the calls when asked."""
    before = await sim_requests(sim_url)
    await ActivityEnvironment().run(first[0].plan_step, first[1])
    if monkeypatch is not None:
        old = prompts.PROMPTS["keel_plan"]
        changed = prompts.PromptTemplate(old.name, old.text + "\nPrefer fewer steps.")
        assert changed.version != old.version
        monkeypatch.setitem(prompts.PROMPTS, "keel_plan", changed)
    two = await ActivityEnvironment().run(second[0].plan_step, second[1])
    return two.cached, await sim_requests(sim_url) - before


async def test_a_job_that_opts_out_neither_reads_nor_writes(deps: Deps, sim_url: str) -> None:
    a = acts(deps)
    goal = f"Compute 9 - 1 with calculator {unique()}"
    off = await ActivityEnvironment().run(a.plan_step, plan_input(goal, cache=False))
    assert off.cached is None
    assert await plan_twice(sim_url, (a, plan_input(goal)), (a, plan_input(goal))) == (True, 1)


async def test_truncated_and_invalid_replies_are_never_stored(deps: Deps, sim_url: str) -> None:
    a = acts(deps)
    # Cut at max_tokens: finish reason "length", so not stored.
    goal = f"Compute 8 + 8 with calculator {unique()}"
    short = plan_input(goal, max_output_tokens=8)
    first = await ActivityEnvironment().run(a.plan_step, short)
    assert first.plan is None and first.cached is False
    again = await ActivityEnvironment().run(a.plan_step, short)
    assert again.cached is False
    # Output that fails its schema is not stored either (the retry would get it back).
    bad = plan_input(f"Compute 1 + 8 {unique()} [sim: fault=malformed_plan]")
    assert (await ActivityEnvironment().run(a.plan_step, bad)).invalid_reason
    assert (await ActivityEnvironment().run(a.plan_step, bad)).cached is False


async def test_a_reply_larger_than_the_cap_is_not_served(deps: Deps, sim_url: str) -> None:
    a = acts(deps)
    goal = f"Answer with everything you know {unique()}"
    inp = AnswerInput(tenant="acme", goal=goal, iteration=0, max_output_tokens=512, tier="fast")
    first = await ActivityEnvironment().run(a.draft_answer, inp)
    assert first.usage.completion_tokens > 10
    tight = inp.model_copy(update={"max_output_tokens": first.usage.completion_tokens - 1})
    assert (await ActivityEnvironment().run(a.draft_answer, tight)).cached is False
    assert (await ActivityEnvironment().run(a.draft_answer, inp)).cached is True


async def test_the_verifier_is_cached_per_draft(deps: Deps, sim_url: str) -> None:
    a = acts(deps)
    goal = f"Say hello {unique()}"
    inp = VerifyInput(tenant="acme", goal=goal, iteration=0, draft="Hello.", tier="fast")
    await ActivityEnvironment().run(a.verify_draft, inp)
    other = inp.model_copy(update={"draft": "Goodbye."})
    assert (await ActivityEnvironment().run(a.verify_draft, other)).cached is False
    assert (await ActivityEnvironment().run(a.verify_draft, inp)).cached is True


async def test_a_cache_outage_is_a_miss_and_the_call_still_succeeds(
    deps: Deps, sim_url: str
) -> None:
    down = aioredis.Redis(port=1, socket_connect_timeout=0.2, socket_timeout=0.2)
    cache = KeelCache(down, CacheSettings())
    a = LLMActivities(deps.llm, CONFIG, deps.tools.specs, deps.store, cache=cache)
    goal = f"Compute 3 * 3 with calculator {unique()}"
    for _ in range(2):
        result = await ActivityEnvironment().run(a.plan_step, plan_input(goal))
        assert result.plan is not None and result.cached is False and result.usage.cost_usd > 0
    # One failed lookup, then misses without trying Redis for OUTAGE_SECONDS.
    assert cache.stats.errors["response"] == 1 and cache.stats.misses["response"] >= 1
    await down.aclose()


async def test_two_jobs_whose_stored_outputs_match_share_a_reply(deps: Deps, sim_url: str) -> None:
    """A stored output reaches the prompt by its text, never by its ref (which names the job),
    so a repeat in another job of the same tenant hits, and the model never sees a job ID."""
    from keel.activities.types import Observation

    a = acts(deps)
    text = f"page {unique()} " * 400
    goal = f"Summarise the page {unique()}"
    results = []
    for job in ("agent-job-acme:one", "agent-job-acme:two"):
        ref = await deps.store.put_blob("acme", f"{job}:0:s1", text)
        obs = Observation(step_id="s1", name="http_get", ref=ref, size=len(text))
        inp = AnswerInput(
            tenant="acme", goal=goal, iteration=0, max_output_tokens=512, observations=[obs]
        )
        env = ActivityEnvironment()
        env.info = env.info.__class__(**(env.info.__dict__ | {"workflow_id": job}))
        results.append(await env.run(a.draft_answer, inp))
    assert results[0].cached is False and results[1].cached is True
    assert "agent-job-acme" not in results[0].answer
