"""The act phase: run a plan's tool and retrieval steps as activities, in bounded parallel waves.

Deterministic orchestration. Steps without unmet dependencies run together (at most
MAX_PARALLEL at once); every call is reserved against the budget first, and a tool's transient
failures are charged to its retry budget. Non-retryable tool errors become observations the
planner sees on the next iteration (a disallowed tool, bad arguments), not job failures. A
destructive tool's call is a dry run whose write waits for the verified answer (``_writes.py``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from temporalio import workflow
from temporalio.exceptions import ActivityError, ApplicationError, RetryState, TimeoutError

with workflow.unsafe.imports_passed_through():
    from keel.activities import errors
    from keel.activities.retrieval import RetrievalActivities
    from keel.activities.types import (
        Observation,
        PlanStep,
        RetrievalQuery,
        ToolCall,
        format_hits,
        unique_step_ids,
    )
    from keel.workflows import policies
    from keel.workflows._budget import BudgetExhausted, Ledger
    from keel.workflows._calling import call_tool
    from keel.workflows._state import note_degraded, raise_if_cancelled
    from keel.workflows._writes import record_preview
    from keel.workflows.types import BudgetName, JobRequest, LoopState

MAX_PARALLEL = 4
"""Steps of one wave that run at once; bounds the fan-out a single plan can cause."""


def waves(steps: list[PlanStep]) -> list[list[PlanStep]]:
    """Group steps so each wave depends only on earlier waves; unknown or cyclic deps run last."""
    done: set[str] = set()
    pending = list(steps)
    result: list[list[PlanStep]] = []
    while pending:
        ready = [s for s in pending if all(d in done for d in s.depends_on)] or pending
        result.append(ready)
        done.update(s.id for s in ready)
        pending = [s for s in pending if s not in ready]
    return result


class StepRunner:
    """Runs the steps of one plan for one iteration of a job."""

    def __init__(
        self,
        req: JobRequest,
        state: LoopState,
        ledger: Ledger,
        event: Callable[[str, str], None],
    ) -> None:
        self._req, self._s, self._ledger, self._event = req, state, ledger, event

    async def run(self, steps: list[PlanStep]) -> list[Observation]:
        """Run every step the budget allows; raise BudgetExhausted after the last one that fit."""
        if len({s.id for s in steps}) < len(steps):
            # The planner makes ids unique (activities/llm.py); a plan carried from elsewhere
            # may not, and steps sharing an id would share their writes' op_key.
            steps = unique_step_ids(steps)
        observations: list[Observation] = []
        for wave in waves(steps):
            granted, stopped_by = self._ledger.reserve_tools(len(wave), workflow.now())
            for start in range(0, granted, MAX_PARALLEL):
                chunk = wave[start : min(granted, start + MAX_PARALLEL)]
                attempts = self._attempts(chunk)
                outcomes = await asyncio.gather(
                    *(self._run_step(step, n) for step, n in zip(chunk, attempts, strict=True)),
                    return_exceptions=True,
                )
                exhausted: BudgetExhausted | None = None
                for outcome in outcomes:
                    if isinstance(outcome, Observation):
                        observations.append(outcome)
                    elif isinstance(outcome, BudgetExhausted):
                        exhausted = exhausted or outcome
                    elif isinstance(outcome, BaseException):
                        raise outcome
                if exhausted is not None:
                    self._s.observations.extend(observations)
                    raise exhausted
            if stopped_by is not None:
                self._s.observations.extend(observations)
                raise BudgetExhausted(stopped_by)
        return observations

    def _attempts(self, chunk: list[PlanStep]) -> list[int]:
        """Activity attempts each step of a chunk (steps that run at once) may use.

        The calls of one tool share what is left of its retry budget: each gets one attempt
        and the retries left are split between them, so a chunk of four calls cannot spend
        four times ``max_retries_per_tool``. A retrieval step has its own policy (1 here).
        """
        tools = [(step.tool or "") if step.kind != "retrieve" else None for step in chunk]
        calls = {tool: tools.count(tool) for tool in tools if tool is not None}
        if all(n == 1 for n in calls.values()):
            # A lone call of a tool gets all that is left.
            return [
                1 if tool is None else self._ledger.attempts_for(tool, policies.TOOL_ATTEMPTS)
                for tool in tools
            ]
        shares = {
            tool: self._ledger.split_attempts(tool, n, policies.TOOL_ATTEMPTS)
            for tool, n in calls.items()
        }
        return [1 if tool is None else shares[tool].pop(0) for tool in tools]

    async def _run_step(self, step: PlanStep, attempts: int) -> Observation:
        if step.kind == "retrieve":
            obs = await self._retrieve(step)
        else:
            obs = await self._tool(step, attempts)
        self._event("step", f"{obs.name} {step.id[:40]}: {'ok' if obs.ok else obs.error_type}")
        return obs

    async def _retrieve(self, step: PlanStep) -> Observation:
        base = Observation(step_id=step.id, kind="retrieve", name="retrieve", ok=False)
        if not self._req.docs_dir or not step.query:
            return base.model_copy(update={"content": "retrieval needs a docs folder and a query"})
        query = RetrievalQuery(
            tenant=self._req.tenant,
            docs_dir=self._req.docs_dir,
            query=step.query,
            top_k=step.top_k,
            filters=step.filters,
        )
        if not self._req.cache:
            query.cache = False
        try:
            result = await workflow.execute_activity_method(
                RetrievalActivities.search_corpus,
                query,
                **policies.capped(
                    policies.RETRIEVAL,
                    self._ledger.remaining(workflow.now()),
                    summary=f"retrieve · {step.query[:40]}",
                ),
            )
        except ActivityError as err:
            raise_if_cancelled(err)
            return self._failed(base, err)
        self._count_cache("retrieval", result.cached)
        return base.model_copy(update={"ok": True, "content": format_hits(result.hits)})

    async def _tool(self, step: PlanStep, attempts: int) -> Observation:
        tool = step.tool or ""
        base = Observation(step_id=step.id, kind="tool", name=tool or "?", ok=False)
        call = ToolCall(
            tenant=self._req.tenant,
            step_key=f"{self._s.iteration}:{step.id}",
            tool=tool,
            args=step.args,
            allowed_tools=self._req.tools,
        )
        if not self._req.cache:
            call.cache = False
        if self._req.docs_dir:
            call.docs_dir = self._req.docs_dir
        # A destructive tool only previews its write here; it commits once the answer that
        # depends on it is verified (workflows/_writes.py). Other tools ignore the flag.
        call.dry_run = True
        try:
            # A tool's name is structural, so its summary stays readable when payloads are
            # encrypted (the retrieval summary above quotes a query, so it is encrypted).
            result = await call_tool(call, self._ledger, attempts, f"tool {tool}")
        except ActivityError as err:
            raise_if_cancelled(err)
            return self._failed(base, err, tool, attempts)
        self._ledger.charge_retries(tool, result.attempt - 1)
        self._count_cache("tool", result.cached)
        update = {"ok": True, "content": result.content}
        if result.preview:
            update["content"] = record_preview(self._s, call, result, self._event)
        if result.ref:
            update |= {"ref": result.ref, "size": result.size}
        return base.model_copy(update=update)

    def _count_cache(self, cache: str, cached: bool | None) -> None:
        """Count a tool's or a search's cache hit or miss in the job's usage."""
        if cached is not None:
            counters = self._s.counters
            table = counters.cache_hits if cached else counters.cache_misses
            table[cache] = table.get(cache, 0) + 1

    def _failed(
        self, base: Observation, err: ActivityError, tool: str | None = None, attempts: int = 1
    ) -> Observation:
        """Turn a failed call into an observation, or end the job when a budget ran out."""
        cause = err.cause
        if isinstance(cause, ApplicationError) and cause.non_retryable:
            if cause.type == errors.CIRCUIT_OPEN:
                # The tool's breaker is open: the step fails fast, the plan goes on without it.
                note_degraded(self._s, f"tool {base.name}: circuit open; proceeded without it")
            self._event("step_failed", f"{base.name}: {cause.type}")
            return base.model_copy(update={"content": cause.message, "error_type": cause.type})
        if workflow.now() >= self._ledger.deadline():
            raise BudgetExhausted("max_seconds")
        budget: BudgetName | None = None
        if tool is not None and err.retry_state == RetryState.MAXIMUM_ATTEMPTS_REACHED:
            if self._ledger.charge_retries(tool, attempts - 1):
                budget = "max_retries_per_tool"
        if budget is not None:
            self._event("step_failed", f"{base.name}: retries exhausted")
            raise BudgetExhausted(budget)
        kind = cause.type if isinstance(cause, ApplicationError) else type(cause).__name__
        message = str(cause) if not isinstance(cause, TimeoutError) else "timed out"
        return base.model_copy(update={"content": message, "error_type": kind})
