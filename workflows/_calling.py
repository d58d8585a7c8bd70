"""Model and tool calls inside the budget: build an LLM activity's input, reserve, call, charge.

Deterministic orchestration. Before every call the ledger reserves the worst case (prompt
estimate plus the completion tokens left, and the time it needs); the activity gets that cap
and the dollars left, so it can refuse a call it cannot afford before sending anything.
Afterwards the workflow charges what the call used. ``call_tool`` schedules one tool call under
the tool policy, narrowed to the job's wall clock and the tool's retry budget; the act phase
(``_acting.py``) and the commit of a previewed write (``_writes.py``) both use it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from temporalio import workflow
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from pydantic import BaseModel

    from keel.activities import errors
    from keel.activities.converter import PlainText
    from keel.activities.tools import ToolActivities
    from keel.activities.types import LLMCallResult, ToolCall, ToolResult, Usage, next_tier
    from keel.workflows import policies
    from keel.workflows._budget import BudgetExhausted, Ledger, estimate_prompt_tokens
    from keel.workflows._state import JobFailure, add_event, note_degraded, raise_if_cancelled
    from keel.workflows.types import JobRequest, LoopState

R = TypeVar("R", bound=BaseModel)


class ModelCaller:
    """Runs one job's LLM activities against its ledger."""

    def __init__(
        self, req: JobRequest, state: LoopState, ledger: Ledger, charged: Callable[[], None]
    ) -> None:
        """Bind the caller to a job.

        Args:
            req: The job's request (tenant and goal go into every input).
            state: The loop state (iteration, observations, clarifications).
            ledger: The job's budget ledger.
            charged: Called after each call is charged, to refresh what the UI shows.
        """
        self._req, self._s, self._ledger, self._charged = req, state, ledger, charged

    def fields(self, **optional: Any) -> dict[str, Any]:
        """Fields of an LLM input; optional ones only when set, so payloads stay small.

        The job's tier, its summary and its cache opt-out go into every call (a ``tier`` given
        here overrides the job's, for one escalated call). The budget fields
        (``max_output_tokens``, ``max_cost_usd``) are left unset: ``call`` fills them in once
        the ledger has reserved the call.
        """
        routing = self._s.routing
        optional = {
            # Stored outputs go by reference only: the activity reads them from Redis, and the
            # tool's result in history already holds their preview.
            "observations": [
                o.model_copy(update={"content": ""}) if o.ref else o for o in self._s.observations
            ],
            "clarifications": self._s.clarifications,
            "summary": self._s.summary,
            "conversation": self._req.conversation,
            "tier": routing.tier if routing else None,
        } | {k: v for k, v in optional.items() if v is not None}
        fields = {k: v for k, v in optional.items() if v}
        if not self._req.cache:
            fields["cache"] = False
        return fields | {
            "tenant": self._req.tenant,
            "goal": self._req.goal,
            "iteration": self._s.iteration,
        }

    async def call(self, method: Callable[[Any, Any], Awaitable[R]], inp: Any, phase: str) -> R:
        """Run one LLM activity inside the budget: reserve the worst case, call, charge actual.

        The prompt is estimated from ``inp`` as built by ``fields``; the reservation's token cap
        and dollars left are then set on it, the only fields a reservation decides.

        Raises:
            BudgetExhausted: A budget cannot cover the call, or ran out while it was retried.
            JobFailure: The call failed for good (its retries spent, or non-retryable).
        """
        ledger = self._ledger
        prompt_tokens = estimate_prompt_tokens(inp)
        afford, usd_left = ledger.reserve_llm(prompt_tokens, workflow.now())
        inp = inp.model_copy(update={"max_output_tokens": afford, "max_cost_usd": usd_left})
        config = policies.capped(
            policies.LLM_CALL,
            ledger.remaining(workflow.now()),
            # Structural text only: it stays readable when payloads are encrypted (issue 16).
            summary=PlainText(f"{phase} · iteration {self._s.iteration + 1}"),
        )
        try:
            result = await workflow.execute_activity_method(method, inp, **config)
        except ActivityError as err:
            raise_if_cancelled(err)
            if workflow.now() >= ledger.deadline():
                raise BudgetExhausted("max_seconds") from None
            cause = err.cause
            kind = cause.type if isinstance(cause, ApplicationError) and cause.type else None
            if kind == errors.BUDGET_EXHAUSTED:
                raise BudgetExhausted("max_cost_usd") from None
            tier = _open_circuit_tier(cause)
            above = next_tier(tier) if tier in ("fast", "deep") else None  # type: ignore[arg-type]
            if above is not None:
                # The tier's model is behind an open breaker and has no fallback: the tier
                # above serves the call (reserved again at its price), and the job says so.
                self._degraded(f"{tier} tier: {cause}; served by the {above} tier")
                return await self.call(method, inp.model_copy(update={"tier": above}), phase)
            raise JobFailure(
                kind or errors.LLM_TRANSIENT, f"{phase} call failed: {cause}"
            ) from None
        self._account(result)  # type: ignore[arg-type]
        self._charged()
        return result

    def _account(self, result: LLMCallResult) -> None:
        """Charge a call's usage, by tier, and count the response cache's hit or miss."""
        self._ledger.charge_llm(result.usage)
        counters = self._s.counters
        tier = result.tier or "default"
        counters.by_tier[tier] = counters.by_tier.get(tier, Usage()) + result.usage
        routing = self._s.routing
        if routing is not None and routing.escalated and tier == routing.tier:
            counters.escalation_usd = round(counters.escalation_usd + result.usage.cost_usd, 8)
        if result.cached is not None:
            table = counters.cache_hits if result.cached else counters.cache_misses
            table["response"] = table.get("response", 0) + 1
        if result.saved is not None:
            counters.saved = counters.saved + result.saved
        if result.degraded:
            self._degraded(result.degraded)

    def _degraded(self, reason: str) -> None:
        if note_degraded(self._s, reason):
            add_event(self._s, workflow.now(), "degraded", reason[:200])


async def call_tool(call: ToolCall, ledger: Ledger, attempts: int, summary: str) -> ToolResult:
    """Run ``execute_tool`` for ``call`` under ``TOOL_CALL``, narrowed for this one call.

    Args:
        call: The tool call.
        ledger: The job's ledger; the call may use the wall-clock time it has left.
        attempts: Activity attempts the tool's retry budget allows this call.
        summary: What the Temporal UI calls the step. Structural text only (a tool's name): it
            is sent as ``PlainText``, readable when payloads are encrypted (issue 16).

    Returns:
        The tool's result.

    Raises:
        ActivityError: The call failed for good (its attempts spent, or non-retryable); the
            caller decides what that means for the job.
    """
    return await workflow.execute_activity_method(
        ToolActivities.execute_tool,
        call,
        **policies.capped(
            policies.TOOL_CALL,
            ledger.remaining(workflow.now()),
            attempts,
            summary=PlainText(summary),
        ),
    )


def _open_circuit_tier(cause: BaseException | None) -> str | None:
    """The tier of a call refused because its breaker is open (``CIRCUIT_OPEN``), else None."""
    if not isinstance(cause, ApplicationError) or cause.type != errors.CIRCUIT_OPEN:
        return None
    details = cause.details
    return str(details[1]) if len(details) > 1 else None
