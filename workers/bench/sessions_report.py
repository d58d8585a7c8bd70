"""The figures of ``keel bench sessions`` and the tables that print them.

Pure computation over the samples ``workers.bench.sessions`` takes (latencies, each turn's
prompt tokens, each run's history), so the arithmetic is tested without servers. Every figure
comes from those samples; the one target, the context of the last checkpoint turn within
``CONTEXT_TARGET`` times that of turn ``BASE_TURN``, is judged here and printed PASS or MISS.
"""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from rich.table import Table

from keel.workers.bench.measure import median, percentile, ratio

__all__ = [
    "BASE_TURN",
    "CHECKPOINT_TURNS",
    "CONTEXT_TARGET",
    "checkpoints",
    "context_figures",
    "context_table",
    "history_figures",
    "history_table",
    "overhead_figures",
    "overhead_table",
    "read_figures",
    "reads_table",
]

CHECKPOINT_TURNS = (5, 50, 500)
"""Turns whose context the report prints (those the conversation reaches, and its last)."""
BASE_TURN = 5
"""The turn later turns' context is compared with: the recent exchanges are full by then."""
CONTEXT_TARGET = 1.2
"""The last checkpoint turn's prompt tokens may be at most this many times turn 5's."""


def checkpoints(turns: int) -> list[int]:
    """The checkpoint turns of a conversation of ``turns`` turns: 5, 50, 500 and its last."""
    return sorted({t for t in CHECKPOINT_TURNS if t <= turns} | {turns})


def _latency(samples: Sequence[float]) -> dict[str, float | int | None]:
    return {
        "runs": len(samples),
        "p50_s": median(samples),
        "p95_s": percentile(samples, 95),
        "mean_s": statistics.fmean(samples) if samples else None,
    }


def overhead_figures(
    standalone: Sequence[float], turns: Sequence[float], outcomes: Sequence[str]
) -> dict[str, Any]:
    """Submit-to-result latency of standalone jobs and of session turns, and their ratios."""
    job, turn = _latency(standalone), _latency(turns)
    extra = None
    if job["p50_s"] is not None and turn["p50_s"] is not None:
        extra = float(turn["p50_s"]) - float(job["p50_s"])
    return {
        "standalone": job,
        "turn": turn,
        "p50_ratio": ratio(turn["p50_s"], job["p50_s"]),
        "p95_ratio": ratio(turn["p95_s"], job["p95_s"]),
        "p50_extra_s": extra,
        "outcomes": dict(Counter(outcomes)),
    }


def context_figures(
    tokens: Sequence[int], calls: Sequence[int], seen: Mapping[int, Mapping[str, Any]]
) -> dict[str, Any]:
    """Prompt tokens per turn, at the checkpoints, and the target judged on them.

    Args:
        tokens: Each turn's prompt tokens (all its model calls), turn 1 first.
        calls: Each turn's model calls.
        seen: What the session's status said at checkpoint turns (summary length, runs).

    Returns:
        Every turn's figures, the checkpoints', the ratio of the last checkpoint to turn
        ``BASE_TURN``, the largest ratio of any later turn, and whether the target was met.
    """
    turns = len(tokens)
    marks = checkpoints(turns) if turns else []
    at = {
        t: {
            "prompt_tokens": tokens[t - 1],
            "calls": calls[t - 1],
            "tokens_per_call": ratio(tokens[t - 1], calls[t - 1]),
        }
        | dict(seen.get(t, {}))
        for t in marks
    }
    base = tokens[BASE_TURN - 1] if turns >= BASE_TURN else None
    last = marks[-1] if marks else None
    last_ratio = ratio(tokens[last - 1], base) if last is not None and last > BASE_TURN else None
    later = tokens[BASE_TURN:]
    worst = ratio(max(later), base) if later else None
    return {
        "turns": turns,
        "base_turn": BASE_TURN,
        "target_ratio": CONTEXT_TARGET,
        "checkpoints": at,
        "last_to_base_ratio": last_ratio,
        "max_later_to_base_ratio": worst,
        "turns_without_calls": sum(c == 0 for c in calls),
        "passed": None if last_ratio is None else last_ratio <= CONTEXT_TARGET,
        "per_turn_prompt_tokens": list(tokens),
        "per_turn_calls": list(calls),
    }


def history_figures(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The session's runs: each one's events, bytes and turns, and the largest."""
    per_run = [
        dict(r) | {"run": i + 1, "bytes_per_turn": ratio(r["bytes"], r["turns"])}
        for i, r in enumerate(runs)
    ]
    return {
        "runs": len(per_run),
        "turns": sum(r["turns"] for r in per_run),
        "max_run_events": max((r["events"] for r in per_run), default=0),
        "max_run_bytes": max((r["bytes"] for r in per_run), default=0),
        "total_bytes": sum(r["bytes"] for r in per_run),
        "per_run": per_run,
    }


def read_figures(query: Any, snapshot: Any, snapshot_bytes: int) -> dict[str, Any]:
    """Status read latency: the query against a Redis snapshot of the same status.

    Args:
        query: ``sessions.Reads`` of the ``get_session`` query.
        snapshot: ``sessions.Reads`` of the Redis GET and parse.
        snapshot_bytes: The snapshot's size (the status as JSON).
    """
    figures: dict[str, Any] = {"snapshot_bytes": snapshot_bytes}
    for name, reads in (("query", query), ("redis_snapshot", snapshot)):
        samples = reads.latencies
        figures[name] = {
            "reads": len(samples),
            "errors": reads.errors,
            "p50_ms": _ms(median(samples)),
            "p95_ms": _ms(percentile(samples, 95)),
        }
    q, r = figures["query"]["p50_ms"], figures["redis_snapshot"]["p50_ms"]
    figures["faster"] = None if q is None or r is None else ("query" if q <= r else "redis")
    figures["p50_query_to_redis"] = ratio(q, r)
    return figures


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


def _fmt(value: float | None, spec: str = ".1f", suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def overhead_table(figures: Mapping[str, Any], latency_ms: float) -> Table:
    """Standalone job against session turn, submit to result."""
    table = Table(
        title=f"Per-turn overhead (the same job, one at a time; every model call {latency_ms:g} ms)"
    )
    for column in ("kind", "runs", "p50 ms", "p95 ms", "mean ms"):
        table.add_column(column, justify="left" if column == "kind" else "right")
    for name, key in (("standalone job", "standalone"), ("session turn", "turn")):
        row = figures[key]
        table.add_row(
            name,
            str(row["runs"]),
            _fmt(_ms(row["p50_s"])),
            _fmt(_ms(row["p95_s"])),
            _fmt(_ms(row["mean_s"])),
        )
    table.add_row(
        "turn / job",
        "",
        _fmt(figures["p50_ratio"], ".2f", "x"),
        _fmt(figures["p95_ratio"], ".2f", "x"),
        "",
    )
    table.caption = (
        f"a turn adds {_fmt(_ms(figures['p50_extra_s']))} ms at the median; "
        f"outcomes {figures['outcomes']}"
    )
    return table


def context_table(figures: Mapping[str, Any]) -> Table:
    """Prompt tokens per turn at the checkpoints, with the target."""
    base = figures["base_turn"]
    table = Table(title="Context sent to the model per turn (all of the turn's calls)")
    for column in ("turn", "prompt tokens", "calls", "tokens/call", "summary chars", f"vs {base}"):
        table.add_column(column, justify="right")
    checkpoints_at = figures["checkpoints"]
    base_tokens = checkpoints_at.get(base, {}).get("prompt_tokens")
    for turn, row in checkpoints_at.items():
        table.add_row(
            str(turn),
            str(row["prompt_tokens"]),
            str(row["calls"]),
            _fmt(row["tokens_per_call"], ".0f"),
            str(row.get("summary_chars", "-")),
            _fmt(ratio(row["prompt_tokens"], base_tokens), ".2f", "x"),
        )
    verdict = {True: "PASS", False: "MISS", None: "n/a"}[figures["passed"]]
    table.caption = (
        f"target: last turn <= {figures['target_ratio']}x turn {base}: {verdict} "
        f"({_fmt(figures['last_to_base_ratio'], '.2f', 'x')}); "
        f"largest of any turn after {base}: {_fmt(figures['max_later_to_base_ratio'], '.2f', 'x')}"
    )
    return table


def history_table(figures: Mapping[str, Any]) -> Table:
    """Each run of the session's workflow."""
    table = Table(
        title=f"Session history per run ({figures['turns']} turns, {figures['runs']} runs)"
    )
    for column in ("run", "turns", "events", "KiB", "bytes/turn", "continued as new"):
        table.add_column(column, justify="right")
    for run in figures["per_run"]:
        table.add_row(
            str(run["run"]),
            str(run["turns"]),
            str(run["events"]),
            f"{run['bytes'] / 1024:.1f}",
            _fmt(run["bytes_per_turn"], ".0f"),
            "yes" if run["continued_as_new"] else "no",
        )
    return table


def reads_table(figures: Mapping[str, Any], readers: int) -> Table:
    """Status read latency while turns run: the query and the Redis snapshot."""
    table = Table(title=f"Session status reads while turns run ({readers} readers of each kind)")
    for column in ("read", "reads", "errors", "p50 ms", "p95 ms"):
        table.add_column(column, justify="left" if column == "read" else "right")
    for name, key in (
        ("get_session query", "query"),
        ("Redis GET of a snapshot", "redis_snapshot"),
    ):
        row = figures[key]
        table.add_row(
            name, str(row["reads"]), str(row["errors"]), _fmt(row["p50_ms"], ".2f"),
            _fmt(row["p95_ms"], ".2f"),
        )  # fmt: skip
    table.caption = (
        f"snapshot {figures['snapshot_bytes']} bytes of JSON; faster at the median: "
        f"{figures['faster'] or '-'} ({_fmt(figures['p50_query_to_redis'], '.1f', 'x')} "
        "query / snapshot)"
    )
    return table
