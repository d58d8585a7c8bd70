"""Budget accounting for one job: reserve before a call, charge after it.

Deterministic: pure arithmetic over ``Budget`` and ``LoopCounters`` with times passed in by the
workflow (``workflow.now()``). Nothing here reads a clock. A call is reserved only when its
worst case fits what is left, so a job can run out of budget but never overrun it.
"""

from __future__ import annotations

import math
from datetime import datetime, timedelta

from keel.activities.types import (
    CHARS_PER_TOKEN,
    MIN_OUTPUT_TOKENS,
    PROMPT_CHARS_PER_OBSERVATION,
    LLMCallBase,
    Observation,
    Usage,
)
from keel.workflows.types import Budget, BudgetName, LoopCounters

PROMPT_OVERHEAD_TOKENS = 1500
"""Upper bound on the tokens an LLM activity adds around its input: system prompt and tool
schemas. A test in tests/activities keeps the real prompts under it."""


UNITS_PER_USD = 100_000_000
"""Keel counts money in hundred-millionths of a dollar (costs are rounded to 8 decimals)."""


def _whole_units_below(usd: float) -> float:
    """``usd`` rounded *down* to whole units, so a call handed it cannot overrun the budget.

    The nudge of a millionth of a unit absorbs float noise (0.01 - 0.004 is 0.005999...) without
    ever adding a whole unit.
    """
    return math.floor(usd * UNITS_PER_USD + 1e-6) / UNITS_PER_USD


class BudgetExhausted(Exception):
    """Control flow inside the workflow: a budget ran out. Caught by ``run``, never escapes."""

    def __init__(self, budget: BudgetName) -> None:
        super().__init__(budget)
        self.budget: BudgetName = budget


def estimate_prompt_tokens(inp: LLMCallBase) -> int:
    """Worst-case prompt tokens for an LLM activity input.

    Observations stored by reference count at the size the activity will expand them to.
    """
    # A summary call's observations to fold are in its prompt too.
    fold: list[Observation] = getattr(inp, "fold", [])
    observations = [*inp.observations, *fold]
    expanded = sum(
        max(0, min(o.size, PROMPT_CHARS_PER_OBSERVATION) - len(o.content))
        for o in observations
        if o.ref
    )
    return (
        estimate_tokens(inp.model_dump_json())
        + expanded // CHARS_PER_TOKEN
        + (PROMPT_OVERHEAD_TOKENS)
    )


def estimate_tokens(text: str) -> int:
    """A deterministic, generous token count for budgeting (the activity counts exactly).

    One token per CHARS_PER_TOKEN characters undercounts text outside ASCII (a CJK character
    is about one token, an emoji up to three), so every byte a character needs past its first
    adds half a token: about 1.3 tokens per CJK character, 1.8 per emoji, a third per ASCII one.
    """
    chars = len(text)
    extra_bytes = len(text.encode("utf-8")) - chars
    return chars // CHARS_PER_TOKEN + extra_bytes // 2


class Ledger:
    """Checks and records spending against a budget. Mutates the counters it is given."""

    def __init__(self, budget: Budget, counters: LoopCounters, started_at: datetime) -> None:
        self.budget = budget
        self.counters = counters
        self.started_at = started_at

    def deadline(self) -> datetime:
        """When the wall-clock budget ends; time spent waiting for a human is added back."""
        seconds = self.budget.max_seconds + self.counters.waited_seconds
        return self.started_at + timedelta(seconds=seconds)

    def remaining(self, now: datetime) -> timedelta:
        """Wall-clock time left; raises when none is."""
        left = self.deadline() - now
        if left <= timedelta(0):
            raise BudgetExhausted("max_seconds")
        return left

    def reserve_llm(self, prompt_tokens: int, now: datetime) -> tuple[int, float]:
        """Reserve one LLM call whose price the activity applies (see ``max_cost_usd``).

        Returns:
            The completion tokens the token budget allows, and the dollars left.

        Raises:
            BudgetExhausted: when time, steps or tokens do not fit, or no money is left.
        """
        self.remaining(now)
        self._reserve_step()
        afford = self.budget.max_tokens - self.counters.usage.total_tokens - prompt_tokens
        if afford < MIN_OUTPUT_TOKENS:
            raise BudgetExhausted("max_tokens")
        money_left = _whole_units_below(self.budget.max_cost_usd - self.counters.usage.cost_usd)
        if money_left <= 0:
            raise BudgetExhausted("max_cost_usd")
        self.counters.steps += 1
        return afford, money_left

    def reserve_tools(self, wanted: int, now: datetime) -> tuple[int, BudgetName | None]:
        """Reserve up to ``wanted`` tool or retrieval calls.

        Returns:
            How many may run, and the budget that stopped the rest (None when all fit).
        """
        self.remaining(now)
        by_steps = self.budget.max_steps - self.counters.steps
        by_tools = self.budget.max_tool_calls - self.counters.tool_calls
        granted = max(0, min(wanted, by_steps, by_tools))
        self.counters.steps += granted
        self.counters.tool_calls += granted
        if granted == wanted:
            return granted, None
        return granted, "max_steps" if by_steps < by_tools else "max_tool_calls"

    def attempts_for(self, tool: str, ceiling: int) -> int:
        """Activity attempts a call to ``tool`` may use: one plus the tool's unused retries."""
        used = self.counters.retries_by_tool.get(tool, 0)
        return max(1, min(ceiling, self.budget.max_retries_per_tool - used + 1))

    def split_attempts(self, tool: str, calls: int, ceiling: int) -> list[int]:
        """Attempts for ``calls`` concurrent calls to ``tool`` that share its unused retries.

        Each call gets one attempt and the retries left are dealt out in turn, so together
        the calls can retry at most what the tool has left (each at most ``ceiling`` attempts).

        Returns:
            One count per call, largest first; each at least 1.
        """
        left = max(0, self.budget.max_retries_per_tool - self.counters.retries_by_tool.get(tool, 0))
        share, extra = divmod(left, calls)
        return [max(1, min(ceiling, 1 + share + (i < extra))) for i in range(calls)]

    def charge_retries(self, tool: str, retries: int) -> bool:
        """Record retries a tool used; returns True when its retry budget is now spent."""
        if retries > 0:
            total = self.counters.retries_by_tool.get(tool, 0) + retries
            self.counters.retries_by_tool[tool] = total
        return self.counters.retries_by_tool.get(tool, 0) >= self.budget.max_retries_per_tool

    def charge_llm(self, usage: Usage) -> None:
        """Add what an LLM call really used."""
        self.counters.usage = self.counters.usage + usage

    def _reserve_step(self) -> None:
        if self.counters.steps + 1 > self.budget.max_steps:
            raise BudgetExhausted("max_steps")
