"""How ``keel chat`` shows a session to a person: its status, its budget, each turn's answer.

Loaded only by the chat, after it has connected: rich and the session models are what it
prints with.
"""

from __future__ import annotations

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from keel.workflows.session_types import SessionStatus, TurnRecord
from keel.workflows.types import JobResult

__all__ = ["answer_text", "budget_table", "status_lines"]

ANSWER_STYLE = "bold cyan"
OUTCOME_STYLES = {"completed": "green", "budget_exhausted": "yellow", "failed": "red"}


def status_lines(console: Console, key: str, status: SessionStatus) -> None:
    """``/status``: phase, turns, queue, the summary, and the newest turns.

    Args:
        console: Where to print.
        key: The session key the user typed (``--session``).
        status: The session's snapshot.
    """
    phase = Text(status.phase, style="yellow" if status.phase == "exhausted" else "cyan")
    if status.exhausted_budget:
        phase.append(f" ({status.exhausted_budget} ran out)")
    console.print(Text.assemble(("session  ", "bold"), key, ("  " + status.session_id, "dim")))
    console.print(
        Text.assemble(
            ("phase  ", "bold"),
            phase,
            f"   turns {status.usage.turns}   queued {status.queued}",
            f"   run {status.runs}" if status.runs > 1 else "",
        )
    )
    console.print(Text.assemble(("summary  ", "bold"), status.summary or "(none yet)"))
    if status.turns:
        console.print(_turns_table(status.turns[-5:]))


def budget_table(status: SessionStatus) -> Table:
    """``/budget``: what the session has used of each of its limits."""
    b, u = status.budget, status.usage
    table = Table(
        "budget", "used", "limit", "left", box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False
    )
    for column in table.columns[1:]:
        column.justify = "right"
    table.add_row("turns", str(u.turns), str(b.max_turns), str(max(0, b.max_turns - u.turns)))
    table.add_row(
        "tokens", f"{u.tokens:,}", f"{b.max_tokens:,}", f"{max(0, b.max_tokens - u.tokens):,}"
    )
    table.add_row(
        "cost",
        f"${u.cost_usd:.4f}",
        f"${b.max_cost_usd:g}",
        f"${max(0.0, b.max_cost_usd - u.cost_usd):.4f}",
    )
    return table


def answer_text(turn: int, res: JobResult) -> tuple[Text, Text]:
    """A turn's answer, and a dim line saying how it ended and what it cost.

    Returns:
        The answer (``keel>`` and the text, never read as markup) and the turn's footer.
    """
    answer = Text.assemble(("keel> ", ANSWER_STYLE), res.answer or "(no answer)")
    footer = Text(f"turn {turn} · ", style="dim")
    footer.append(res.outcome, style=OUTCOME_STYLES.get(res.outcome, "dim"))
    if res.exhausted_budget:
        footer.append(f" ({res.exhausted_budget} ran out)", style="yellow")
    footer.append(
        f" · {res.usage.tokens:,} tokens · ${res.usage.cost_usd:.4f} · {res.job_id}", style="dim"
    )
    if res.error:
        footer.append(f"\nerror: {res.error}", style="red")
    return answer, footer


def _turns_table(turns: list[TurnRecord]) -> Table:
    table = Table("turn", "state", "message", "job", box=box.SIMPLE_HEAD, show_edge=False)
    table.columns[2].overflow = "ellipsis"
    table.columns[2].max_width = 40
    table.columns[3].overflow = "fold"
    for t in turns:
        state = t.outcome if t.state == "done" and t.outcome else t.state
        table.add_row(
            str(t.turn),
            Text(state, style=OUTCOME_STYLES.get(state, "cyan")),
            Text(" ".join(t.text.split())),
            t.job_id,
        )
    return table
