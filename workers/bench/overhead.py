"""The overhead section of ``keel bench``: Keel jobs beside bare Temporal workflows of one shape.

Three kinds of job run on workers in this process, each on its own task queue: Keel's job on a
Keel worker, and the bare baseline (``workers.bench.bare``) on the SDK's default (sandboxed)
worker and on an unsandboxed one, like Keel's. The kinds take turns, round by round, so a
machine whose speed drifts during the run favours none; the figures are each kind's, and
Keel's ratio to each baseline.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any
from uuid import uuid4

from rich.progress import Progress
from temporalio.client import Client
from temporalio.worker import UnsandboxedWorkflowRunner, Worker, WorkflowRunner
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner

from keel.client.jobs import AgentJobs
from keel.workers.bench.bare import BareWorkflow, bare_noop
from keel.workers.bench.config import OVERHEAD_REQUEST, BenchConfig, Servers
from keel.workers.bench.history import sample_histories
from keel.workers.bench.measure import (
    Batch,
    RunOne,
    advancer,
    bare_runner,
    keel_runner,
    median,
    ratio,
    run_batch,
)
from keel.workers.bench.stack import in_process_worker
from keel.workers.settings import WorkerSettings

OVERHEAD_TARGETS: dict[str, tuple[str, str, float]] = {
    "jobs_per_s": ("throughput", ">=", 0.9),
    "single_median_s": ("single-job latency", "<=", 1.1),
    "history_bytes_per_job": ("history bytes", "<=", 1.5),
}
"""The overhead section's targets, as ratios of Keel to each baseline (label, comparison,
limit): reported with every run, not enforced by the exit code."""
RATIO_KEYS = (
    "jobs_per_s",
    "latency_p50_s",
    "latency_p95_s",
    "single_median_s",
    "cpu_ms_per_job",
    "server_cpu_ms_per_job",
    "all_cpu_ms_per_job",
    "history_events_per_job",
    "history_bytes_per_job",
)
BARE_RUNNERS: dict[str, WorkflowRunner] = {
    "bare": SandboxedWorkflowRunner(),  # what Worker uses when given no runner
    "bare_unsandboxed": UnsandboxedWorkflowRunner(),
}
"""The baselines: the SDK's defaults (its sandboxed runner), and the runner Keel's workers use."""
KIND_CODES = {"keel": "keel", "bare": "bare", "bare_unsandboxed": "unsb"}
"""Each kind's code in its task queue and workflow IDs: all of one length, because both names
are recorded in many history events and the kinds' history sizes are compared byte for byte."""


@contextlib.asynccontextmanager
async def bare_worker(
    client: Client, task_queue: str, runner: WorkflowRunner
) -> AsyncIterator[None]:
    """A plain SDK worker for ``BareWorkflow``, with every setting at its default but the runner."""
    async with Worker(
        client,
        task_queue=task_queue,
        workflows=[BareWorkflow],
        activities=[bare_noop],
        workflow_runner=runner,
    ):
        yield


async def overhead(
    client: Client, config: BenchConfig, servers: Servers, progress: Progress
) -> dict[str, Any]:
    """Keel jobs beside bare workflows of the same shape, each kind on its own worker here."""
    tag = uuid4().hex[:8]
    queues = {name: f"bench-{code}-{tag}" for name, code in KIND_CODES.items()}
    runners = _runners(client, queues, tag)
    figures: dict[str, Any] = {"task_queues": queues}
    async with _workers(client, servers, queues):
        await _warm_up(runners, config, progress)
        batches = await _timed_rounds(runners, config, servers, progress)
        singles = await _single_jobs(runners, config, progress)
        progress.add_task("fetching histories", total=None)
        for name, batch in batches.items():
            figures[name] = (
                batch.summary()
                | {"single_median_s": median(singles[name]), "single_samples": len(singles[name])}
                | await sample_histories(client, batch.completed_ids, config.history_sample)
            )
    for name in BARE_RUNNERS:
        figures |= _compared(figures["keel"], figures[name], name)
    figures["keel_workflow_sandbox"] = WorkerSettings().workflow_sandbox
    return figures


def _runners(client: Client, queues: dict[str, str], tag: str) -> dict[str, RunOne]:
    jobs = AgentJobs(client, task_queue=queues["keel"])
    return {
        # Job IDs are "agent-job-" + the request key, so every kind's IDs are as long as these.
        "keel": keel_runner(jobs, OVERHEAD_REQUEST, f"keel-{tag}"),
        **{
            name: bare_runner(client, queues[name], f"bench-job-{KIND_CODES[name]}-{tag}")
            for name in BARE_RUNNERS
        },
    }


@contextlib.asynccontextmanager
async def _workers(client: Client, servers: Servers, queues: dict[str, str]) -> AsyncIterator[None]:
    """A Keel worker and one bare worker per baseline, each polling its kind's queue."""
    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(in_process_worker(client, servers, queues["keel"]))
        for name, runner in BARE_RUNNERS.items():
            await stack.enter_async_context(bare_worker(client, queues[name], runner))
        yield


async def _warm_up(runners: dict[str, RunOne], config: BenchConfig, progress: Progress) -> None:
    if not config.warmup:
        return
    warm = progress.add_task("warm-up (not counted)", total=len(runners) * config.warmup)
    for run_one in runners.values():
        await run_batch(run_one, config.warmup, config.concurrency, "w", advancer(progress, warm))


async def _timed_rounds(
    runners: dict[str, RunOne], config: BenchConfig, servers: Servers, progress: Progress
) -> dict[str, Batch]:
    """Every kind's jobs in ``config.rounds`` rounds, the kinds taking turns in each."""
    batches = {name: Batch(jobs=0) for name in runners}
    tasks = {
        name: progress.add_task(
            f"{name}: {config.jobs} jobs, {config.concurrency} in flight", total=config.jobs
        )
        for name in runners
    }
    for round_no, size in enumerate(round_sizes(config.jobs, config.rounds)):
        for name, run_one in runners.items():
            batch = await run_batch(
                run_one,
                size,
                config.concurrency,
                f"t{round_no}-",
                advancer(progress, tasks[name]),
                probes=servers.cpu_probes(),
            )
            batches[name].absorb(batch)
    return batches


async def _single_jobs(
    runners: dict[str, RunOne], config: BenchConfig, progress: Progress
) -> dict[str, list[float]]:
    """Latencies of jobs run one at a time, the kinds taking turns."""
    singles: dict[str, list[float]] = {name: [] for name in runners}
    task = progress.add_task("single jobs, one at a time", total=len(runners) * config.sequential)
    for i in range(config.sequential):
        for name, run_one in runners.items():
            single = await run_batch(run_one, 1, 1, f"s{i}-", advancer(progress, task))
            if single.completed_ids:
                singles[name] += single.latencies
    return singles


def _compared(keel: dict[str, Any], bare: dict[str, Any], name: str) -> dict[str, Any]:
    """Keel's ratio to the baseline ``name`` on each of RATIO_KEYS, and the targets met."""
    by_round = zip(keel["round_jobs_per_s"], bare["round_jobs_per_s"], strict=True)
    ratios = {key: ratio(keel.get(key), bare.get(key)) for key in RATIO_KEYS} | {
        "jobs_per_s_by_round": [ratio(k, b) for k, b in by_round]
    }
    return {f"ratio_keel_over_{name}": ratios, f"targets_vs_{name}": met_targets(ratios)}


def met_targets(ratios: dict[str, Any]) -> dict[str, bool | None]:
    """Whether each of OVERHEAD_TARGETS was met by these ratios (None when not measured)."""
    met: dict[str, bool | None] = {}
    for key, (_, op, limit) in OVERHEAD_TARGETS.items():
        value = ratios.get(key)
        met[key] = None if value is None else (value >= limit if op == ">=" else value <= limit)
    return met


def round_sizes(jobs: int, rounds: int) -> list[int]:
    """``jobs`` split into at most ``rounds`` near-equal, non-empty rounds."""
    count = max(1, min(rounds, jobs))
    return [jobs // count + (1 if i < jobs % count else 0) for i in range(count)]
