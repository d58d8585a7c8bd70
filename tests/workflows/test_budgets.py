"""Each budget running out ends the job as budget_exhausted, with usage and a partial answer."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from temporalio.client import Client

from keel.activities.types import Usage
from keel.client import AgentJobs, Budget, JobRequest
from keel.workflows import policies
from keel.workflows._budget import BudgetExhausted, Ledger
from keel.workflows.types import LoopCounters, current_iteration
from tests.conftest import unique
from tests.workflows.test_agent_loop import replay_own_history


async def exhaust(client: Client, make_worker, goal: str, budget: Budget, record_as=None, **req):  # type: ignore[no-untyped-def]
    async with make_worker(client, http_allowed_hosts=["127.0.0.1:*"]) as worker:
        jobs = AgentJobs(client, task_queue=worker.task_queue)
        job_id = await jobs.start(
            JobRequest(goal=goal, budget=budget, **req), request_key=unique("budget")
        )
        result = await jobs.result(job_id, timeout=120)
        status = await jobs.status(job_id)
        await replay_own_history(client, job_id, record_as=record_as)
    assert result.outcome == "budget_exhausted", result
    assert status.state == "budget_exhausted"
    assert not result.verified
    return result


async def test_max_steps(client: Client, make_worker) -> None:
    result = await exhaust(client, make_worker, "What is 2 + 2?", Budget(max_steps=2))
    assert result.exhausted_budget == "max_steps"
    assert result.usage.steps <= 2


async def test_max_tool_calls_keeps_partial_observations(client: Client, make_worker) -> None:
    result = await exhaust(
        client,
        make_worker,
        "What is 3 * 3? use calculator and write_note",
        Budget(max_tool_calls=1),
        record_as="budget_exhausted",
    )
    assert result.exhausted_budget == "max_tool_calls"
    assert result.usage.tool_calls == 1
    assert result.answer and "[calculator] 9" in result.answer  # the partial answer


async def test_max_tokens_never_overrun(client: Client, make_worker) -> None:
    budget = Budget(max_tokens=4000, max_iterations=50)
    result = await exhaust(client, make_worker, "What is 4 + 4? [sim: fail_verify=999]", budget)
    assert result.exhausted_budget == "max_tokens"
    assert 0 < result.usage.tokens <= 4000


async def test_max_cost_never_overrun(client: Client, make_worker) -> None:
    budget = Budget(max_cost_usd=0.004, max_iterations=50, max_steps=1000)
    result = await exhaust(client, make_worker, "What is 5 + 5? [sim: fail_verify=999]", budget)
    assert result.exhausted_budget == "max_cost_usd"
    assert 0 < result.usage.cost_usd <= 0.004


async def test_max_iterations_returns_best_draft(client: Client, make_worker) -> None:
    budget = Budget(max_iterations=2)
    result = await exhaust(client, make_worker, "What is 6 + 6? [sim: fail_verify=999]", budget)
    assert result.exhausted_budget == "max_iterations"
    assert result.iterations == 2
    assert result.answer and "12" in result.answer


def test_the_iteration_shown_counts_from_one_and_stops_at_the_limit() -> None:
    # A job in its first iteration shows 1/2; one that ran out of iterations shows 2/2, not 3/2.
    budget = Budget(max_iterations=2)
    assert [current_iteration(done, budget) for done in (0, 1, 2)] == [1, 2, 2]


async def test_max_seconds(client: Client, make_worker) -> None:
    budget = Budget(max_seconds=1.5)
    result = await exhaust(
        client, make_worker, "What is 7 + 7? [sim: slow=400, fail_verify=999]", budget
    )
    assert result.exhausted_budget == "max_seconds"


@pytest.fixture
def flaky_url() -> Iterator[str]:
    """An HTTP endpoint that always answers 503: a tool dependency that is down."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(503)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/status"
    server.shutdown()


async def test_max_retries_per_tool(client: Client, make_worker, flaky_url: str) -> None:
    result = await exhaust(
        client,
        make_worker,
        f"Fetch {flaky_url} with http_get",
        Budget(max_retries_per_tool=1),
        tools=["http_get"],
    )
    assert result.exhausted_budget == "max_retries_per_tool"


@given(st.integers(0, 10), st.integers(0, 12), st.integers(1, 4), st.integers(1, 6))
def test_concurrent_calls_of_a_tool_share_the_retries_it_has_left(
    max_retries: int, used: int, calls: int, ceiling: int
) -> None:
    counters = LoopCounters(retries_by_tool={"http_get": used})
    ledger = Ledger(Budget(max_retries_per_tool=max_retries), counters, datetime.now(UTC))
    split = ledger.split_attempts("http_get", calls, ceiling)
    left = max(0, max_retries - used)
    assert len(split) == calls and all(1 <= n <= ceiling for n in split)
    assert sum(split) - calls <= left  # together they retry at most what is left ...
    if -(-left // calls) < ceiling:
        assert sum(split) == calls + left  # ... and all of it, unless the ceiling cuts it
    assert max(split) - min(split) <= 1  # dealt out evenly


def test_ledger_hands_the_dollars_left_to_the_call_and_stops_at_zero() -> None:
    start = datetime(2026, 1, 1, tzinfo=UTC)
    ledger = Ledger(Budget(max_tokens=10_000, max_cost_usd=0.01), LoopCounters(), start)
    afford, usd_left = ledger.reserve_llm(2_000, start)
    assert (afford, usd_left) == (8_000, 0.01)
    assert ledger.counters.steps == 1
    ledger.charge_llm(Usage(prompt_tokens=1_500, completion_tokens=500, cost_usd=0.004))
    assert ledger.reserve_llm(2_000, start) == (6_000, 0.006)
    ledger.charge_llm(Usage(prompt_tokens=10, completion_tokens=10, cost_usd=0.006))
    with pytest.raises(BudgetExhausted) as spent:
        ledger.reserve_llm(100, start)
    assert spent.value.budget == "max_cost_usd"
    with pytest.raises(BudgetExhausted) as tokens:
        ledger.reserve_llm(9_990, start)  # prompt leaves < MIN_OUTPUT_TOKENS
    assert tokens.value.budget == "max_tokens"


TOOL_NAMES = ("calculator", "http_get", "write_note")
RETRY_CEILING = policies.TOOL_ATTEMPTS
"""The tool policy's own maximum_attempts (workflows/policies.py)."""

OPS = st.lists(
    st.one_of(
        # An LLM call: its worst-case prompt, then what it really used as fractions of what the
        # reservation allowed (a real prompt is at most the estimate; the activity caps output
        # by the tokens and dollars it was handed).
        st.tuples(
            st.just("llm"),
            st.integers(0, 50_000),
            st.floats(0, 1),
            st.floats(0, 1),
            st.floats(0, 1),
        ),
        # A wave of tool calls, and the retries each used of what it was allowed.
        st.tuples(
            st.just("tools"),
            st.integers(1, 8),
            st.lists(st.tuples(st.sampled_from(TOOL_NAMES), st.floats(0, 1)), max_size=8),
        ),
        st.tuples(st.just("wait"), st.floats(0, 600)),
    ),
    max_size=40,
)


@pytest.mark.property
@given(
    st.builds(
        Budget,
        max_steps=st.integers(1, 60),
        max_tool_calls=st.integers(1, 30),
        max_retries_per_tool=st.integers(0, 5),
        max_tokens=st.integers(1, 300_000),
        max_seconds=st.floats(1, 3_600),
        max_cost_usd=st.floats(0.0001, 2),
    ),
    OPS,
)
# Found by this test: the dollars left were rounded to 8 decimals, up as often as down, so a
# call could be handed (and spend) 0.16992188 of a 0.169921875 budget.
@example(Budget(max_cost_usd=0.169921875), [("llm", 0, 0.0, 0.0, 1.0)])
def test_no_sequence_of_calls_overruns_any_budget(budget: Budget, ops: list[tuple]) -> None:  # type: ignore[type-arg]
    """The ledger's promise, for any budget and any run: a job may run out, never over."""
    now = start = datetime(2026, 1, 1, tzinfo=UTC)
    ledger = Ledger(budget, LoopCounters(), start)
    for op in ops:
        try:
            if op[0] == "llm":
                _, prompt, used_prompt, used_output, used_money = op
                afford, usd_left = ledger.reserve_llm(prompt, now)
                assert now < ledger.deadline()
                ledger.charge_llm(
                    Usage(
                        prompt_tokens=int(prompt * used_prompt),
                        completion_tokens=int(afford * used_output),
                        cost_usd=usd_left * used_money,
                    )
                )
            elif op[0] == "tools":
                _, wanted, calls = op
                granted, stopped_by = ledger.reserve_tools(wanted, now)
                assert (stopped_by is None) == (granted == wanted)
                for tool, share in calls[:granted]:
                    attempts = ledger.attempts_for(tool, RETRY_CEILING)
                    assert 1 <= attempts <= RETRY_CEILING
                    ledger.charge_retries(tool, int((attempts - 1) * share))
            else:
                now += timedelta(seconds=op[1])
        except BudgetExhausted:
            break  # the workflow ends the job here, with what it has
        finally:
            spent = ledger.counters
            assert spent.steps <= budget.max_steps
            assert spent.tool_calls <= budget.max_tool_calls
            assert spent.usage.total_tokens <= budget.max_tokens
            assert spent.usage.cost_usd <= budget.max_cost_usd + 1e-12  # float noise only
            assert all(n <= budget.max_retries_per_tool for n in spent.retries_by_tool.values())


def test_the_budget_estimate_does_not_undercount_cjk_or_emoji() -> None:
    from keel.activities.costing import count_tokens
    from keel.workflows._budget import estimate_tokens

    for text in ["Hello, world! " * 40, "日本語のテキストを数える。" * 40, "🎉🚀👍🏽" * 40]:
        exact = count_tokens("gpt-4.1", text)
        assert estimate_tokens(text) >= exact, (text[:10], estimate_tokens(text), exact)
        assert estimate_tokens(text) <= 3 * exact + 10  # generous, not absurd
