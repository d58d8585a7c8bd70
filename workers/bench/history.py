"""History sizes for ``keel bench``: per job, split into parts, and over continue-as-new runs.

Sizes come from ``fetch_history``: the sum of each event's protobuf ``ByteSize()``, split into
parts by ``history_parts``.
"""

from __future__ import annotations

import asyncio
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

from temporalio.api.enums.v1 import EventType
from temporalio.api.history.v1 import HistoryEvent
from temporalio.client import Client, WorkflowExecution

from keel.workers.bench.measure import spread
from keel.workflows.types import AgentLoopInput

HISTORY_PARTS = ("payloads", "metadata", "markers", "events")
"""How ``history_parts`` splits a history's bytes (see there)."""
_PAYLOADS_TYPE = "temporal.api.common.v1.Payloads"


def history_parts(events: Sequence[HistoryEvent]) -> dict[str, int]:
    """Split a history's bytes into what the workflow sent and what Temporal records anyway.

    - ``payloads``: workflow and activity inputs and results (and failure details);
    - ``metadata``: what an operator reads in the UI: summaries and details
      (``user_metadata``), search attributes at start and every upsert event;
    - ``markers``: marker events (``workflow.patched``, local activities);
    - ``events``: everything else, the bookkeeping every workflow of that shape pays.

    Sizes are each part's ``ByteSize()``, so a field's own few bytes of protobuf framing
    count under ``events``.
    """
    parts = dict.fromkeys(HISTORY_PARTS, 0)
    for event in events:
        size = event.ByteSize()
        if event.event_type == EventType.EVENT_TYPE_MARKER_RECORDED:
            parts["markers"] += size
            continue
        if event.event_type == EventType.EVENT_TYPE_UPSERT_WORKFLOW_SEARCH_ATTRIBUTES:
            parts["metadata"] += size
            continue
        attrs = getattr(event, event.WhichOneof("attributes") or "", None)
        metadata = event.user_metadata.ByteSize()
        payloads = 0
        if attrs is not None:
            for fd, value in attrs.ListFields():
                if fd.message_type is None:
                    continue
                if fd.message_type.full_name == _PAYLOADS_TYPE:
                    payloads += value.ByteSize()
                elif fd.name == "search_attributes":
                    metadata += value.ByteSize()
        parts["payloads"] += payloads
        parts["metadata"] += metadata
        parts["events"] += size - payloads - metadata
    return parts


@dataclass
class HistoryStats:
    """Size of one run's history."""

    events: int
    bytes: int
    activities: int
    history: Sequence[HistoryEvent]
    parts: dict[str, int] = field(default_factory=dict)
    """``history_parts`` of the history."""


async def history_stats(
    client: Client, workflow_id: str, run_id: str | None = None
) -> HistoryStats:
    """Fetch one run's history (the latest run without ``run_id``) and measure it."""
    history = await client.get_workflow_handle(workflow_id, run_id=run_id).fetch_history()
    events = history.events
    return HistoryStats(
        events=len(events),
        bytes=sum(e.ByteSize() for e in events),
        activities=sum(
            e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED for e in events
        ),
        history=events,
        parts=history_parts(events),
    )


async def sample_histories(
    client: Client, workflow_ids: Sequence[str], count: int
) -> dict[str, float]:
    """Mean history size per job over ``count`` of the given (single-run) workflows."""
    chosen = spread(workflow_ids, count)
    stats = await asyncio.gather(*(history_stats(client, wid) for wid in chosen))
    if not stats:
        return {"history_sampled": 0}
    return {
        "history_sampled": len(stats),
        "history_events_per_job": statistics.fmean(s.events for s in stats),
        "history_bytes_per_job": statistics.fmean(s.bytes for s in stats),
        "activities_per_job": statistics.fmean(s.activities for s in stats),
    } | {
        f"history_{part}_bytes_per_job": statistics.fmean(s.parts[part] for s in stats)
        for part in HISTORY_PARTS
    }


@dataclass
class RunFigures:
    """One run of a continued-as-new job."""

    run_id: str
    stats: HistoryStats
    start_iteration: int | None
    iterations: int = 0


async def run_chain(
    client: Client, job_id: str, final_iterations: int | None
) -> tuple[list[RunFigures], int]:
    """Every run of the job in order, found by following continue-as-new from the first run.

    Runs are listed by workflow ID; the earliest listed run is walked back (in case visibility
    lags) to the run that was not continued from another, then forward through each run's
    ``ContinuedAsNew`` event.

    Returns:
        The runs, and how many runs visibility listed.
    """
    listed = await _list_runs(client, job_id)
    walker = _RunWalker(client, job_id)
    first = await walker.back(listed[0].run_id if listed else "")
    runs = await walker.forward(first)
    _count_iterations(runs, final_iterations)
    return runs, len(listed)


async def _list_runs(client: Client, job_id: str) -> list[WorkflowExecution]:
    listed: list[WorkflowExecution] = []
    for _ in range(50):
        query = f"WorkflowId = '{job_id}'"
        listed = sorted([e async for e in client.list_workflows(query)], key=lambda e: e.start_time)
        if listed:
            break
        await asyncio.sleep(0.2)
    return listed


class _RunWalker:
    """Walks one job's continue-as-new chain, fetching each run's history once."""

    def __init__(self, client: Client, job_id: str) -> None:
        self.client, self.job_id = client, job_id
        self.cache: dict[str, HistoryStats] = {}

    async def stats(self, run_id: str) -> HistoryStats:
        if run_id not in self.cache:
            self.cache[run_id] = await history_stats(self.client, self.job_id, run_id)
        return self.cache[run_id]

    async def back(self, run_id: str) -> str:
        """The run the chain through ``run_id`` started with ("" for no run)."""
        while run_id:
            history = (await self.stats(run_id)).history
            started = history[0].workflow_execution_started_event_attributes
            if not started.continued_execution_run_id:
                break
            if started.continued_execution_run_id in self.cache:
                break
            run_id = started.continued_execution_run_id
        return run_id

    async def forward(self, run_id: str) -> list[RunFigures]:
        """``run_id`` and every run continued from it, in order."""
        runs: list[RunFigures] = []
        while run_id and all(r.run_id != run_id for r in runs):
            stats = await self.stats(run_id)
            runs.append(RunFigures(run_id, stats, await start_iteration(self.client, stats)))
            last = stats.history[-1]
            run_id = last.workflow_execution_continued_as_new_event_attributes.new_execution_run_id
        return runs


def _count_iterations(runs: list[RunFigures], final_iterations: int | None) -> None:
    """Each run's iterations: up to the next run's start, or its verify calls when unknown."""
    ends = [r.start_iteration for r in runs[1:]] + [final_iterations]
    for run, end in zip(runs, ends, strict=True):
        if run.start_iteration is not None and end is not None:
            run.iterations = end - run.start_iteration
        else:
            run.iterations = sum(
                e.activity_task_scheduled_event_attributes.activity_type.name == "verify_draft"
                for e in run.stats.history
            )


async def start_iteration(client: Client, stats: HistoryStats) -> int | None:
    """The iteration a run started at, from the ``AgentLoopInput`` it was started with."""
    payloads = stats.history[0].workflow_execution_started_event_attributes.input.payloads
    try:
        [inp] = await client.data_converter.decode(payloads, [AgentLoopInput])
    except Exception:  # noqa: BLE001 - an input this build cannot read falls back to counting
        return None
    return inp.state.iteration if inp.state is not None else 0
