"""A session: one durable conversation per tenant and session key, its turns run one at a time.

Deterministic orchestration (issue 15). Each user message is a turn: an update (sent with
update-with-start, so the first message opens the session) that a message ID makes idempotent.
Turns run in the order they were accepted, each as a child agent job with its own job ID, UI
page, budget and result, given the conversation so far: a rolling summary of older turns and the
last few verbatim. A message that arrives while the turn in progress waits for an answer is that
answer. After a turn its exchange joins the recent ones, and the oldest is folded into the
summary by the summariser (a fast-tier call, charged to the session). Session budgets (turns,
tokens, dollars) are checked before each turn, whose own budget is cut to what the session has
left, so a session cannot overrun; an exhausted session refuses new messages and stays readable
until it has been idle for its idle timeout. The state is bounded and carried across
continue-as-new, so a session of any length keeps a flat history per run and a flat context.
"""

from __future__ import annotations

import asyncio
import math
from datetime import timedelta
from typing import Literal

from temporalio import workflow
from temporalio.exceptions import ActivityError, ApplicationError, ChildWorkflowError

with workflow.unsafe.imports_passed_through():
    from pydantic import ValidationError

    from keel.activities.llm import LLMActivities
    from keel.activities.sessions import SessionActivities, SessionOutputs, SessionSnapshot
    from keel.activities.types import (
        EXCHANGE_CHARS,
        MIN_OUTPUT_TOKENS,
        Exchange,
        Observation,
        SummaryInput,
    )
    from keel.workflows import policies
    from keel.workflows import search_attributes as sa
    from keel.workflows.agent_loop import AgentLoopWorkflow
    from keel.workflows.session_types import (
        MAX_QUEUED,
        MAX_RECENT_EXCHANGES,
        MAX_SEEN_MESSAGES,
        MAX_TURN_RECORDS,
        SESSION_BUDGET_EXHAUSTED,
        SESSION_BUSY,
        SESSION_ENDED,
        SessionBudgetName,
        SessionInput,
        SessionMessage,
        SessionState,
        SessionStatus,
        TurnAccepted,
        TurnRecord,
        session_key_of,
        turn_job_id,
    )
    from keel.workflows.types import (
        QUESTION_SIGNAL,
        AgentLoopInput,
        Budget,
        HumanInput,
        JobRequest,
        JobResult,
    )

MIN_TURN_TOKENS = 4_000
"""A turn needs at least this many of the session's tokens to be worth starting."""
MIN_TURN_USD = 0.0001
SNAPSHOT_KEEP_SECONDS = 7 * 86_400
"""How long an ended session's last snapshot stays readable (as its turns' outputs would)."""
SNAPSHOT_MARGIN_SECONDS = 3_600
"""Kept this much longer than the session can stay alive without writing another."""
FOLD_SHARE = 0.1
"""Share of the session's dollars left that a fold running beside a turn may spend."""
FOLD_TOKENS = 2_000
"""Session tokens a fold running beside a turn reserves (its prompt and its summary)."""


@workflow.defn
class SessionWorkflow:
    """Owns one conversation: queues its messages and runs them as turns, in order."""

    @workflow.init
    def __init__(self, inp: SessionInput) -> None:
        self._req = inp.request
        self._inp = inp
        self._s = inp.state or SessionState()
        self._current: TurnRecord | None = None
        self._ending = False
        self._changes = 0
        """Changes a reader of the status would see; the snapshot writer catches up with it."""
        self._written = 0
        self._writer: asyncio.Task[None] | None = None

    @workflow.run
    async def run(self, inp: SessionInput) -> SessionStatus:
        """Run turns as messages arrive, until the session ends or idles out."""
        self._changes = 1  # the first snapshot: the session as it starts (or continues)
        self._writer = asyncio.create_task(self._write_snapshots())
        while True:
            idle = timedelta(seconds=self._req.budget.idle_timeout_seconds)
            try:
                await workflow.wait_condition(self._work_waiting, timeout=idle)
            except TimeoutError:
                self._s.phase = "ended"
                self._changed()
                await self._expire_outputs()
                break
            if self._ending:
                self._s.phase = "ended"
                self._changed()
                break
            message = self._s.pending.pop(0)
            exhausted = self._exhausted()
            if exhausted is not None:
                self._refuse(message, exhausted)
                continue
            await self._turn(message)
            if workflow.info().is_continue_as_new_suggested() and not self._s.pending:
                await workflow.wait_condition(self._settled)
                self._s.runs += 1
                workflow.continue_as_new(self._inp.model_copy(update={"state": self._s}))
        await workflow.wait_condition(self._settled)
        return self.get_session()

    def _settled(self) -> bool:
        """Every handler has finished and the snapshot shows the state as it is."""
        return workflow.all_handlers_finished() and self._written == self._changes

    def _changed(self) -> None:
        """The state a reader sees has changed: the snapshot writer will write it."""
        if self._written or self._changes:  # 0 and 0: no writer (before ``status-snapshot``)
            self._changes += 1

    async def _write_snapshots(self) -> None:
        """Write the session's status to Redis whenever it has changed, latest first.

        Changes made while a write is under way are coalesced into the next one. A failed
        write is skipped: readers that find no snapshot, or an old one, may ask the query.
        """
        while True:
            await workflow.wait_condition(lambda: self._written != self._changes)
            seen = self._changes
            status = self.get_session()
            ended = status.phase == "ended"
            idle = math.ceil(self._req.budget.idle_timeout_seconds)
            ttl = SNAPSHOT_KEEP_SECONDS if ended else idle
            snapshot = SessionSnapshot(
                tenant=self._req.tenant,
                session_id=status.session_id,
                status_json=status.model_dump_json(),
                ttl_seconds=ttl + SNAPSHOT_MARGIN_SECONDS,
            )
            try:
                await workflow.execute_local_activity_method(
                    SessionActivities.write_session_snapshot,
                    snapshot,
                    **policies.SESSION_SNAPSHOT,
                )
            except ActivityError:
                pass
            self._written = seen

    async def _expire_outputs(self) -> None:
        """An idle session has ended: its turns' stored outputs go with it."""
        prefix = turn_job_id(workflow.info().workflow_id, 0).removesuffix("0")
        outputs = SessionOutputs(tenant=self._req.tenant, job_prefix=prefix)
        config = policies.STORE.copy()
        config["summary"] = "expire stored outputs"
        try:
            await workflow.execute_activity_method(
                SessionActivities.expire_session_outputs, outputs, **config
            )
        except ActivityError:
            pass  # they expire on their own TTL (7 days) anyway

    def _work_waiting(self) -> bool:
        return bool(self._s.pending) or self._ending

    async def _turn(self, message: SessionMessage) -> None:
        record = self._record(message.message_id)
        record.state = "running"
        self._s.phase = "running"
        self._current = record
        # The oldest exchange is folded into the summary while the turn runs (a summary call
        # takes far less time than a turn), so the next turn never waits for it. The turn is
        # given the conversation as it stands: the fold changes it only once the turn is over.
        folding = self._start_fold()
        budget = self._turn_budget(folding is not None)
        self._changed()
        request = JobRequest(
            goal=message.text,
            tenant=self._req.tenant,
            user=self._req.user,
            tools=self._req.tools,
            docs_dir=self._req.docs_dir,
            budget=budget,
            tier=self._req.tier,
            cache=self._req.cache,
            mode=self._req.mode,
            conversation=self._s.conversation.model_copy(deep=True),
            notify_workflow=workflow.info().workflow_id,
            notify_questions=True,
        )
        try:
            result: JobResult = await workflow.execute_child_workflow(
                AgentLoopWorkflow.run,
                AgentLoopInput(request=request, job_slot=self._inp.job_slot),
                id=record.job_id,
                static_summary=f"turn {record.turn}: {message.text[:80]}",
                # As a job started by a client gets them, and the session it belongs to, so an
                # operator finds a session's turns with ``KeelSession = 'key'``.
                search_attributes=sa.at_start(
                    request, session=session_key_of(workflow.info().workflow_id)
                ),
            )
        except ChildWorkflowError as err:
            record.outcome, record.answer = "failed", f"the turn failed: {err.cause}"[:500]
            # A failed job carries its result (usage included) as the failure's detail: the
            # session pays for what the turn spent before it failed.
            failed = _failed_result(err)
            if failed is not None:
                record.usage = failed.usage
                self._charge(failed.usage.tokens, failed.usage.cost_usd)
        else:
            record.outcome, record.answer, record.usage = (
                result.outcome,
                result.answer,
                result.usage,
            )
            self._charge(result.usage.tokens, result.usage.cost_usd)
        record.state = "done"
        self._current = None
        self._s.usage.turns += 1
        self._s.phase = "idle"
        exchange = Exchange(
            user=message.text[:EXCHANGE_CHARS], assistant=(record.answer or "")[:EXCHANGE_CHARS]
        )
        if folding is not None:
            await folding
        self._s.conversation.recent.append(exchange)
        self._changed()

    def _start_fold(self) -> asyncio.Task[None] | None:
        """Fold the oldest recent exchange into the summary, beside the turn about to run.

        Only when the recent exchanges are full: after the turn, its exchange takes the folded
        one's place, so each turn starts with at most ``MAX_RECENT_EXCHANGES`` verbatim.
        """
        if len(self._s.conversation.recent) < MAX_RECENT_EXCHANGES:
            return None
        return asyncio.create_task(self._fold(self._s.conversation.recent[0], FOLD_SHARE))

    async def _fold(self, oldest: Exchange, share: float) -> None:
        """Fold ``oldest`` (the first recent exchange) into the summary, then drop it.

        A fast-tier summariser call, charged to the session and given ``share`` of the dollars
        it has left (the turn running beside it was given the rest). When that is too little,
        or the call fails, the exchange's gist is appended to the summary instead.
        """
        conversation = self._s.conversation
        limit = self._req.summary_chars
        folded = Observation(
            step_id=f"turn-{self._s.usage.turns}",
            name="earlier turn",
            content=f"User: {oldest.user}\nAssistant: {oldest.assistant}",
        )
        gist = _clip(f"{conversation.summary} {folded.content}", limit, keep="end")
        left = (self._req.budget.max_cost_usd - self._s.usage.cost_usd) * share
        summary: str | None = None
        if left > MIN_TURN_USD:
            summary_input = SummaryInput(
                tenant=self._req.tenant,
                goal="Keep the running summary of this conversation.",
                iteration=0,
                summary=conversation.summary or None,
                fold=[folded],
                max_chars=limit,
                max_output_tokens=max(MIN_OUTPUT_TOKENS, 400),
                max_cost_usd=round(left, 8),
                cache=self._req.cache,
            )
            config = policies.LLM_CALL.copy()
            config["summary"] = "summarize conversation"
            try:
                result = await workflow.execute_activity_method(
                    LLMActivities.summarize_observations, summary_input, **config
                )
            except ActivityError:
                pass  # no summary this time: keep the exchange's gist rather than fail
            else:
                summary = _clip(result.summary, limit, keep="start")
                self._charge(result.usage.total_tokens, result.usage.cost_usd)
        conversation.summary = gist if summary is None else summary
        conversation.recent.remove(oldest)
        self._changed()

    def _charge(self, tokens: int, cost_usd: float) -> None:
        usage = self._s.usage
        usage.tokens += tokens
        usage.cost_usd = round(usage.cost_usd + cost_usd, 8)

    def _exhausted(self) -> SessionBudgetName | None:
        budget, usage = self._req.budget, self._s.usage
        if usage.turns >= budget.max_turns:
            return "max_turns"
        if budget.max_tokens - usage.tokens < MIN_TURN_TOKENS:
            return "max_tokens"
        if budget.max_cost_usd - usage.cost_usd < MIN_TURN_USD:
            return "max_cost_usd"
        return None

    def _turn_budget(self, folding: bool) -> Budget:
        """The turn's budget: its own, cut to what the session has left (a reservation).

        A fold running beside the turn has reserved its share of the session's dollars and
        ``FOLD_TOKENS`` of its tokens first.
        """
        budget, usage = self._req.budget, self._s.usage
        turn = self._req.turn_budget
        usd_left = budget.max_cost_usd - usage.cost_usd
        tokens_left = budget.max_tokens - usage.tokens
        if folding:
            usd_left, tokens_left = usd_left * (1 - FOLD_SHARE), tokens_left - FOLD_TOKENS
        return turn.model_copy(
            update={
                "max_tokens": max(1, min(turn.max_tokens, tokens_left)),
                "max_cost_usd": min(turn.max_cost_usd, round(usd_left, 8)),
            }
        )

    def _refuse(self, message: SessionMessage, budget: SessionBudgetName) -> None:
        """An accepted message whose turn can no longer run: the session is exhausted."""
        self._s.phase, self._s.exhausted_budget = "exhausted", budget
        record = self._record(message.message_id)
        record.state, record.answer = "done", f"not run: session budget {budget} is exhausted"
        self._changed()

    def _record(self, message_id: str) -> TurnRecord:
        turn = self._s.seen[message_id]
        return next(r for r in self._s.turns if r.turn == turn)

    @workflow.update
    async def send_message(self, message: SessionMessage) -> TurnAccepted:
        """Accept a message: queue it as a turn, or answer the turn that asked a question.

        A message ID seen before returns what its first send returned and changes nothing.
        """
        session_id = workflow.info().workflow_id
        seen = self._s.seen.get(message.message_id)
        if seen is not None:
            record = next((r for r in self._s.turns if r.turn == seen), None)
            job_id = record.job_id if record else turn_job_id(session_id, seen)
            return TurnAccepted(
                session_id=session_id,
                turn=seen,
                job_id=job_id,
                message_id=message.message_id,
                duplicate=True,
            )
        self._s.last_message_at = workflow.now()
        current = self._current
        if current is not None and current.state == "waiting_for_input":
            # The turn in progress asked a question: this message is its answer.
            self._remember_id(message.message_id, current.turn)
            current.state = "running"
            self._changed()
            child = workflow.get_external_workflow_handle(current.job_id)
            await child.signal(AgentLoopWorkflow.answer_signal, HumanInput(text=message.text))
            return TurnAccepted(
                session_id=session_id,
                turn=current.turn,
                job_id=current.job_id,
                message_id=message.message_id,
            )
        turn = self._s.next_turn
        self._s.next_turn += 1
        self._remember_id(message.message_id, turn)
        self._s.pending.append(message)
        self._s.turns.append(
            TurnRecord(
                turn=turn,
                message_id=message.message_id,
                job_id=turn_job_id(session_id, turn),
                text=message.text[:EXCHANGE_CHARS],
            )
        )
        self._s.turns = self._s.turns[-MAX_TURN_RECORDS:]
        self._changed()
        ahead = len(self._s.pending) - 1 + (1 if self._current is not None else 0)
        return TurnAccepted(
            session_id=session_id,
            turn=turn,
            job_id=turn_job_id(session_id, turn),
            message_id=message.message_id,
            ahead=ahead,
        )

    @send_message.validator
    def _validate_message(self, message: SessionMessage) -> None:
        if message.message_id in self._s.seen:
            return  # a resend: answered from the record, whatever the session's state now
        if self._s.phase == "ended" or self._ending:
            # Typed refusals (added for the HTTP API, issue 15): it answers each with its own
            # code, and the budget's name, without reading the message text.
            raise ApplicationError("the session has ended", type=SESSION_ENDED)
        if self._s.phase == "exhausted" or (budget := self._exhausted()) is not None:
            name = self._s.exhausted_budget or budget
            raise ApplicationError(
                f"session budget {name} is exhausted", name, type=SESSION_BUDGET_EXHAUSTED
            )
        if len(self._s.pending) >= MAX_QUEUED:
            raise ApplicationError(
                f"{MAX_QUEUED} messages are already waiting; send this one later",
                type=SESSION_BUSY,
            )

    def _remember_id(self, message_id: str, turn: int) -> None:
        self._s.seen[message_id] = turn
        while len(self._s.seen) > MAX_SEEN_MESSAGES:
            del self._s.seen[next(iter(self._s.seen))]

    @workflow.signal(name=QUESTION_SIGNAL)
    def turn_question(self, question: str) -> None:
        """The turn in progress asked a question: the next message answers it."""
        if self._current is not None:
            self._current.state = "waiting_for_input"
            self._current.answer = f"question: {question}"[:EXCHANGE_CHARS]
            self._changed()

    @workflow.update
    def end(self) -> SessionStatus:
        """End the session after the turn in progress; queued messages are not run."""
        self._ending = True
        self._changed()
        status = self.get_session()
        if self._current is None:
            status.phase = "ended"  # nothing left to run: it ends as this update returns
        return status

    @workflow.query
    def get_session(self) -> SessionStatus:
        """A snapshot of the session; never waits for the turn in progress."""
        s = self._s
        return SessionStatus(
            session_id=workflow.info().workflow_id,
            tenant=self._req.tenant,
            # Asked to end with a turn still in progress (its child may have just finished,
            # not yet seen here): ``ending`` until the workflow has taken the turn's result.
            phase="ending" if self._ending and s.phase != "ended" else s.phase,
            exhausted_budget=s.exhausted_budget,
            budget=self._req.budget,
            usage=s.usage,
            summary=s.conversation.summary,
            recent=list(s.conversation.recent),
            turns=list(s.turns),
            queued=len(s.pending),
            runs=s.runs,
        )


def _clip(text: str, limit: int, *, keep: Literal["start", "end"]) -> str:
    """``text`` within ``limit`` characters, cut at a word boundary, its start or end kept."""
    text = " ".join(text.split())
    if len(text) <= limit:
        return text
    if keep == "start":
        return text[:limit].rsplit(" ", 1)[0] if " " in text[:limit] else text[:limit]
    tail = text[-limit:]
    return tail.split(" ", 1)[1] if " " in tail else tail


def _failed_result(err: ChildWorkflowError) -> JobResult | None:
    """The ``JobResult`` a failed turn attached to its failure, if it is one."""
    cause = err.cause
    details = cause.details if isinstance(cause, ApplicationError) else ()
    if not details:
        return None
    try:
        return JobResult.model_validate(details[0])
    except ValidationError:
        return None


__all__ = ["SessionWorkflow"]
