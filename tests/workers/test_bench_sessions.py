"""``keel bench sessions``: its figures, and a small run end to end.

The report's arithmetic is pure and tested directly; a small run (six turns, the simulator at
zero latency for every section) goes through every measurement on the test session's Temporal,
Redis and simulator, and its tables render. Nothing here asserts a duration: only structure.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import pytest
from rich.console import Console
from rich.progress import Progress
from temporalio.client import Client

from keel.workers.bench import sessions_report
from keel.workers.bench.sessions import (
    SessionsConfig,
    conversation_message,
    measure_sessions,
)
from keel.workers.bench.sessions_main import print_tables
from keel.workflows.session_types import turn_job_id


@dataclass
class _Reads:
    latencies: list[float] = field(default_factory=list)
    errors: int = 0


def test_checkpoints_are_5_50_500_and_the_last_turn() -> None:
    assert sessions_report.checkpoints(500) == [5, 50, 500]
    assert sessions_report.checkpoints(1000) == [5, 50, 500, 1000]
    assert sessions_report.checkpoints(60) == [5, 50, 60]
    assert sessions_report.checkpoints(5) == [5]


def test_every_scripted_message_has_the_same_length() -> None:
    assert len({len(conversation_message(n)) for n in range(1, 90_000, 7)}) == 1


def test_the_context_target_is_judged_on_the_last_turn_against_turn_5() -> None:
    tokens = [100, 100, 100, 100, 1000, 1100, 1150, 1190]
    calls = [4] * len(tokens)
    seen = {5: {"summary_chars": 240}, 8: {"summary_chars": 960}}
    figures = sessions_report.context_figures(tokens, calls, seen)
    assert list(figures["checkpoints"]) == [5, 8]
    assert figures["checkpoints"][8] == {
        "prompt_tokens": 1190,
        "calls": 4,
        "tokens_per_call": 297.5,
        "summary_chars": 960,
    }
    assert figures["last_to_base_ratio"] == pytest.approx(1.19)
    assert figures["max_later_to_base_ratio"] == pytest.approx(1.19)
    assert figures["passed"] is True
    grown = sessions_report.context_figures([*tokens[:-1], 1201], calls, seen)
    assert grown["passed"] is False
    # A turn that sent nothing is counted, not hidden.
    assert (
        sessions_report.context_figures(tokens, [4, 4, 0, 4, 4, 4, 4, 4], seen)[
            "turns_without_calls"
        ]
        == 1
    )


def test_overhead_history_and_read_figures() -> None:
    overhead = sessions_report.overhead_figures([0.5] * 10, [0.75] * 10, ["completed"] * 20)
    assert overhead["p50_ratio"] == pytest.approx(1.5)
    assert overhead["p50_extra_s"] == pytest.approx(0.25)
    assert overhead["outcomes"] == {"completed": 20}
    runs = [
        {"run_id": "a", "events": 4000, "bytes": 800_000, "turns": 160, "continued_as_new": True},
        {"run_id": "b", "events": 100, "bytes": 20_000, "turns": 4, "continued_as_new": False},
    ]
    history = sessions_report.history_figures(runs)
    assert (history["runs"], history["turns"], history["max_run_events"]) == (2, 164, 4000)
    assert [r["bytes_per_turn"] for r in history["per_run"]] == [5000, 5000]
    reads = sessions_report.read_figures(_Reads([0.03] * 5), _Reads([0.002] * 5, errors=1), 9000)
    assert reads["faster"] == "redis" and reads["p50_query_to_redis"] == pytest.approx(15)
    assert reads["redis_snapshot"] == {"reads": 5, "errors": 1, "p50_ms": 2.0, "p95_ms": 2.0}


async def test_a_small_run_measures_every_section(
    client: Client, redis_url: str, sim_url: str
) -> None:
    config = SessionsConfig(turns=6, overhead_runs=2, readers=1, read_seconds=1.0)
    with Progress(disable=True) as progress:
        report = await measure_sessions(client, redis_url, sim_url, sim_url, config, progress)

    overhead = report["overhead"]
    assert overhead["outcomes"] == {"completed": 4}
    assert overhead["standalone"]["runs"] == overhead["turn"]["runs"] == 2
    assert overhead["p50_ratio"] is not None and overhead["p50_ratio"] > 0

    context = report["context"]
    assert context["turns"] == 6 and context["turns_without_calls"] == 0
    assert len(context["per_turn_prompt_tokens"]) == 6
    assert all(t > 0 for t in context["per_turn_prompt_tokens"])
    assert list(context["checkpoints"]) == [5, 6]
    assert context["checkpoints"][6]["summary_chars"] >= 0
    assert context["passed"] in (True, False)

    history = report["history"]
    assert history["turns"] == 6 and history["runs"] >= 1
    assert history["per_run"][-1]["continued_as_new"] is False
    assert history["max_run_bytes"] > 0

    reads = report["reads"]
    assert reads["query"]["reads"] > 0 and reads["redis_snapshot"]["reads"] > 0
    assert reads["query"]["errors"] == 0 and reads["redis_snapshot"]["errors"] == 0
    assert reads["snapshot_bytes"] > 0 and reads["faster"] in ("query", "redis")
    assert report["session_id"].endswith(":chat")
    assert turn_job_id(report["session_id"], 1).endswith(".t1")

    out = Console(file=io.StringIO(), width=120)
    print_tables(out, report, config)
    text = out.file.getvalue()  # type: ignore[attr-defined]
    for title in ("Per-turn overhead", "Context sent", "Session history", "status reads"):
        assert title in text
    assert "PASS" in text or "MISS" in text
