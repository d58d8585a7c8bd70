"""The agent loop: one workflow per job, plan → act → verify → refine, within a budget.

Deterministic orchestration only. Every LLM, tool and retrieval call is an activity; clocks come
from ``workflow.now()``; state is one ``LoopState`` carried across continue-as-new. Running out
of budget is an outcome (``budget_exhausted``), not an error.
"""

from __future__ import annotations

import asyncio
from typing import NoReturn

from temporalio import workflow
from temporalio.exceptions import ApplicationError

with workflow.unsafe.imports_passed_through():
    from keel.activities import errors
    from keel.activities.llm import LLMActivities
    from keel.activities.types import (
        AnswerInput,
        Clarification,
        Plan,
        PlanInput,
        Verdict,
        VerifyInput,
    )
    from keel.workflows._acting import StepRunner
    from keel.workflows._budget import BudgetExhausted, Ledger
    from keel.workflows._calling import ModelCaller
    from keel.workflows._context import MAX_OBSERVATIONS, ContextFolder
    from keel.workflows._notifying import Notifier
    from keel.workflows._progress import ProgressStream
    from keel.workflows._routing import Router
    from keel.workflows._slots import JobSlot
    from keel.workflows._state import (
        JobFailure,
        add_event,
        carried_state_problem,
        details_markdown,
        history_is_long,
        result_of,
        status_of,
    )
    from keel.workflows._visibility import Visibility
    from keel.workflows._writes import (
        WriteCommitter,
        check_decision,
        decide,
        discard_open,
        supersede_open,
    )
    from keel.workflows.types import (
        AgentLoopInput,
        BudgetName,
        HumanInput,
        JobResult,
        JobState,
        JobStatus,
        LoopState,
        Outcome,
        WriteDecision,
    )

__all__ = ["MAX_OBSERVATIONS", "AgentLoopWorkflow"]

MAX_CORRECTIONS = 2
"""Corrective calls after invalid output (the first on the job's tier, the second one tier up)
before the planner's failure fails the job, or a verdict counts as a rejection."""


@workflow.defn
class AgentLoopWorkflow:
    """Runs one agent job to an outcome within its budget."""

    @workflow.init
    def __init__(self, inp: AgentLoopInput) -> None:
        self._req = inp.request
        self._inp = inp
        self._s = inp.state or LoopState()
        self._reply: str | None = None
        self._visibility = Visibility(self._s)
        self._progress = ProgressStream(self._s)
        # Set by _setup, before any phase runs; handlers never use them.
        self._ledger: Ledger
        self._calls: ModelCaller
        self._router: Router
        self._context: ContextFolder

    @workflow.run
    async def run(self, inp: AgentLoopInput) -> JobResult:
        """Loop until the draft is verified, a budget runs out, or the job is cancelled."""
        try:
            await self._setup()
            for _ in range(inp.continue_as_new_after or 1_000_000):
                plan = await self._plan()
                if plan.decision == "act":
                    await self._act(plan)
                verdict = await self._verify(await self._draft())
                if verdict.passed:
                    return await self._finish("completed")
                self._refine(verdict)
                if history_is_long():
                    break
            await self._continue_as_new()
        except BudgetExhausted as exhausted:
            return await self._finish("budget_exhausted", exhausted.budget)
        except asyncio.CancelledError:
            return await self._finish("cancelled")
        except JobFailure as failure:
            result = await self._finish("failed", error=f"{failure.error_type}: {failure}")
            raise ApplicationError(
                str(failure), result, type=failure.error_type, non_retryable=True
            ) from None

    async def _setup(self) -> None:
        if self._inp.state is not None:
            self._refuse_foreign_state()
        if self._s.started_at is None:
            # Time in line for a running-job slot is not work: the wall clock starts after it.
            await JobSlot(self._req, self._s, self._event, wanted=self._inp.job_slot).acquire()
            self._s.started_at = workflow.now()
            self._event("started", f"goal: {self._req.goal[:80]}")
        self._ledger = Ledger(self._req.budget, self._s.counters, self._s.started_at)
        self._calls = ModelCaller(self._req, self._s, self._ledger, self._show_details)
        self._router = Router(self._req, self._s, self._calls, self._visibility, self._event)
        self._context = ContextFolder(self._s, self._calls, self._event, enabled=self._inp.compress)
        if self._s.routing is None:
            await self._router.route()

    def _refuse_foreign_state(self) -> None:
        """Fail the job, using nothing of it, on carried state Keel did not write (issue 13)."""
        problem = carried_state_problem(self._s, self._req, self._job_id, workflow.now())
        if problem:
            self._s = LoopState()
            self._visibility = Visibility(self._s)
            raise JobFailure(errors.INVALID_CARRIED_STATE, f"carried state refused: {problem}")

    async def _plan(self) -> Plan:
        while True:
            self._set_state("refining" if self._s.critique else "planning")
            correction: str | None = None
            for retry in range(MAX_CORRECTIONS + 1):
                tier = self._router.tier_for_retry(retry)
                inp = PlanInput(
                    **self._calls.fields(
                        critique=self._s.critique, correction=correction, tier=tier
                    ),
                    allowed_tools=self._req.tools,
                    retrieval_enabled=self._req.docs_dir is not None,
                    may_ask=self._s.counters.questions < self._req.budget.max_questions,
                )
                result = await self._calls.call(LLMActivities.plan_step, inp, "plan")
                self._router.escalated_call("plan", tier, result.usage)
                if result.plan is not None:
                    break
                correction = result.invalid_reason or "output did not match the plan schema"
                self._event("invalid_plan", correction[:200])
            else:
                raise JobFailure(errors.BAD_MODEL_OUTPUT, f"planner output invalid: {correction}")
            if result.plan.decision != "ask":
                return result.plan
            await self._ask(result.plan)

    async def _ask(self, plan: Plan) -> None:
        question = plan.question or "Please clarify the goal."
        default = plan.default_assumption or "Proceed with the most common interpretation."
        self._s.counters.questions += 1
        self._s.pending_question, self._s.pending_default = question, default
        self._set_state("waiting_for_input")
        self._event("question", question[:200])
        await Notifier(self._req, self._event).question(question)
        asked_at = workflow.now()
        try:
            await workflow.wait_condition(
                lambda: self._reply is not None, timeout=self._req.ask_timeout_seconds
            )
        except TimeoutError:
            self._event("question_timeout", f"assuming: {default[:150]}")
        self._s.counters.waited_seconds += (workflow.now() - asked_at).total_seconds()
        answer = self._reply if self._reply is not None else default
        self._s.clarifications.append(
            Clarification(question=question, answer=answer, assumed=self._reply is None)
        )
        self._s.pending_question = self._s.pending_default = self._reply = None

    async def _act(self, plan: Plan) -> None:
        self._set_state("acting")
        runner = StepRunner(self._req, self._s, self._ledger, self._event)
        await self._context.add(await runner.run(plan.steps))

    async def _draft(self) -> str:
        self._set_state("verifying")
        inp = AnswerInput(**self._calls.fields(critique=self._s.critique))
        result = await self._calls.call(LLMActivities.draft_answer, inp, "answer")
        self._s.draft = result.answer
        return result.answer

    async def _verify(self, draft: str) -> Verdict:
        inp = VerifyInput(**self._calls.fields(), draft=draft)
        result = await self._calls.call(LLMActivities.verify_draft, inp, "verify")
        retry = 0
        while result.verdict is None and retry < MAX_CORRECTIONS:
            retry += 1
            correction = result.invalid_reason or "output did not match the verdict schema"
            tier = self._router.tier_for_retry(retry)
            inp = VerifyInput(**self._calls.fields(correction=correction, tier=tier), draft=draft)
            result = await self._calls.call(LLMActivities.verify_draft, inp, "verify")
            self._router.escalated_call("verify", tier, result.usage)
        verdict = result.verdict or Verdict(
            passed=False, score=0.0, critique=f"verifier output invalid: {result.invalid_reason}"
        )
        if verdict.score > self._s.best_score:
            self._s.best_score, self._s.best_draft = verdict.score, draft
        self._event("verdict", f"passed={verdict.passed} score={verdict.score:.2f}")
        return verdict

    def _refine(self, verdict: Verdict) -> None:
        supersede_open(self._s)  # writes previewed for a rejected draft are never made
        self._s.critique = verdict.critique or "The verifier rejected the draft."
        self._router.escalate_after_rejection()
        self._s.iteration += 1
        if self._s.iteration >= self._req.budget.max_iterations:
            raise BudgetExhausted("max_iterations")
        self._visibility.iteration_done()

    async def _continue_as_new(self) -> NoReturn:
        self._s.runs += 1
        self._event("continue_as_new", f"run {self._s.runs}")
        await self._progress.close()
        workflow.continue_as_new(self._inp.model_copy(update={"state": self._s}))

    async def _finish(
        self, outcome: Outcome, exhausted: BudgetName | None = None, error: str | None = None
    ) -> JobResult:
        if outcome == "completed":  # A verified answer: its writes may commit now (issue 16).
            await WriteCommitter(
                self._req, self._s, self._ledger, self._event, self._set_state
            ).commit()
        discard_open(self._s, outcome)
        await JobSlot(self._req, self._s, self._event).release()
        self._set_state(outcome, final=True)
        result = result_of(self._job_id, self._s, outcome, exhausted, error)
        self._event(outcome, f"budget {exhausted} ran out" if exhausted else (error or ""))
        await Notifier(self._req, self._event).finished(result)
        await self._progress.close()
        return result

    def _set_state(self, state: JobState, *, final: bool = False) -> None:
        changed = state != self._s.state
        self._visibility.phase(state, final=final)
        self._show_details()
        if changed:
            self._progress.publish(self._s, workflow.now(), "phase", state)

    def _show_details(self) -> None:
        """Current details in the Temporal UI (metadata only: no history events)."""
        workflow.set_current_details(details_markdown(self._req, self._s))

    def _event(self, kind: str, detail: str = "") -> None:
        add_event(self._s, workflow.now(), kind, detail)
        self._progress.publish(self._s, workflow.now(), kind, detail)

    @property
    def _job_id(self) -> str:
        return workflow.info().workflow_id

    @workflow.query
    def get_status(self) -> JobStatus:
        """A snapshot of the job; never mutates state."""
        return status_of(self._job_id, self._req, self._s)

    @workflow.update
    def answer(self, inp: HumanInput) -> str:
        """Answer the pending question; acknowledged once recorded."""
        self._reply = inp.text
        return f"answer recorded for: {self._s.pending_question}"

    @answer.validator
    def _validate_answer(self, inp: HumanInput) -> None:
        if self._s.pending_question is None or self._reply is not None:
            raise ValueError("no question is pending")

    @workflow.update
    def approve(self, inp: WriteDecision) -> str:
        """Approve a write that requires approval; it commits once the answer is verified."""
        return decide(self._s, inp, approved=True, event=self._event)

    @workflow.update
    def reject(self, inp: WriteDecision) -> str:
        """Reject a write that requires approval; it is never made."""
        return decide(self._s, inp, approved=False, event=self._event)

    @approve.validator
    @reject.validator
    def _validate_decision(self, inp: WriteDecision) -> None:
        check_decision(self._s, inp)

    @workflow.signal
    def answer_signal(self, inp: HumanInput) -> None:
        """Fire-and-forget answer; ignored when no question is pending."""
        if self._s.pending_question is not None and self._reply is None:
            self._reply = inp.text
