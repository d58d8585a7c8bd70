"""Dry-run-then-commit writes (issue 16): a destructive tool's write waits for a verified answer.

Deterministic orchestration. The act phase sends every tool call as a dry run
(``ToolCall.dry_run``); a destructive tool answers with a
preview and changes nothing, and ``record_preview`` keeps the write in ``LoopState.writes``
(shown in status and the UI). When the verifier accepts the answer, ``WriteCommitter`` waits for
a person's decision on the writes that require approval (stop-and-ask: ``approve`` and
``reject`` updates, ``approval_timeout_seconds``), then commits what may commit: the same call,
same ``step_key`` and so the same op_key, without ``dry_run``. A job that ends any other way
commits nothing (``discard_open``), and its result says so write by write.
"""

from __future__ import annotations

from collections.abc import Callable

from temporalio import workflow
from temporalio.exceptions import ActivityError, ApplicationError
from temporalio.exceptions import TimeoutError as TimeoutFailure

with workflow.unsafe.imports_passed_through():
    from keel.activities import errors
    from keel.activities.types import ToolCall, ToolResult
    from keel.workflows import policies
    from keel.workflows._budget import Ledger
    from keel.workflows._calling import call_tool
    from keel.workflows._state import JobFailure, raise_if_cancelled
    from keel.workflows.types import (
        TERMINAL_STATES,
        WRITE_OPEN,
        JobRequest,
        JobState,
        LoopState,
        PendingWrite,
        WriteDecision,
    )

Event = Callable[[str, str], None]


def record_preview(state: LoopState, call: ToolCall, result: ToolResult, event: Event) -> str:
    """Keep a previewed write in the job's state; return the observation the planner reads.

    Args:
        state: The job's state; the write is added to ``writes`` (a step run again replaces
            its earlier preview: one step is one write).
        call: The dry-run call (its ``step_key`` is the write's ID and its op_key's suffix).
        result: The tool's preview.
        event: Records a job event.

    Returns:
        The preview, saying when the write will be made.
    """
    write = PendingWrite(
        id=call.step_key,
        tool=call.tool,
        args=call.args,
        preview=result.content,
        requires_approval=result.requires_approval,
    )
    state.writes = [*(w for w in state.writes if w.id != write.id), write]
    when = "after approval and a verified answer" if write.requires_approval else "once verified"
    event("write_previewed", f"{write.tool} {write.id}: commits {when}")
    return f"[preview, not done yet; commits {when}] {result.content}"


def check_decision(state: LoopState, inp: WriteDecision) -> None:
    """Refuse a person's decision on ``inp.write_id`` that cannot be taken now.

    Raises:
        ValueError: If the job has ended, or the write does not exist, does not require
            approval or was already decided; the update is then rejected, nothing recorded.
    """
    if state.state in TERMINAL_STATES:
        raise ValueError("the job has ended")
    write = next((w for w in state.writes if w.id == inp.write_id), None)
    if write is None:
        known = ", ".join(w.id for w in state.writes if w.requires_approval) or "none"
        raise ValueError(f"no write {inp.write_id!r} (writes requiring approval: {known})")
    if not write.requires_approval:
        raise ValueError(f"write {write.id!r} ({write.tool}) does not require approval")
    if write.status != "previewed":
        raise ValueError(f"write {write.id!r} is already {write.status}")


def decide(state: LoopState, inp: WriteDecision, *, approved: bool, event: Event) -> str:
    """Record a person's decision (the validator has run ``check_decision``).

    Returns:
        The acknowledgement the update returns.
    """
    write = next(w for w in state.writes if w.id == inp.write_id)
    write.status = "approved" if approved else "rejected"
    write.detail = inp.reason[:300] or f"{write.status} by a person"
    event(f"write_{write.status}", f"{write.tool} {write.id}")
    if approved:
        return f"write {write.id} approved; it commits once the answer is verified"
    return f"write {write.id} rejected; it will not be made"


KEPT_CLOSED = 20
"""Writes that are done (made, rejected, discarded) a job keeps for its status and result; the
open ones are always kept. Bounds the state a long job carries across continue-as-new."""


def supersede_open(state: LoopState) -> None:
    """The verifier rejected the draft: the writes previewed for it are never made.

    The next iteration plans again, and a write it still needs is previewed again, under its
    own step ID. Keeps the open writes and the newest ``KEPT_CLOSED`` done ones.
    """
    for write in state.writes:
        if write.status in WRITE_OPEN:
            write.status = "discarded"
            write.detail = "not made: the draft it served was rejected, and the job planned again"
    done = [w.id for w in state.writes if w.status not in WRITE_OPEN][-KEPT_CLOSED:]
    state.writes = [w for w in state.writes if w.status in WRITE_OPEN or w.id in done]


def discard_open(state: LoopState, outcome: str) -> None:
    """Mark every write that did not commit as never made: the job ended ``outcome``."""
    for write in state.writes:
        if write.status in WRITE_OPEN:
            write.status = "discarded"
            write.detail = f"not made: the job ended {outcome} before it was committed"


class WriteCommitter:
    """Commits a job's writes once its answer is verified."""

    def __init__(
        self,
        req: JobRequest,
        state: LoopState,
        ledger: Ledger,
        event: Event,
        set_state: Callable[[JobState], None],
    ) -> None:
        self._req, self._s, self._ledger = req, state, ledger
        self._event, self._set_state = event, set_state

    async def commit(self) -> None:
        """Wait for the approvals the writes need, then commit each write that may commit.

        Commits were paid for when they were previewed (a tool call and a step each), so
        only the wall clock and the tool's retry budget limit them here.

        Raises:
            BudgetExhausted: When the wall-clock budget ran out before a commit.
            JobFailure: When a commit failed for good; writes not yet made are then
                discarded by ``discard_open``.
        """
        if self._undecided():
            await self._await_approvals()
        failed: list[str] = []
        for write in self._s.writes:
            if write.status == "approved" or (
                write.status == "previewed" and not write.requires_approval
            ):
                self._set_state("acting")
                if not await self._commit(write):
                    failed.append(f"{write.tool} {write.id}: {write.detail}")
        if failed:
            raise JobFailure(errors.TOOL_FAILED, "write failed: " + "; ".join(failed)[:500])

    def _undecided(self) -> list[PendingWrite]:
        return [w for w in self._s.writes if w.requires_approval and w.status == "previewed"]

    async def _await_approvals(self) -> None:
        """Stop and ask: wait for a decision on every write that needs one, or expire them."""
        self._set_state("waiting_for_input")
        self._event("approval_needed", ", ".join(w.id for w in self._undecided())[:200])
        asked_at = workflow.now()
        try:
            await workflow.wait_condition(
                lambda: not self._undecided(), timeout=self._req.approval_timeout_seconds
            )
        except TimeoutError:
            for write in self._undecided():
                write.status = "expired"
                write.detail = (
                    f"no decision within {self._req.approval_timeout_seconds:g} s; not made"
                )
                self._event("write_expired", f"{write.tool} {write.id}")
        # As with a question: time waiting for a person is not the job's work.
        self._s.counters.waited_seconds += (workflow.now() - asked_at).total_seconds()

    async def _commit(self, write: PendingWrite) -> bool:
        """Make one write; True when it is made (or was already, by an earlier attempt)."""
        call = ToolCall(
            tenant=self._req.tenant,
            step_key=write.id,
            tool=write.tool,
            args=write.args,
            allowed_tools=self._req.tools,
        )
        attempts = self._ledger.attempts_for(write.tool, policies.TOOL_ATTEMPTS)
        try:
            result = await call_tool(call, self._ledger, attempts, f"commit {write.tool}")
        except ActivityError as err:
            raise_if_cancelled(err)
            cause = err.cause
            write.status = "failed"
            if isinstance(cause, ApplicationError):
                write.detail = f"{cause.type}: {cause.message}"[:300]
            else:
                timed_out = isinstance(cause, TimeoutFailure)
                write.detail = "timed out" if timed_out else str(cause)[:300]
            self._event("write_failed", f"{write.tool} {write.id}")
            return False
        self._ledger.charge_retries(write.tool, result.attempt - 1)
        write.status = "committed"
        write.detail = result.content[:300]
        self._event("write_committed", f"{write.tool} {write.id}")
        return True
