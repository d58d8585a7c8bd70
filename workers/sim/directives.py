"""The ``[sim: ...]`` directives a goal may carry to steer the LLM simulator.

Pure: no I/O, no clocks, no randomness. ``parse_goal`` splits a goal into its text and its
``Directives``, for example ``[sim: ask, fail_verify=1, fault=503x2, tokens=500, difficulty=3]``;
the reply logic (``workers.sim.replies``), the quality model (``workers.sim.quality``) and the
HTTP layer (``workers.sim.state``) act on them.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

FAULT_KINDS = (
    "500",
    "503",
    "429",
    "timeout",
    "malformed",
    "malformed_plan",
    "401",
    "400",
    "cut",
)
"""Every fault a ``fault=`` directive (or the random fault rate) can inject. ``cut``, a directive
only, hits streamed replies (``stream: true``) alone: the connection drops halfway through."""
DEFAULT_MAX_STEPS = 4
"""Tool steps in a plan when the goal carries no ``steps=`` directive."""
MAX_PLAN_STEPS = 16
"""Keel's ``Plan.steps`` limit; the simulator never emits more."""

_DIRECTIVE = re.compile(r"\[sim:\s*([^\]]*)\]", re.IGNORECASE)
_FAULT = re.compile(r"^(\d{3}|[a-z_]+)(?:x(\d+))?$")


@dataclass(frozen=True)
class Directives:
    """Behaviour switches parsed from a goal's ``[sim: ...]`` bracket."""

    ask: bool = False
    """Ask a clarifying question before acting (once, and only when allowed)."""
    fail_verify: int | None = None
    """Verdicts fail while ``iteration`` is below this; None leaves it to the config."""
    fault: str | None = None
    """One of FAULT_KINDS to inject, or None."""
    fault_count: int | None = None
    """How many requests get the fault; None means every one."""
    slow_ms: float = 0.0
    """Extra latency for requests carrying this goal."""
    token_ms: float = 0.0
    """Extra delay before each piece of a streamed reply (``token_ms=``)."""
    extra_tokens: int = 0
    """Added to the reported completion tokens, to exhaust token budgets."""
    max_steps: int = DEFAULT_MAX_STEPS
    """Cap on tool steps in a plan."""
    fanout: int = 1
    """Steps per chosen tool (same arguments), to shape benchmark jobs."""
    replan: bool = False
    """Plan tool steps on every iteration instead of answering once observations exist."""
    use: str | None = None
    """A tool to put in the plan even if it was not offered (to exercise the allow-list)."""
    difficulty: int | None = None
    """The goal's difficulty (``difficulty=N``, N >= 1) for the quality model; None leaves it
    to ``SimConfig.difficulty_weights``."""
    duplicate_step_ids: bool = False
    """Give every step of a plan the same id (``duplicate-step-ids``), as a careless model may."""


@lru_cache(maxsize=1024)
def parse_goal(goal: str) -> tuple[str, Directives]:
    """Split a goal into its clean text and its simulator directives.

    Only the first ``[sim: ...]`` bracket is read; unknown keys and unreadable values are
    ignored so tools may carry their own keys (``big=``) in the same bracket.

    Args:
        goal: The goal text as the caller wrote it.

    Returns:
        The goal with the bracket removed and stripped, and the parsed directives.
    """
    match = _DIRECTIVE.search(goal)
    if match is None:
        return goal.strip(), Directives()
    clean = f"{goal[: match.start()].rstrip()} {goal[match.end() :].lstrip()}".strip()
    values: dict[str, Any] = {}
    for item in match.group(1).split(","):
        key, _, raw = (part.strip().lower() for part in item.partition("="))
        try:
            if key == "ask":
                values["ask"] = True
            elif key == "fail_verify":
                values["fail_verify"] = int(raw)
            elif key == "slow":
                values["slow_ms"] = max(0.0, float(raw))
            elif key == "token_ms":
                values["token_ms"] = max(0.0, float(raw))
            elif key == "tokens":
                values["extra_tokens"] = max(0, int(raw))
            elif key == "steps":
                values["max_steps"] = max(0, int(raw))
            elif key == "fanout":
                values["fanout"] = max(1, min(int(raw), MAX_PLAN_STEPS - 1))
            elif key == "replan":
                values["replan"] = True
            elif key == "duplicate-step-ids":
                values["duplicate_step_ids"] = True
            elif key == "difficulty" and int(raw) >= 1:
                values["difficulty"] = int(raw)
            elif key == "use" and raw:
                values["use"] = raw
            elif key == "fault" and (fault := _FAULT.match(raw)) and fault[1] in FAULT_KINDS:
                values["fault"] = fault[1]
                values["fault_count"] = int(fault[2]) if fault[2] else None
        except ValueError:
            continue
    return clean, Directives(**values)


def fault_key(goal: str, kind: str) -> str:
    """Key of the per-goal fault counter (the raw goal, directive included, plus the kind)."""
    return hashlib.sha256(goal.encode()).hexdigest()[:32] + ":" + kind
