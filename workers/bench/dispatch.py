"""When each job's tasks were handed to a worker, read back from its history.

Owns the figures of the priority section of ``keel bench`` and of the tests that check
Temporal's task queue priority and fairness for Keel jobs. Temporal stamps a workflow task's
``WorkflowTaskScheduled`` and ``WorkflowTaskStarted`` events (and an activity's ``Scheduled``
and ``Started``) with the server's clock, so the order in which the matcher dispatched jobs, and
how long each waited, are read after the run from histories, never from this process's clock.
The first workflow task is the one that matters: it is queued when the job starts, so its wait
is the time the job spent behind other work before any worker looked at it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp
from temporalio.api.enums.v1 import EventType
from temporalio.api.history.v1 import HistoryEvent
from temporalio.client import Client
from temporalio.service import RPCError, RPCStatusCode

from keel.workers.bench.measure import percentile

CLOSE_EVENTS = frozenset(
    {
        EventType.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED,
        EventType.EVENT_TYPE_WORKFLOW_EXECUTION_FAILED,
        EventType.EVENT_TYPE_WORKFLOW_EXECUTION_TIMED_OUT,
        EventType.EVENT_TYPE_WORKFLOW_EXECUTION_TERMINATED,
        EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CANCELED,
        EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CONTINUED_AS_NEW,
    }
)
"""Events that end a run."""
FETCH_CONCURRENCY = 16
"""Histories fetched at once: enough to read a thousand in seconds without crowding the server."""


@dataclass(frozen=True)
class Dispatch:
    """When one job's first workflow task and first activity were queued and dispatched.

    Times are the server's, in seconds since the epoch; None where the history does not hold
    the event yet (a task still queued, an activity still running).
    """

    job_id: str
    group: str
    """What the job stands for in the run: its mode, or its tenant."""
    scheduled: float
    started: float | None
    activity_scheduled: float | None
    activity_started: float | None
    closed: float | None

    @property
    def task_wait_s(self) -> float | None:
        """Schedule-to-start of the first workflow task: the job's wait in the queue."""
        return None if self.started is None else self.started - self.scheduled

    @property
    def activity_wait_s(self) -> float | None:
        """Schedule-to-start of the job's first activity."""
        if self.activity_started is None or self.activity_scheduled is None:
            return None
        return self.activity_started - self.activity_scheduled


def _seconds(stamp: Timestamp) -> float:
    return stamp.seconds + stamp.nanos / 1e9


def dispatch_of(job_id: str, group: str, events: Sequence[HistoryEvent]) -> Dispatch:
    """Read a job's ``Dispatch`` from the events of its first run.

    Args:
        job_id: The job (workflow) ID.
        group: Its label in the run's figures.
        events: Its history, oldest first.

    Returns:
        The first workflow task's and the first activity's queueing and dispatch times.

    Raises:
        ValueError: If the history holds no workflow task (it is not a workflow's history).
    """
    times: dict[str, float] = {}
    first_activity: int | None = None
    kinds = {
        EventType.EVENT_TYPE_WORKFLOW_TASK_SCHEDULED: "scheduled",
        EventType.EVENT_TYPE_WORKFLOW_TASK_STARTED: "started",
    }
    for event in events:
        kind = kinds.get(event.event_type)
        if kind is not None:
            times.setdefault(kind, _seconds(event.event_time))
        elif event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
            if first_activity is None:
                first_activity = event.event_id
                times["activity_scheduled"] = _seconds(event.event_time)
        elif event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED:
            # The started event is written when the attempt ends, but stamped when it began.
            if event.activity_task_started_event_attributes.scheduled_event_id == first_activity:
                times["activity_started"] = _seconds(event.event_time)
        elif event.event_type in CLOSE_EVENTS:
            times.setdefault("closed", _seconds(event.event_time))
    if "scheduled" not in times:
        raise ValueError(f"{job_id}: no workflow task in its history")
    return Dispatch(
        job_id=job_id,
        group=group,
        scheduled=times["scheduled"],
        started=times.get("started"),
        activity_scheduled=times.get("activity_scheduled"),
        activity_started=times.get("activity_started"),
        closed=times.get("closed"),
    )


async def fetch_dispatches(client: Client, groups: Mapping[str, Sequence[str]]) -> list[Dispatch]:
    """Fetch the history of every job in ``groups`` (label to job IDs) and read its dispatch."""
    gate = asyncio.Semaphore(FETCH_CONCURRENCY)

    async def one(job_id: str, group: str) -> Dispatch:
        async with gate:
            history = await client.get_workflow_handle(job_id).fetch_history()
        return dispatch_of(job_id, group, history.events)

    return await asyncio.gather(
        *(one(job_id, group) for group, ids in groups.items() for job_id in ids)
    )


async def terminate_open(client: Client, dispatches: Sequence[Dispatch], reason: str) -> int:
    """Terminate the jobs among ``dispatches`` that had not ended; returns how many.

    A run measures what it needs (the interactive jobs, the late tenant's) and ends the rest
    of its backlog rather than wait for it, so the next run does not queue behind it.
    """
    gate = asyncio.Semaphore(FETCH_CONCURRENCY)
    open_ids = [d.job_id for d in dispatches if d.closed is None]

    async def one(job_id: str) -> None:
        async with gate:
            try:
                await client.get_workflow_handle(job_id).terminate(reason)
            except RPCError as err:
                # It may have ended since its history was read: nothing left to end.
                if err.status != RPCStatusCode.NOT_FOUND:
                    raise

    await asyncio.gather(*(one(j) for j in open_ids))
    return len(open_ids)


def start_ranks(dispatches: Sequence[Dispatch]) -> dict[str, int]:
    """Each job's place (1 = first) in the order the matcher dispatched first workflow tasks.

    Jobs whose first task was never dispatched come after every dispatched one, in the order
    they were queued (the order they would have been served in without priority or fairness).
    """
    order = sorted(
        dispatches,
        key=lambda d: (d.started is None, d.started or d.scheduled, d.scheduled, d.job_id),
    )
    return {d.job_id: rank for rank, d in enumerate(order, start=1)}


def wait_figures(dispatches: Sequence[Dispatch]) -> dict[str, Any]:
    """p50, p95 and max of the first workflow task's and first activity's schedule-to-start."""
    figures: dict[str, Any] = {"jobs": len(dispatches)}
    for name, waits in (
        ("task", [d.task_wait_s for d in dispatches]),
        ("activity", [d.activity_wait_s for d in dispatches]),
    ):
        known = sorted(w for w in waits if w is not None)
        figures[f"{name}_measured"] = len(known)
        figures[f"{name}_wait_p50_s"] = percentile(known, 50)
        figures[f"{name}_wait_p95_s"] = percentile(known, 95)
        figures[f"{name}_wait_max_s"] = known[-1] if known else None
    return figures


def overtaken(
    dispatches: Sequence[Dispatch], group: str, other: str, *, activity: bool = False
) -> list[int]:
    """For each job of ``group``, how many jobs of ``other`` queued before it started after it.

    The number of waiting jobs it cut in front of: zero for every job under FIFO dispatch.
    With ``activity``, of the jobs' first activities instead of their first workflow tasks.
    """

    def times(d: Dispatch) -> tuple[float | None, float | None]:
        return (d.activity_scheduled, d.activity_started) if activity else (d.scheduled, d.started)

    others = [times(d) for d in dispatches if d.group == other]
    counts: list[int] = []
    for job in dispatches:
        queued, started = times(job)
        if job.group != group or queued is None or started is None:
            continue
        counts.append(
            sum(
                1
                for o_queued, o_started in others
                if o_queued is not None
                and o_queued < queued
                and (o_started is None or o_started > started)
            )
        )
    return counts


def share_while_waiting(dispatches: Sequence[Dispatch], group: str) -> float | None:
    """The fraction of first workflow tasks dispatched to ``group`` while it had jobs queued.

    The window runs from the first of ``group``'s jobs being queued to the last of them being
    dispatched; every first task dispatched in it counts. A tenant's fair share with equal
    weights and two busy tenants is a half; with weight ``w`` against weight 1, ``w / (w + 1)``.
    None if none of ``group``'s jobs was dispatched.
    """
    mine = [d for d in dispatches if d.group == group]
    started = [d.started for d in mine if d.started is not None]
    if not started:
        return None
    opened, closed = min(d.scheduled for d in mine), max(started)
    window = [d for d in dispatches if d.started is not None and opened <= d.started <= closed]
    return sum(d.group == group for d in window) / len(window)
