"""Measuring helpers for ``keel bench``: job runners, timed batches, percentiles, history sizes.

Every figure here is computed from samples taken during the run: latencies with
``time.perf_counter``, process CPU with ``time.process_time``, history sizes from
``fetch_history`` (the sum of each event's protobuf ``ByteSize()``), split into parts by
``history_parts``.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import statistics
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from temporalio.api.enums.v1 import EventType
from temporalio.api.history.v1 import HistoryEvent
from temporalio.client import Client

from keel.client.jobs import AgentJobs
from keel.workers._bench_bare import BareWorkflow
from keel.workers._bench_stack import process_cpu_seconds
from keel.workflows.types import AgentLoopInput, JobRequest

RunOne = Callable[[str], Awaitable[tuple[str, str]]]
"""Runs one job to its end given a unique tag; returns its workflow ID and outcome."""

COMPLETED = "completed"


def keel_runner(jobs: AgentJobs, request: JobRequest, prefix: str) -> RunOne:
    """A runner that starts ``request`` through ``AgentJobs`` and waits for its ``JobResult``."""

    async def run(tag: str) -> tuple[str, str]:
        job_id = await jobs.start(request, request_key=f"{prefix}-{tag}")
        result = await jobs.result(job_id)
        return job_id, result.outcome

    return run


def bare_runner(client: Client, task_queue: str, prefix: str) -> RunOne:
    """A runner that starts ``BareWorkflow`` directly and waits for its result."""

    async def run(tag: str) -> tuple[str, str]:
        handle = await client.start_workflow(
            BareWorkflow.run, tag, id=f"{prefix}-{tag}", task_queue=task_queue
        )
        await handle.result()
        return handle.id, COMPLETED

    return run


@dataclass
class Batch:
    """What one timed batch of jobs measured."""

    jobs: int
    wall_s: float = 0.0
    cpu_s: float = 0.0
    latencies: list[float] = field(default_factory=list)
    completed_ids: list[str] = field(default_factory=list)
    outcomes: Counter[str] = field(default_factory=Counter)
    other_cpu_s: dict[str, float] = field(default_factory=dict)
    """CPU seconds other processes (the server, the simulator) used during the batch, by name."""
    round_rates: list[float] = field(default_factory=list)
    """Jobs per second of each round absorbed, in order."""

    def absorb(self, other: Batch) -> None:
        """Add another batch of the same kind of job (a later round) to this one."""
        self.jobs += other.jobs
        self.wall_s += other.wall_s
        self.cpu_s += other.cpu_s
        self.latencies += other.latencies
        self.completed_ids += other.completed_ids
        self.outcomes += other.outcomes
        for name, seconds in other.other_cpu_s.items():
            self.other_cpu_s[name] = self.other_cpu_s.get(name, 0.0) + seconds
        if other.wall_s > 0:
            self.round_rates.append(other.jobs / other.wall_s)

    def summary(self) -> dict[str, Any]:
        """The batch's figures, as written to JSON."""
        return {
            "jobs": self.jobs,
            "completed": len(self.completed_ids),
            "outcomes": dict(self.outcomes),
            "wall_s": self.wall_s,
            "jobs_per_s": self.jobs / self.wall_s if self.wall_s > 0 else None,
            "latency_p50_s": percentile(self.latencies, 50),
            "latency_p95_s": percentile(self.latencies, 95),
            "latency_mean_s": statistics.fmean(self.latencies) if self.latencies else None,
            "cpu_s": self.cpu_s,
            "cpu_ms_per_job": self._per_job(self.cpu_s),
            **{f"{name}_cpu_ms_per_job": self._per_job(s) for name, s in self.other_cpu_s.items()},
            "all_cpu_ms_per_job": self._per_job(self.cpu_s + sum(self.other_cpu_s.values())),
            "round_jobs_per_s": self.round_rates,
        }

    def _per_job(self, seconds: float) -> float | None:
        return 1000 * seconds / self.jobs if self.jobs else None


async def run_batch(
    run_one: RunOne,
    jobs: int,
    concurrency: int,
    phase: str,
    advance: Callable[[], None] | None = None,
    probes: Mapping[str, int] | None = None,
) -> Batch:
    """Run ``jobs`` jobs with at most ``concurrency`` in flight; the next starts as one ends.

    A job that raises is counted under its exception type in ``outcomes`` instead of stopping
    the batch, so a broken build shows up in the figures rather than as a traceback. The CPU
    each process in ``probes`` (name to PID) used meanwhile goes to ``other_cpu_s``.
    """
    batch = Batch(jobs=jobs)
    counter = itertools.count()

    async def lane() -> None:
        while (i := next(counter)) < jobs:
            started = time.perf_counter()
            try:
                workflow_id, outcome = await run_one(f"{phase}{i}")
            except Exception as err:  # noqa: BLE001 - recorded as an outcome, see docstring
                workflow_id, outcome = "", f"error: {type(err).__name__}"
            batch.latencies.append(time.perf_counter() - started)
            batch.outcomes[outcome] += 1
            if outcome == COMPLETED:
                batch.completed_ids.append(workflow_id)
            if advance is not None:
                advance()

    others = {name: process_cpu_seconds(pid) for name, pid in (probes or {}).items()}
    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(lane() for _ in range(min(concurrency, jobs))))
    batch.wall_s = time.perf_counter() - wall
    batch.cpu_s = time.process_time() - cpu
    for name, before in others.items():
        after = process_cpu_seconds((probes or {})[name])
        if before is not None and after is not None:
            batch.other_cpu_s[name] = after - before
    return batch


def percentile(samples: Sequence[float], pct: int) -> float | None:
    """The ``pct``-th percentile of the samples (inclusive method); None without samples."""
    if not samples:
        return None
    if len(samples) == 1:
        return samples[0]
    return statistics.quantiles(samples, n=100, method="inclusive")[pct - 1]


def median(samples: Sequence[float]) -> float | None:
    """The median of the samples; None without samples."""
    return statistics.median(samples) if samples else None


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """``numerator / denominator``, or None when either is missing or the denominator is 0."""
    if numerator is None or denominator is None or denominator == 0 or math.isnan(denominator):
        return None
    return numerator / denominator


def spread(items: Sequence[str], count: int) -> list[str]:
    """Up to ``count`` items evenly spaced over ``items`` (first and last included)."""
    if len(items) <= count:
        return list(items)
    if count == 1:
        return [items[len(items) // 2]]
    return [items[round(k * (len(items) - 1) / (count - 1))] for k in range(count)]


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
    """
    listed = []
    for _ in range(50):
        query = f"WorkflowId = '{job_id}'"
        listed = sorted([e async for e in client.list_workflows(query)], key=lambda e: e.start_time)
        if listed:
            break
        await asyncio.sleep(0.2)
    cache: dict[str, HistoryStats] = {}

    async def stats_of(run_id: str) -> HistoryStats:
        if run_id not in cache:
            cache[run_id] = await history_stats(client, job_id, run_id)
        return cache[run_id]

    run_id = listed[0].run_id if listed else ""
    while run_id:
        started = (await stats_of(run_id)).history[0].workflow_execution_started_event_attributes
        if not started.continued_execution_run_id or started.continued_execution_run_id in cache:
            break
        run_id = started.continued_execution_run_id
    runs: list[RunFigures] = []
    while run_id and all(r.run_id != run_id for r in runs):
        stats = await stats_of(run_id)
        runs.append(RunFigures(run_id, stats, await start_iteration(client, stats)))
        last = stats.history[-1]
        run_id = last.workflow_execution_continued_as_new_event_attributes.new_execution_run_id
    ends = [r.start_iteration for r in runs[1:]] + [final_iterations]
    for run, end in zip(runs, ends, strict=True):
        if run.start_iteration is not None and end is not None:
            run.iterations = end - run.start_iteration
        else:
            run.iterations = sum(
                e.activity_task_scheduled_event_attributes.activity_type.name == "verify_draft"
                for e in run.stats.history
            )
    return runs, len(listed)


async def start_iteration(client: Client, stats: HistoryStats) -> int | None:
    """The iteration a run started at, from the ``AgentLoopInput`` it was started with."""
    payloads = stats.history[0].workflow_execution_started_event_attributes.input.payloads
    try:
        [inp] = await client.data_converter.decode(payloads, [AgentLoopInput])
    except Exception:  # noqa: BLE001 - an input this build cannot read falls back to counting
        return None
    return inp.state.iteration if inp.state is not None else 0
