"""Context compression: older observations are folded into a rolling summary, not dropped.

Deterministic orchestration. After each act phase, when the observations the next model call
would see pass ``COMPRESS_AT_TOKENS`` (or ``MAX_OBSERVATIONS``), all but the newest few (at
most ``KEEP_RECENT``, within half the threshold) are folded into the job's summary by one
fast-tier call, reserved and charged like any other. The summary is bounded by the activity,
so the prompt, the state and the history of each iteration stay flat however long a job runs.
Should the summary call fail for good, the oldest observations are dropped as before, and the
job goes on.
"""

from __future__ import annotations

from collections.abc import Callable

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from keel.activities.llm import LLMActivities
    from keel.activities.types import (
        CHARS_PER_TOKEN,
        PROMPT_CHARS_PER_OBSERVATION,
        Observation,
        SummaryInput,
    )
    from keel.workflows._calling import ModelCaller
    from keel.workflows._state import JobFailure
    from keel.workflows.types import LoopState

MAX_OBSERVATIONS = 16
"""Observations kept in state and prompts at most."""
COMPRESS_AT_TOKENS = 3_000
"""Fold observations into the summary once the prompt would carry more than this many tokens
of them (counted at the size the activity expands stored outputs to)."""
KEEP_RECENT = 4
"""Newest observations kept verbatim when the rest are folded."""


def observation_tokens(observations: list[Observation]) -> int:
    """Worst-case prompt tokens ``observations`` take (stored outputs at their expanded size)."""
    chars = sum(
        min(o.size, PROMPT_CHARS_PER_OBSERVATION) if o.ref else len(o.content) for o in observations
    )
    return chars // CHARS_PER_TOKEN


def _recent(observations: list[Observation]) -> int:
    """How many of the newest observations stay verbatim after a fold (always one).

    At most KEEP_RECENT, and within half the threshold, so the next fold is some act phases
    away rather than the very next one.
    """
    keep = 1
    while (
        keep < min(KEEP_RECENT, len(observations) - 1)
        and observation_tokens(observations[-(keep + 1) :]) <= COMPRESS_AT_TOKENS // 2
    ):
        keep += 1
    return keep


class ContextFolder:
    """Keeps one job's observations within bounds by summarising the oldest."""

    def __init__(
        self,
        state: LoopState,
        calls: ModelCaller,
        event: Callable[[str, str], None],
        *,
        enabled: bool = True,
    ) -> None:
        self._s, self._calls, self._event = state, calls, event
        self._enabled = enabled

    async def add(self, observations: list[Observation]) -> None:
        """Add an act phase's observations, folding older ones when they grow too large.

        Raises:
            BudgetExhausted: The budget cannot pay for the summary call.
        """
        merged = self._s.observations + observations
        self._s.observations = merged
        too_big = len(merged) > MAX_OBSERVATIONS or observation_tokens(merged) > COMPRESS_AT_TOKENS
        if too_big and self._enabled and len(merged) > 1:
            keep = _recent(merged)
            await self._fold(merged[:-keep], merged[-keep:])
        self._s.observations = self._s.observations[-MAX_OBSERVATIONS:]

    async def _fold(self, old: list[Observation], recent: list[Observation]) -> None:
        fields = self._calls.fields()
        fields.pop("observations", None)
        # Stored outputs go by reference, as in every call (``ModelCaller.fields``).
        fold = [o.model_copy(update={"content": ""}) if o.ref else o for o in old]
        inp = SummaryInput(**fields, fold=fold)
        try:
            result = await self._calls.call(LLMActivities.summarize_observations, inp, "summarize")
        except JobFailure as failure:
            self._event("summary_failed", f"dropping {len(old)} observations: {failure}"[:200])
            return
        self._s.summary = result.summary
        self._s.observations = recent
        self._s.counters.summaries += len(old)
        self._event("summarized", f"{len(old)} observations folded into the summary")
