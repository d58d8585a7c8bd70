"""One rendering of budget use, shared by the workflow's UI details, the client and the CLI."""

from __future__ import annotations

from keel.client._starting import static_details
from keel.workflows._state import details_markdown
from keel.workflows.budget_text import budget_text, budget_use
from keel.workflows.types import Budget, JobRequest, JobUsage, LoopCounters, LoopState

BUDGET = Budget(max_tokens=10_000, max_cost_usd=0.5, max_iterations=3)
USAGE = JobUsage(
    tokens=1_234, prompt_tokens=1_000, completion_tokens=234, cost_usd=0.0123, steps=7, tool_calls=3
)


def test_usage_against_limits() -> None:
    assert budget_text(BUDGET, USAGE, iteration=1) == (
        "iterations 2/3 · steps 7/40 · tool calls 3/20 · tokens 1,234/10,000 · cost $0.0123/$0.5"
    )


def test_limits_alone() -> None:
    assert budget_text(BUDGET, sep="; ") == (
        "iterations 3; steps 40; tool calls 20; tokens 10,000; cost $0.5; seconds 1800; questions 2"
    )


def test_rows_say_which_use_is_not_reported() -> None:
    rows = {row.name: row for row in budget_use(BUDGET, USAGE)}
    assert rows["tokens"].used == "1,234" and rows["tokens"].limit == "10,000"
    assert rows["seconds"].used is None and rows["questions"].used is None
    assert all(row.used is None for row in budget_use(BUDGET))


def test_iteration_past_the_limit_is_shown_at_the_limit() -> None:
    assert budget_text(BUDGET, USAGE, iteration=3).startswith("iterations 3/3 ")


def test_workflow_details_and_client_details_use_it() -> None:
    req = JobRequest(goal="g", budget=BUDGET)
    state = LoopState(state="acting", iteration=1, counters=LoopCounters(steps=7, tool_calls=3))
    usage = JobUsage.of(state.counters)
    assert details_markdown(req, state) == f"**acting**\n\n{budget_text(BUDGET, usage, 1)}"
    assert f"**Budget:** {budget_text(BUDGET)}" in static_details(req)
