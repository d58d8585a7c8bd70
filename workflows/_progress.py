"""A job's progress stream: ``JobProgress`` events on a Temporal workflow stream.

Deterministic. Publishing appends to the workflow's in-memory log and adds no history event;
readers long-poll the log with an update and read a closed job's log with a query
(``temporalio.contrib.workflow_streams``), which is what ``GET /v1/jobs/{id}/events`` and
``keel watch`` do. Offsets are global and only grow, across continue-as-new too: the last
CARRIED events and the next offset travel in ``LoopState``, so a reader that resumes from an
offset it saw before the new run still finds what it missed.
"""

from __future__ import annotations

from datetime import datetime

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from temporalio.contrib.workflow_streams import WorkflowStream, WorkflowStreamState

    from keel.workflows.types import PROGRESS_TOPIC, JobProgress, JobUsage, LoopState

RETAINED = 500
"""Events a run keeps for readers; older ones are dropped from the workflow's memory (a reader
that far behind restarts from the oldest kept)."""
CARRIED = 20
"""Events handed to the next run at continue-as-new (they ride in its input, so few)."""
MAX_DETAIL_CHARS = 200


class ProgressStream:
    """The workflow side of a job's progress stream.

    Must be constructed from the workflow's ``@workflow.init``: the stream registers its poll
    update and query handlers there, before any poll can arrive.

    Args:
        state: The job's state, whose carried events and offset seed the stream.
    """

    def __init__(self, state: LoopState) -> None:
        carried = state.progress[-CARRIED:]
        self._base = max(0, state.progress_next - len(carried))
        self._stream = WorkflowStream(prior_state=WorkflowStreamState(base_offset=self._base))
        self._topic = self._stream.topic(PROGRESS_TOPIC, type=JobProgress)
        for item in carried:
            self._topic.publish(item)
        self._next = self._base + len(carried)

    def publish(self, state: LoopState, at: datetime, kind: str, detail: str = "") -> None:
        """Publish the job's position now, with what just happened, and remember it in state."""
        item = JobProgress(
            at=at,
            kind=kind,
            detail=detail[:MAX_DETAIL_CHARS],
            state=state.state,
            iteration=state.iteration,
            usage=JobUsage.of(state.counters),
        )
        self._topic.publish(item)
        self._next += 1
        state.progress = [*state.progress[-(CARRIED - 1) :], item]
        state.progress_next = self._next
        if self._next - self._base > RETAINED + CARRIED:
            self._base = self._next - RETAINED
            self._stream.truncate(self._base)

    async def close(self) -> None:
        """Release waiting readers and wait for every handler; call before the run ends.

        A long-polling reader is an in-flight update: the run must neither complete nor
        continue as new under it. Readers then follow the next run, or read the closed job's
        remaining events with a query.
        """
        self._stream.detach_pollers()
        await workflow.wait_condition(workflow.all_handlers_finished)
