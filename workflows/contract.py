"""What a client may call on an agent job: ``AgentLoopWorkflow``'s run, query, update and signal.

Deterministic and I/O-free: a declaration only. Clients make typed calls through this class
(``handle.query(AgentLoop.get_status)``) instead of importing the workflow itself, whose module
pulls in every activity's code and the ``openai`` SDK; with it, ``keel status`` starts without
them. The names and payload types are the wire contract with ``AgentLoopWorkflow`` (same
workflow type name, same handler names); ``tests/workflows/test_contract.py`` holds the two
together, so neither can change alone. Workers register ``AgentLoopWorkflow``, never this class.
"""

from __future__ import annotations

from temporalio import workflow

from keel.workflows import SESSION_WORKFLOW_TYPE, WORKFLOW_TYPE
from keel.workflows.session_types import (
    SessionInput,
    SessionMessage,
    SessionStatus,
    TurnAccepted,
)
from keel.workflows.types import (
    AgentLoopInput,
    HumanInput,
    JobResult,
    JobStatus,
    WriteDecision,
)

__all__ = ["AgentLoop", "Session"]


def _not_callable() -> TypeError:
    return TypeError("AgentLoop is a contract: call AgentLoopWorkflow through a Temporal client")


@workflow.defn(name=WORKFLOW_TYPE)
class AgentLoop:
    """The client's view of ``AgentLoopWorkflow``; calling its methods directly is an error."""

    @workflow.run
    async def run(self, inp: AgentLoopInput) -> JobResult:
        """Run the job to its outcome."""
        raise _not_callable()

    @workflow.query
    def get_status(self) -> JobStatus:
        """A snapshot of the job."""
        raise _not_callable()

    @workflow.update
    def answer(self, inp: HumanInput) -> str:
        """Answer the pending question; refused when none is pending."""
        raise _not_callable()

    @workflow.signal
    def answer_signal(self, inp: HumanInput) -> None:
        """Answer the pending question without an acknowledgement."""
        raise _not_callable()

    @workflow.update
    def approve(self, inp: WriteDecision) -> str:
        """Approve a write that requires approval; refused when it is not awaiting one."""
        raise _not_callable()

    @workflow.update
    def reject(self, inp: WriteDecision) -> str:
        """Reject a write that requires approval; refused when it is not awaiting one."""
        raise _not_callable()


@workflow.defn(name=SESSION_WORKFLOW_TYPE)
class Session:
    """The client's view of ``SessionWorkflow``; calling its methods directly is an error."""

    @workflow.run
    async def run(self, inp: SessionInput) -> SessionStatus:
        """Run the session's turns until it ends or idles out."""
        raise _not_callable()

    @workflow.update
    async def send_message(self, message: SessionMessage) -> TurnAccepted:
        """Queue a message as a turn (or answer the turn's question); idempotent per ID."""
        raise _not_callable()

    @workflow.update
    def end(self) -> SessionStatus:
        """End the session after the turn in progress."""
        raise _not_callable()

    @workflow.query
    def get_session(self) -> SessionStatus:
        """A snapshot of the session."""
        raise _not_callable()
