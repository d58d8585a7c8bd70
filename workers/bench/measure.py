"""Measuring helpers for ``keel bench``: job runners, timed batches, percentiles, ratios.

Every figure here is computed from samples taken during the run: latencies with
``time.perf_counter``, process CPU with ``time.process_time`` (and, for other processes, from
/proc). History sizes are ``workers.bench.history``'s.
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

from rich.progress import Progress, TaskID
from temporalio.client import Client

from keel.client.jobs import AgentJobs
from keel.workers.bench.bare import BareWorkflow
from keel.workers.bench.stack import process_cpu_seconds
from keel.workflows.types import JobRequest

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


def advancer(progress: Progress, task: TaskID) -> Callable[[], None]:
    """A callback that advances ``task`` of ``progress`` by one (one job done)."""
    return lambda: progress.advance(task)
