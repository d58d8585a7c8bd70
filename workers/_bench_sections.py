"""The three sections of ``keel bench``: overhead against bare Temporal, one long job, scale.

Each section takes a connected client and the benchmark's servers, runs its jobs on workers it
starts (in this process, or as ``keel worker`` processes for scale) and returns the figures it
measured as a JSON-ready dict.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from uuid import uuid4

from rich.progress import Progress, TaskID
from temporalio.client import Client
from temporalio.worker import UnsandboxedWorkflowRunner, Worker, WorkflowRunner
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner

from keel.client.errors import AgentJobError
from keel.client.jobs import AgentJobs
from keel.workers._bench_bare import BareWorkflow, bare_noop
from keel.workers._bench_measure import (
    Batch,
    RunFigures,
    bare_runner,
    keel_runner,
    median,
    ratio,
    run_batch,
    run_chain,
    sample_histories,
)
from keel.workers._bench_stack import (
    Children,
    process_cpu_seconds,
    text_server,
    wait_for_pollers,
    worker_env,
)
from keel.workers.main import build_worker
from keel.workers.registry import build_activities, build_deps
from keel.workers.settings import SIM_API_KEY, WorkerSettings
from keel.workflows.types import Budget, JobRequest, JobResult

SIM_MODEL = "sim-small"
"""Model name the simulator answers for, for every role."""
OVERHEAD_REQUEST = JobRequest(
    goal="Compute 2 + 2 with calculator [sim: fanout=4]",
    tools=["calculator"],
    tenant="bench",
    user="bench",
)
"""plan, four parallel calculator calls, answer, verify: seven activities."""
LONG_GOAL = "Fetch {url} with http_get [sim: replan, fail_verify=1000000]"
"""Plans an http_get on every iteration and never passes verification."""
HISTORY_LIMIT_BYTES = 2_000_000
"""The long job's target: no run's history over 2 MB."""
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


@dataclass(frozen=True)
class BenchConfig:
    """What ``keel bench`` was asked to run (the command's options, validated)."""

    servers: list[str]
    sections: list[str]
    jobs: int = 200
    concurrency: int = 16
    rounds: int = 4
    """The overhead section's jobs of each kind run in this many rounds, the kinds taking turns,
    so a machine whose speed drifts during the run favours no kind."""
    warmup: int = 5
    sequential: int = 50
    history_sample: int = 50
    iterations: int = 1000
    output_kib: int = 20
    fleet: list[int] = field(default_factory=lambda: [1, 2, 3])
    transfer_rps: int | None = None
    """None: ``workers.devstack.TRANSFER_RPS``."""
    json_path: Path | None = None


@dataclass(frozen=True)
class Servers:
    """Where the benchmark's Redis and LLM simulator listen, and the processes to read CPU of."""

    redis_url: str
    sim_url: str
    sim_pid: int | None = None
    temporal_pid: int | None = None
    """The dev server of the current --server mode (it changes with the mode)."""

    def cpu_probes(self) -> dict[str, int]:
        """Processes beside this one whose CPU a batch of jobs also costs, by figure name."""
        pids = {"server": self.temporal_pid, "simulator": self.sim_pid}
        return {name: pid for name, pid in pids.items() if pid is not None}


def _advance(progress: Progress, task: TaskID) -> Callable[[], None]:
    return lambda: progress.advance(task)


@contextlib.asynccontextmanager
async def in_process_worker(
    client: Client, servers: Servers, task_queue: str
) -> AsyncIterator[None]:
    """One Keel worker in this process, built as ``keel worker`` builds its own.

    ``workers.main.build_worker`` with the worker's settings: the same workflow runner
    (unsandboxed unless ``KEEL_WORKFLOW_SANDBOX`` is set), slot counts and shutdown grace.
    """
    overrides = {  # keyed as the environment spells them (the settings' validation aliases)
        "REDIS_URL": servers.redis_url,
        "OPENAI_BASE_URL": servers.sim_url,
        "OPENAI_API_KEY": SIM_API_KEY,
        "model_planner": SIM_MODEL,
        "model_verifier": SIM_MODEL,
        "model_answerer": SIM_MODEL,
    }
    settings = WorkerSettings(**overrides)  # type: ignore[arg-type]
    deps = build_deps(
        redis_url=settings.redis_url,
        openai_base_url=settings.openai_base_url,
        openai_api_key=settings.openai_api_key.get_secret_value(),
        llm_config=settings.llm_config(),
        http_allowed_hosts=["127.0.0.1"],
        http_max_bytes=settings.http_max_bytes,
    )
    try:
        await deps.store.ping()
        async with build_worker(client, settings, build_activities(deps), task_queue):
            yield
    finally:
        await deps.aclose()


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
    runners = {
        # Job IDs are "agent-job-" + the request key, so every kind's IDs are as long as these.
        "keel": keel_runner(
            AgentJobs(client, task_queue=queues["keel"]), OVERHEAD_REQUEST, f"keel-{tag}"
        ),
        **{
            name: bare_runner(client, queues[name], f"bench-job-{KIND_CODES[name]}-{tag}")
            for name in BARE_RUNNERS
        },
    }
    figures: dict[str, Any] = {"task_queues": queues}
    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(in_process_worker(client, servers, queues["keel"]))
        for name, runner in BARE_RUNNERS.items():
            await stack.enter_async_context(bare_worker(client, queues[name], runner))
        if config.warmup:
            warm = progress.add_task("warm-up (not counted)", total=len(runners) * config.warmup)
            for run_one in runners.values():
                await run_batch(
                    run_one, config.warmup, config.concurrency, "w", _advance(progress, warm)
                )
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
                    _advance(progress, tasks[name]),
                    probes=servers.cpu_probes(),
                )
                batches[name].absorb(batch)
        singles: dict[str, list[float]] = {name: [] for name in runners}
        task = progress.add_task(
            "single jobs, one at a time", total=len(runners) * config.sequential
        )
        for i in range(config.sequential):
            for name, run_one in runners.items():
                single = await run_batch(run_one, 1, 1, f"s{i}-", _advance(progress, task))
                if single.completed_ids:
                    singles[name] += single.latencies
        progress.add_task("fetching histories", total=None)
        for name, batch in batches.items():
            figures[name] = (
                batch.summary()
                | {"single_median_s": median(singles[name]), "single_samples": len(singles[name])}
                | await sample_histories(client, batch.completed_ids, config.history_sample)
            )
    for name in BARE_RUNNERS:
        keel_rounds, bare_rounds = (
            figures["keel"]["round_jobs_per_s"],
            figures[name]["round_jobs_per_s"],
        )
        by_round = zip(keel_rounds, bare_rounds, strict=True)
        figures[f"ratio_keel_over_{name}"] = {
            key: ratio(figures["keel"].get(key), figures[name].get(key)) for key in RATIO_KEYS
        } | {"jobs_per_s_by_round": [ratio(k, b) for k, b in by_round]}
        figures[f"targets_vs_{name}"] = met_targets(figures[f"ratio_keel_over_{name}"])
    figures["keel_workflow_sandbox"] = WorkerSettings().workflow_sandbox
    return figures


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


def long_budget(iterations: int) -> Budget:
    """A budget only ``max_iterations`` can exhaust (the others at or near their ceilings)."""
    return Budget(
        max_iterations=iterations,
        max_steps=100_000,
        max_tool_calls=100_000,
        max_retries_per_tool=100,
        max_tokens=10**9,
        max_cost_usd=10**5,
        max_seconds=86_400,
    )


async def long_job(
    client: Client, config: BenchConfig, servers: Servers, progress: Progress
) -> dict[str, Any]:
    """One job through ``config.iterations`` iterations with large tool outputs."""
    tag = uuid4().hex[:8]
    task_queue = f"bench-long-{tag}"
    jobs = AgentJobs(client, task_queue=task_queue)
    with text_server(config.output_kib * 1024) as url:
        async with in_process_worker(client, servers, task_queue):
            request = JobRequest(
                goal=LONG_GOAL.format(url=url),
                tools=["http_get"],
                tenant="bench",
                user="bench",
                budget=long_budget(config.iterations),
            )
            task = progress.add_task(
                f"long job: {config.iterations} iterations", total=config.iterations
            )
            cpu, wall = time.process_time(), time.perf_counter()
            job_id = await jobs.start(request, request_key=f"bench-long-{tag}")
            follow = asyncio.create_task(
                _follow(jobs, job_id, lambda i: progress.update(task, completed=i))
            )
            result: JobResult | None = None
            error: str | None = None
            try:
                result = await jobs.result(job_id)
            except AgentJobError as err:
                error = f"{type(err).__name__}: {err}"
            finally:
                follow.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await follow
            wall_s, cpu_s = time.perf_counter() - wall, time.process_time() - cpu
            progress.add_task("walking the job's runs", total=None)
            runs, listed = await run_chain(client, job_id, result.iterations if result else None)
    return _long_figures(config, job_id, result, error, runs, listed, wall_s, cpu_s)


async def _follow(jobs: AgentJobs, job_id: str, report: Callable[[int], None]) -> None:
    while True:
        with contextlib.suppress(AgentJobError):
            report((await jobs.status(job_id)).iteration)
        await asyncio.sleep(1.0)


def _long_figures(
    config: BenchConfig,
    job_id: str,
    result: JobResult | None,
    error: str | None,
    runs: list[RunFigures],
    listed: int,
    wall_s: float,
    cpu_s: float,
) -> dict[str, Any]:
    total_bytes = sum(r.stats.bytes for r in runs)
    reached = result.iterations if result else sum(r.iterations for r in runs)
    max_bytes = max((r.stats.bytes for r in runs), default=0)
    exhausted = result.exhausted_budget if result else None
    return {
        "job_id": job_id,
        "iterations_target": config.iterations,
        "iterations_reached": reached,
        "outcome": result.outcome if result else "failed",
        "exhausted_budget": exhausted,
        "error": error,
        "tool_output_bytes": config.output_kib * 1024,
        "runs": len(runs),
        "runs_listed": listed,
        "max_run_history_bytes": max_bytes,
        "max_run_history_events": max((r.stats.events for r in runs), default=0),
        "total_history_bytes": total_bytes,
        "total_history_events": sum(r.stats.events for r in runs),
        "history_bytes_per_iteration": total_bytes / reached if reached else None,
        "per_run": [
            {
                "run": i + 1,
                "run_id": r.run_id,
                "iterations": r.iterations,
                "events": r.stats.events,
                "bytes": r.stats.bytes,
                "bytes_per_iteration": r.stats.bytes / r.iterations if r.iterations else None,
            }
            for i, r in enumerate(runs)
        ],
        "wall_s": wall_s,
        "seconds_per_iteration": wall_s / reached if reached else None,
        "cpu_s": cpu_s,
        "history_limit_bytes": HISTORY_LIMIT_BYTES,
        "passed": bool(
            runs
            and max_bytes <= HISTORY_LIMIT_BYTES
            and exhausted == "max_iterations"
            and reached >= config.iterations
        ),
    }


async def scale(
    client: Client, config: BenchConfig, servers: Servers, progress: Progress, children: Children
) -> dict[str, Any]:
    """Keel jobs on fleets of ``keel worker`` processes of each size in ``config.fleet``."""
    target = client.service_client.config.target_host
    env = worker_env(target, client.namespace, servers.redis_url, servers.sim_url, SIM_MODEL)
    fleets: list[dict[str, Any]] = []
    for size in config.fleet:
        tag = uuid4().hex[:8]
        task_queue = f"bench-scale-{size}-{tag}"
        cmd = [sys.executable, "-m", "keel.workers.cli", "worker", "--task-queue", task_queue]
        # The queue also goes in the environment: settings read KEEL_TASK_QUEUE(S) whichever
        # way the worker command maps its flag.
        queue_env = env | {"KEEL_TASK_QUEUE": task_queue, "KEEL_TASK_QUEUES": task_queue}
        task = progress.add_task(f"{size} worker process(es): starting", total=config.jobs)
        procs = [
            children.start(
                f"worker-{tag}-{i}", [*cmd, "--identity", f"bench-{tag}-{i}"], env=queue_env
            )
            for i in range(size)
        ]
        try:
            await wait_for_pollers(client, task_queue, size, procs)
            jobs = AgentJobs(client, task_queue=task_queue)
            runner = keel_runner(jobs, OVERHEAD_REQUEST, f"bench-{tag}")
            progress.update(task, description=f"{size} worker process(es): warm-up")
            await run_batch(runner, max(config.warmup, size), config.concurrency, "w")
            progress.update(task, description=f"{size} worker process(es): {config.jobs} jobs")
            before = [process_cpu_seconds(p.pid) for p in procs]
            batch = await run_batch(
                runner, config.jobs, config.concurrency, "t", _advance(progress, task)
            )
            after = [process_cpu_seconds(p.pid) for p in procs]
        finally:
            await asyncio.to_thread(children.stop, *procs)
        known = None not in before and None not in after
        workers_cpu = sum(after) - sum(before) if known else None  # type: ignore[arg-type]
        figures = batch.summary()
        # This process only starts jobs and waits for results here; the workers do the work.
        figures["client_cpu_s"] = figures.pop("cpu_s")
        figures["client_cpu_ms_per_job"] = figures.pop("cpu_ms_per_job")
        figures["workers_cpu_s"] = workers_cpu
        fleets.append({"workers": size, "task_queue": task_queue} | figures)
    base = fleets[0]["jobs_per_s"] if fleets else None
    for fleet in fleets:
        fleet["speedup"] = ratio(fleet["jobs_per_s"], base)
    return {"fleets": fleets, "fleet_sizes": config.fleet}
