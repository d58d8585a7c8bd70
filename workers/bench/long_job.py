"""The long-job section of ``keel bench``: one job through many iterations with large outputs.

The job plans an ``http_get`` of a local text server on every iteration and never passes
verification, so only its iteration budget ends it; Keel continues it as new as its history
grows. The section passes when no run's history exceeds 2 MB and the iteration limit was
reached.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any
from uuid import uuid4

from rich.progress import Progress
from temporalio.client import Client

from keel.client.errors import AgentJobError
from keel.client.jobs import AgentJobs
from keel.workers.bench.config import BenchConfig, Servers
from keel.workers.bench.history import RunFigures, run_chain
from keel.workers.bench.stack import in_process_worker, text_server
from keel.workflows.types import Budget, JobRequest, JobResult

LONG_GOAL = "Fetch {url} with http_get [sim: replan, fail_verify=1000000]"
"""Plans an http_get on every iteration and never passes verification."""
HISTORY_LIMIT_BYTES = 2_000_000
"""The long job's target: no run's history over 2 MB."""


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
            result, error = await _await_result(
                jobs, job_id, lambda i: progress.update(task, completed=i)
            )
            wall_s, cpu_s = time.perf_counter() - wall, time.process_time() - cpu
            progress.add_task("walking the job's runs", total=None)
            runs, listed = await run_chain(client, job_id, result.iterations if result else None)
    return _long_figures(config, job_id, result, error, runs, listed, wall_s, cpu_s)


async def _await_result(
    jobs: AgentJobs, job_id: str, report: Callable[[int], None]
) -> tuple[JobResult | None, str | None]:
    """The job's result, or why there is none, reporting its iteration every second meanwhile."""
    follow = asyncio.create_task(_follow(jobs, job_id, report))
    try:
        return await jobs.result(job_id), None
    except AgentJobError as err:
        return None, f"{type(err).__name__}: {err}"
    finally:
        follow.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await follow


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
