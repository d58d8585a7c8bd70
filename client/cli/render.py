"""How the job commands show jobs to a person: rich tables, the live progress view, results.

Loaded only by a command that prints for a person (``--json`` output never needs it), since
rich and the job models cost every command their import time.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from rich import box
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from keel.activities.answer_tokens import TokenDelta
from keel.client._events import JobStreamEvent
from keel.client._listing import JobSummary
from keel.client.fleet import QueueStats
from keel.workflows.budget_text import budget_text, budget_use
from keel.workflows.types import (
    JobEvent,
    JobProgress,
    JobResult,
    JobStatus,
    JobUsage,
    Routing,
    current_iteration,
)

RECENT_EVENTS = 6
"""Events ``keel watch`` keeps on screen."""
WIDE_TABLE_EXTRA = 80
"""Columns the table needs beside the job ID; narrower terminals get two lines per job."""


def stdout_console() -> Console:
    """A console on stdout, built per call so it follows whatever sys.stdout is now."""
    return Console(soft_wrap=True, highlight=False)


def print_status(snap: JobStatus) -> None:
    """A job's state, goal, budget use, pending question, writes and last ten events."""
    console = stdout_console()
    console.print(Text.assemble(("job  ", "bold"), snap.job_id))
    console.print(
        Text.assemble(
            ("state  ", "bold"),
            (snap.state, _state_style(snap.state)),
            f"   iteration {current_iteration(snap.iteration, snap.budget)}"
            f"/{snap.budget.max_iterations}",
            f"   run {snap.runs}" if snap.runs > 1 else "",
        )
    )
    console.print(Text.assemble(("goal  ", "bold"), _one_line(snap.goal, 200)))
    if snap.routing is not None:
        console.print(_routing_line(snap.routing), markup=False)
    console.print(_budget_table(snap))
    if snap.pending_question:
        console.print(Text.assemble(("question  ", "bold yellow"), snap.pending_question))
        console.print(f"answer with: keel answer {snap.job_id} TEXT", markup=False)
    for write in snap.writes:
        approval = ", needs approval" if write.requires_approval else ""
        console.print(
            Text.assemble(
                ("write  ", "bold"),
                f"{write.id} {write.tool} ({write.status}{approval}): ",
                _one_line(write.detail or write.preview, 160),
            )
        )
        if write.requires_approval and write.status == "previewed":
            console.print(
                f"decide with: keel approve|reject {snap.job_id} {write.id}", markup=False
            )
    if snap.events:
        console.print(_events_table(snap.events[-10:]))


async def follow(snapshots: AsyncIterator[JobStatus]) -> None:
    """Show each snapshot in place until the stream ends (the job reached a final state)."""
    console = stdout_console()
    with Live(console=console, auto_refresh=False) as live:
        async for snap in snapshots:
            live.update(_progress(snap), refresh=True)
    if not console.is_terminal:
        console.line()  # Off a terminal, Live prints its last frame without a newline.


async def follow_events(events: AsyncIterator[JobStreamEvent]) -> JobResult | None:
    """Show a job's events live (its position, recent events, the answer as it is written).

    Returns:
        The job's result from the stream's ``end`` event; ``None`` if the stream ended first.
    """
    view = EventView()
    console = stdout_console()
    with Live(console=console, auto_refresh=False) as live:
        async for event in events:
            view.add(event)
            live.update(view.render(), refresh=True)
    if not console.is_terminal:
        console.line()  # Off a terminal, Live prints its last frame without a newline.
    return view.result


class EventView:
    """What ``follow_events`` and ``keel chat`` show: position, last events, the live draft."""

    def __init__(self) -> None:
        self.progress: JobProgress | None = None
        self.recent: list[JobProgress] = []
        self.draft_of: tuple[int, int] = (-1, -1)
        self.draft = ""
        self.result: JobResult | None = None

    def add(self, event: JobStreamEvent) -> None:
        """Take one event: a new position, more of the draft, or the job's result."""
        data = event.data
        if isinstance(data, JobProgress):
            self.progress = data
            if data.kind != "phase":
                self.recent = [*self.recent, data][-RECENT_EVENTS:]
        elif isinstance(data, TokenDelta):
            if (data.iteration, data.attempt) != self.draft_of:
                self.draft_of, self.draft = (data.iteration, data.attempt), ""
            self.draft += data.text
        else:
            self.result = data

    def render(self) -> Group:
        """The view now: the position line, the recent events, the draft being written."""
        p = self.progress
        parts: list[Any] = []
        if p is not None:
            u = p.usage
            parts.append(
                Text.assemble(
                    (p.state, _state_style(p.state)),
                    f"  iteration {p.iteration + 1}  {u.steps} steps  {u.tool_calls} tool calls"
                    f"  {u.tokens:,} tokens  ${u.cost_usd:.4f}",
                )
            )
        for e in self.recent:
            line = f"{e.at.strftime('%H:%M:%S')} {e.kind} {_one_line(e.detail, 100)}"
            parts.append(Text(line, style="dim"))
        if self.draft and self.result is None:
            parts.append(Text("answer (being written)", style="bold"))
            parts.append(Text(_one_line(self.draft[-600:], 600)))
        return Group(*parts)


def print_fleet(rows: Sequence[QueueStats]) -> None:
    """Pollers and backlog per task queue."""
    table = Table(title="Keel fleet")
    for col in ("task queue", "kind", "pollers", "backlog", "oldest (s)", "add/s", "dispatch/s"):
        table.add_column(col, overflow="fold")
    for r in rows:
        names = ", ".join(p.identity for p in r.pollers) or "none"
        table.add_row(
            r.task_queue,
            r.kind,
            f"{len(r.pollers)} ({names})",
            str(r.backlog),
            f"{r.backlog_age_seconds:.1f}",
            f"{r.add_rate:.2f}",
            f"{r.dispatch_rate:.2f}",
        )
    stdout_console().print(table)


def print_breakers(states: dict[str, dict[str, Any]] | None) -> None:
    """The fleet's circuit breakers; None: their store (Redis) could not be read."""
    console = stdout_console()
    if states is None:
        console.print("circuit breakers: Redis (REDIS_URL) unreachable", style="yellow")
        return
    if not states:
        console.print("circuit breakers: none has tripped")
        return
    table = Table(title="Circuit breakers")
    for col in ("breaker", "state", "open until"):
        table.add_column(col, overflow="fold")
    style = {"open": "red", "half_open": "yellow", "closed": "green"}
    for name, state in sorted(states.items()):
        until = state.get("open_until")
        when = time.strftime("%H:%M:%S", time.localtime(until)) if until else ""
        table.add_row(name, Text(state["state"], style=style.get(state["state"], "")), when)
    console.print(table)


def print_jobs(console: Console, rows: Sequence[JobSummary]) -> None:
    """Print job summaries as a table, or two lines per job when the terminal is narrow.

    Job IDs are never truncated: they are the handle for every other command.

    Args:
        console: Where to print; its width picks the layout.
        rows: Summaries from ``AgentJobs.list_jobs``.
    """
    widest = max((len(row.job_id) for row in rows), default=3)
    if console.width >= widest + WIDE_TABLE_EXTRA:
        console.print(_jobs_table(rows, widest))
        return
    for row in rows:
        console.print(row.job_id, style="bold", markup=False, highlight=False, soft_wrap=True)
        console.print(
            Text.assemble(
                "  ",
                _state_text(row),
                f" · {row.tenant or '?'}/{row.user or '?'} · "
                f"{row.started_at.strftime('%m-%d %H:%M')}",
                f" · ${row.cost_usd:.4f}" if row.cost_usd is not None else "",
                f" · {row.tokens:,} tokens" if row.tokens is not None else "",
            )
        )


def _jobs_table(rows: Sequence[JobSummary], widest: int) -> Table:
    table = Table(show_edge=False, pad_edge=False, box=box.SIMPLE_HEAD)
    table.add_column("job", no_wrap=True, overflow="fold", min_width=widest)
    for name in ("state", "tenant", "user", "started"):
        table.add_column(name, overflow="fold")
    table.add_column("cost", justify="right", overflow="fold")
    table.add_column("tokens", justify="right", overflow="fold")
    for row in rows:
        table.add_row(
            row.job_id,
            _state_text(row),
            row.tenant or "",
            row.user or "",
            row.started_at.strftime("%m-%d %H:%M"),
            f"${row.cost_usd:.4f}" if row.cost_usd is not None else "",
            f"{row.tokens:,}" if row.tokens is not None else "",
        )
    return table


def _state_text(row: JobSummary) -> Text:
    state = Text(row.state or "?", style=_state_style(row.state))
    if row.temporal_status not in ("RUNNING", "COMPLETED"):
        # Failed, terminated or timed out in Temporal: say so beside the job's own state.
        state.append(f" ({row.temporal_status.lower()})", style="red")
    return state


def _budget_table(snap: JobStatus) -> Table:
    table = Table("budget", "used", "limit", show_edge=False, pad_edge=False)
    table.columns[1].justify = table.columns[2].justify = "right"
    for row in budget_use(snap.budget, snap.usage, snap.iteration):
        table.add_row(row.name, row.used or "", row.limit)
    return table


def _events_table(events: Sequence[JobEvent]) -> Table:
    table = Table("at", "event", "detail", show_edge=False, pad_edge=False)
    table.columns[2].overflow = "fold"
    for event in events:
        table.add_row(event.at.strftime("%H:%M:%S"), event.kind, event.detail)
    return table


def _progress(snap: JobStatus) -> Group:
    line = Text.assemble(
        (snap.state, _state_style(snap.state)),
        "  ",
        budget_text(snap.budget, snap.usage, snap.iteration, sep="  "),
    )
    parts: list[Any] = [Text.assemble(("job ", "bold"), snap.job_id), line]
    if snap.events:
        last = snap.events[-1]
        parts.append(Text(f"last: {last.kind} {_one_line(last.detail, 120)}", style="dim"))
    if snap.pending_question:
        parts.append(Text.assemble(("question: ", "bold yellow"), snap.pending_question))
        parts.append(Text(f"answer with: keel answer {snap.job_id} TEXT", style="dim"))
    return Group(*parts)


def print_result(res: JobResult) -> None:
    """A job's outcome, usage, error and answer."""
    console = stdout_console()
    console.print(Text.assemble(("job  ", "bold"), res.job_id))
    outcome = Text(res.outcome, style=_state_style(res.outcome))
    if res.exhausted_budget:
        outcome.append(f" ({res.exhausted_budget} ran out)")
    if res.outcome == "completed":
        outcome.append(" verified" if res.verified else " unverified")
    console.print(Text.assemble(("outcome  ", "bold"), outcome))
    u = res.usage
    console.print(
        f"usage  iterations {res.iterations} · {u.steps} steps · {u.tool_calls} tool calls · "
        f"{u.tokens:,} tokens · ${u.cost_usd:.4f}",
        markup=False,
    )
    if res.routing is not None:
        console.print(_routing_line(res.routing), markup=False)
    economy = _economy_line(u)
    if economy:
        console.print(economy, markup=False)
    if res.error:
        console.print(Text.assemble(("error  ", "bold red"), res.error))
    console.print(Text("answer", style="bold"))
    console.print(res.answer or "(none)", markup=False)


def _routing_line(routing: Routing) -> str:
    """``tier  deep (router, escalated from fast): reason``."""
    moved = f", escalated from {routing.started_on}" if routing.escalated else ""
    return f"tier  {routing.tier} ({routing.source}{moved}): {_one_line(routing.reason, 160)}"


def _economy_line(u: JobUsage) -> str:
    """Cost by tier and what the caches saved, or "" when there is nothing to say."""
    parts = [f"{tier} ${t.cost_usd:.4f}" for tier, t in sorted(u.by_tier.items())]
    hits, misses = sum(u.cache_hits.values()), sum(u.cache_misses.values())
    if hits or misses:
        parts.append(f"cache {hits} hit(s) / {misses} miss(es), saved ${u.saved_usd:.4f}")
    if u.escalations:
        parts.append(f"{u.escalations} escalation(s) ${u.escalation_usd:.4f}")
    return "cost   " + " · ".join(parts) if parts else ""


def _state_style(state: str | None) -> str:
    return {
        "completed": "green",
        "budget_exhausted": "yellow",
        "waiting_for_input": "yellow",
        "failed": "red",
        "cancelled": "magenta",
    }.get(state or "", "cyan")


def _one_line(text: str, limit: int) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 1] + "…"
