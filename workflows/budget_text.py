"""How a job's budget reads to people: each limit beside what the job has used of it.

The one renderer behind the Temporal UI's current details (written by the workflow), the start
details the client attaches to a job, and the CLI's ``status`` table and ``watch`` line, so all
of them say ``tokens 1,234/200,000`` alike. Deterministic and I/O-free: plain string
formatting (``,`` grouping does not depend on the locale), safe to call from workflow code.
"""

from __future__ import annotations

from typing import NamedTuple

from keel.workflows.types import Budget, JobUsage, current_iteration

__all__ = ["BudgetUse", "budget_text", "budget_use"]


class BudgetUse(NamedTuple):
    """One budget, formatted: its name, its limit, and what has been used of it."""

    name: str
    """What is counted, such as ``tokens`` or ``tool calls``."""
    limit: str
    """The limit, formatted (``200,000``, ``$5``)."""
    used: str | None
    """What the job used, formatted; None when no usage was given or none is reported (the
    wall-clock seconds and the questions asked are not in ``JobUsage``)."""


def budget_use(
    budget: Budget, usage: JobUsage | None = None, iteration: int = 0
) -> list[BudgetUse]:
    """Every budget of a job, formatted, beside its use when ``usage`` is given.

    Args:
        budget: The job's limits.
        usage: What the job has used so far; None for the limits alone.
        iteration: ``LoopState.iteration`` (refined iterations), shown as the current one.

    Returns:
        Iterations, steps, tool calls, tokens, cost, then seconds and questions (limits only).
    """
    b, u = budget, usage
    used: dict[str, str] = {}
    if u is not None:
        used = {
            "iterations": str(current_iteration(iteration, b)),
            "steps": str(u.steps),
            "tool calls": str(u.tool_calls),
            "tokens": f"{u.tokens:,}",
            "cost": f"${u.cost_usd:.4f}",
        }
    limits = {
        "iterations": str(b.max_iterations),
        "steps": str(b.max_steps),
        "tool calls": str(b.max_tool_calls),
        "tokens": f"{b.max_tokens:,}",
        "cost": f"${b.max_cost_usd:g}",
        "seconds": f"{b.max_seconds:g}",
        "questions": str(b.max_questions),
    }
    return [BudgetUse(name, limit, used.get(name)) for name, limit in limits.items()]


def budget_text(
    budget: Budget, usage: JobUsage | None = None, iteration: int = 0, *, sep: str = " · "
) -> str:
    """A job's budgets on one line.

    Args:
        budget: The job's limits.
        usage: What the job has used so far; None for the limits alone.
        iteration: ``LoopState.iteration``, as for ``budget_use``.
        sep: What goes between two budgets.

    Returns:
        With usage, the budgets it reports, such as ``iterations 2/5 · steps 7/40 · tool calls
        3/20 · tokens 1,234/200,000 · cost $0.0012/$5``; without, every limit, such as
        ``iterations 5 · steps 40 · ... · seconds 1800 · questions 2``.
    """
    rows = budget_use(budget, usage, iteration)
    if usage is None:
        return sep.join(f"{r.name} {r.limit}" for r in rows)
    return sep.join(f"{r.name} {r.used}/{r.limit}" for r in rows if r.used is not None)
