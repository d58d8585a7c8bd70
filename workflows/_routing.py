"""Router-first tiers: which tier a job starts on, and when it moves up (issue 14).

Deterministic orchestration. At the start of a job one cheap router call classifies it and picks
its tier (unless the caller forced one); the decision and its reason go into the job's state,
and so into status, result, current details and the ``KeelTier`` search attribute. A draft the
verifier rejects on the fast tier is refined on the deep tier, and output that fails its schema
twice on one tier is retried once on the next: each move is an event with what it cost. Every
call a move causes goes through ``ModelCaller``, so it is reserved against the budget like any.
"""

from __future__ import annotations

from collections.abc import Callable

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from keel.activities.llm import LLMActivities
    from keel.activities.types import RouteInput, TierName, Usage, next_tier
    from keel.workflows._calling import ModelCaller
    from keel.workflows._state import JobFailure
    from keel.workflows._visibility import Visibility
    from keel.workflows.types import JobRequest, LoopState, Routing

SAFE_TIER: TierName = "deep"
"""Where a job starts when the router's answer is unusable: quality first, cost second."""


class Router:
    """One job's tier: routing at the start, escalation on the way."""

    def __init__(
        self,
        req: JobRequest,
        state: LoopState,
        calls: ModelCaller,
        visibility: Visibility,
        event: Callable[[str, str], None],
    ) -> None:
        self._req, self._s, self._calls = req, state, calls
        self._visibility, self._event = visibility, event

    async def route(self) -> None:
        """Pick the tier the job starts on: the caller's, or the router's.

        A router call that fails for good (or answers twice with something that is not a
        decision) starts the job on the deep tier rather than failing it.

        Raises:
            BudgetExhausted: The budget cannot pay for the router's call.
        """
        if self._req.tier != "auto":
            tier: TierName = self._req.tier
            routing = Routing(tier=tier, started_on=tier, source="caller", reason="forced")
        else:
            routing = await self._ask_router()
        self._s.routing = routing
        self._visibility.tier(routing.tier)
        self._event("routed", f"{routing.tier} ({routing.source}): {routing.reason}"[:200])

    async def _ask_router(self) -> Routing:
        correction: str | None = None
        for _ in range(2):  # one retry on the same tier with the validation error
            fields = self._calls.fields(correction=correction)
            if "conversation" in fields:
                # A session's turn: the recent exchanges say what "that" refers to; the
                # summary of older turns does not change how hard the request is.
                fields["conversation"] = fields["conversation"].model_copy(update={"summary": ""})
            inp = RouteInput(
                **fields,
                allowed_tools=self._req.tools,
                retrieval_enabled=self._req.docs_dir is not None,
            )
            try:
                result = await self._calls.call(LLMActivities.route_job, inp, "route")
            except JobFailure as failure:
                correction = str(failure)
                break
            decision = result.decision
            if decision is not None:
                return Routing(
                    tier=decision.tier,
                    started_on=decision.tier,
                    source="router",
                    reason=decision.reason or f"complexity {decision.complexity}",
                    complexity=decision.complexity,
                )
            correction = result.invalid_reason or "output did not match the route schema"
        return Routing(
            tier=SAFE_TIER,
            started_on=SAFE_TIER,
            source="fallback",
            reason=f"router unusable: {correction}"[:200],
        )

    def escalate_after_rejection(self) -> bool:
        """Move the job up one tier after the verifier rejected its draft.

        Returns:
            True when the job moved; False at the top tier, or for a job without routing.
        """
        routing = self._s.routing
        upper = next_tier(routing.tier) if routing is not None else None
        if routing is None or upper is None:
            return False
        spent = self._s.counters.by_tier.get(routing.tier)
        cost = spent.cost_usd if spent is not None else 0.0
        self._event(
            "escalated",
            f"{routing.tier} → {upper}: the verifier rejected the {routing.tier} draft "
            f"(${cost:.6f} spent on {routing.tier})",
        )
        routing.tier, routing.escalated = upper, True
        self._s.counters.escalations += 1
        self._visibility.tier(upper)
        return True

    def tier_for_retry(self, retry: int) -> TierName | None:
        """The tier of the ``retry``-th retry of a call whose output failed its schema.

        The first retry stays on the job's tier; the second goes one tier up.

        Returns:
            The tier to force for this retry, or None to use the job's tier.
        """
        routing = self._s.routing
        if retry < 2 or routing is None:
            return None
        return next_tier(routing.tier)

    def escalated_call(self, what: str, tier: TierName | None, usage: Usage) -> None:
        """Record a call ``tier_for_retry`` sent a tier up: an event with what it cost."""
        routing = self._s.routing
        if tier is None or routing is None:
            return
        counters = self._s.counters
        counters.escalations += 1
        counters.escalation_usd = round(counters.escalation_usd + usage.cost_usd, 8)
        self._event(
            "escalated",
            f"{what}: invalid output twice on {routing.tier}; retried on {tier} "
            f"(${usage.cost_usd:.6f})",
        )
