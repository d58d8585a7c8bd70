"""LLM activities over real HTTP, through the client a worker builds (aiohttp transport).

The simulator runs in its own process; its ``[sim: ...]`` directives inject the failures, so
these tests check that the transport a production worker uses still surfaces every failure as
the classified error Temporal's retry policy acts on.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from keel.activities import errors
from keel.activities.llm import LLMActivities, LLMConfig
from keel.activities.types import PlanInput
from keel.workers.registry import Deps, build_deps


@pytest.fixture
async def deps(redis_url: str, sim_url: str) -> AsyncIterator[Deps]:
    built = build_deps(
        redis_url=redis_url,
        openai_base_url=sim_url,
        openai_api_key="sim-local-key",
        llm_config=LLMConfig(planner_model="sim-small", request_timeout_seconds=0.5),
        http_allowed_hosts=["127.0.0.1"],
    )
    yield built
    await built.aclose()


def plan(deps: Deps, goal: str) -> tuple[LLMActivities, PlanInput]:
    acts = LLMActivities(deps.llm, deps.llm_config, deps.tools.specs, deps.store)
    inp = PlanInput(
        tenant="t", goal=goal, iteration=0, max_output_tokens=512, allowed_tools=["calculator"]
    )
    return acts, inp


async def test_a_plan_comes_back_over_the_workers_transport(deps: Deps) -> None:
    acts, inp = plan(deps, "Compute 2 + 2 with calculator")
    result = await ActivityEnvironment().run(acts.plan_step, inp)
    assert result.plan is not None and result.plan.steps[0].tool == "calculator"
    assert result.usage.prompt_tokens > 0 and result.usage.cost_usd > 0


@pytest.mark.parametrize(
    ("fault", "error_type", "retryable"),
    [
        ("429", errors.LLM_RATE_LIMITED, True),
        ("503", errors.LLM_TRANSIENT, True),
        ("timeout", errors.LLM_TRANSIENT, True),  # stalls past the 0.5 s request timeout
        ("401", errors.LLM_AUTH, False),
        ("400", errors.LLM_REJECTED, False),
    ],
)
async def test_failures_are_classified(
    deps: Deps, fault: str, error_type: str, retryable: bool
) -> None:
    acts, inp = plan(deps, f"Compute 2 + 2 with calculator [sim: fault={fault}]")
    with pytest.raises(ApplicationError) as caught:
        await ActivityEnvironment().run(acts.plan_step, inp)
    assert caught.value.type == error_type
    assert caught.value.non_retryable is not retryable
