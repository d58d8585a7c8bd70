"""What a job tells Temporal's visibility store, and when: its search-attribute upserts.

Deterministic workflow code. Every upsert is a history event and a visibility write on the
server, so a job upserts only what an operator filters on: ``KeelState`` when it starts or
stops waiting for an answer, cost and tokens once per iteration, and everything once at the
end. Its phase within an iteration (planning, acting, verifying) is in the workflow's current
details instead.
"""

from __future__ import annotations

from typing import Any

from temporalio import workflow
from temporalio.common import SearchAttributeUpdate

from keel.workflows import search_attributes as sa
from keel.workflows.types import JobState, LoopState


class Visibility:
    """The search-attribute upserts of one workflow run."""

    def __init__(self, state: LoopState) -> None:
        self._s = state
        self._state = sa.RUNNING
        self._tokens = -1

    def phase(self, state: JobState, *, final: bool = False) -> None:
        """The job entered ``state``; upsert if visibility should see it."""
        self._s.state = state
        coarse = state if final or state == "waiting_for_input" else sa.RUNNING
        if coarse != self._state or final:
            self._upsert(coarse, final=final)

    def tier(self, tier: str) -> None:
        """The job was routed to ``tier`` or escalated to it: ``KeelTier``, one upsert.

        None when the job already shows it: a tier the caller forced is set at start.
        """
        if workflow.info().typed_search_attributes.get(sa.KEEL_TIER) != tier:
            workflow.upsert_search_attributes([sa.KEEL_TIER.value_set(tier)])

    def iteration_done(self) -> None:
        """An iteration ended without an answer: publish cost and tokens so far."""
        self._upsert(self._state)

    def _upsert(self, state: str, *, final: bool = False) -> None:
        """One upsert: ``KeelState``, the outcome when final, and usage when it changed."""
        self._state = state
        usage = self._s.counters.usage
        updates: list[SearchAttributeUpdate[Any]] = [sa.KEEL_STATE.value_set(state)]
        if final:
            updates.append(sa.KEEL_OUTCOME.value_set(state))
            if self._s.degraded:
                # In the final upsert, not one of its own: no command a history lacks.
                updates.append(sa.KEEL_DEGRADED.value_set(True))
        if usage.total_tokens != self._tokens:
            self._tokens = usage.total_tokens
            updates.append(sa.KEEL_COST_USD.value_set(round(usage.cost_usd, 6)))
            updates.append(sa.KEEL_TOKENS.value_set(usage.total_tokens))
        workflow.upsert_search_attributes(updates)
