"""The scale section of ``keel bench``: Keel jobs on fleets of ``keel worker`` processes.

For each fleet size, that many ``keel worker`` processes poll a fresh task queue; the section
runs the same jobs through each fleet and reports throughput, latency and the workers' CPU, with
each fleet's speed-up over the first.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any
from uuid import uuid4

from rich.progress import Progress
from temporalio.client import Client

from keel.client.jobs import AgentJobs
from keel.workers.bench.config import OVERHEAD_REQUEST, SIM_MODEL, BenchConfig, Servers
from keel.workers.bench.measure import advancer, keel_runner, ratio, run_batch
from keel.workers.bench.stack import process_cpu_seconds, wait_for_pollers, worker_env
from keel.workers.supervisor import Supervisor


async def scale(
    client: Client,
    config: BenchConfig,
    servers: Servers,
    progress: Progress,
    children: Supervisor,
) -> dict[str, Any]:
    """Keel jobs on fleets of ``keel worker`` processes of each size in ``config.fleet``."""
    target = client.service_client.config.target_host
    env = worker_env(target, client.namespace, servers.redis_url, servers.sim_url, SIM_MODEL)
    fleets = [await _fleet(client, config, progress, children, env, size) for size in config.fleet]
    base = fleets[0]["jobs_per_s"] if fleets else None
    for fleet in fleets:
        fleet["speedup"] = ratio(fleet["jobs_per_s"], base)
    return {"fleets": fleets, "fleet_sizes": config.fleet}


async def _fleet(
    client: Client,
    config: BenchConfig,
    progress: Progress,
    children: Supervisor,
    env: dict[str, str],
    size: int,
) -> dict[str, Any]:
    """Start ``size`` worker processes on a fresh queue, run the jobs through them, stop them."""
    tag = uuid4().hex[:8]
    task_queue = f"bench-scale-{size}-{tag}"
    cmd = [sys.executable, "-m", "keel.workers.cli", "worker", "--task-queue", task_queue]
    # The queue also goes in the environment: settings read KEEL_TASK_QUEUE(S) whichever
    # way the worker command maps its flag.
    queue_env = env | {"KEEL_TASK_QUEUE": task_queue, "KEEL_TASK_QUEUES": task_queue}
    task = progress.add_task(f"{size} worker process(es): starting", total=config.jobs)
    names = [f"worker-{tag}-{i}" for i in range(size)]
    procs = [
        children.start(name, [*cmd, "--identity", f"bench-{tag}-{i}"], env=queue_env)
        for i, name in enumerate(names)
    ]
    try:
        await wait_for_pollers(client, task_queue, size, procs)
        runner = keel_runner(
            AgentJobs(client, task_queue=task_queue), OVERHEAD_REQUEST, f"bench-{tag}"
        )
        progress.update(task, description=f"{size} worker process(es): warm-up")
        await run_batch(runner, max(config.warmup, size), config.concurrency, "w")
        progress.update(task, description=f"{size} worker process(es): {config.jobs} jobs")
        before = [process_cpu_seconds(p.pid) for p in procs]
        batch = await run_batch(
            runner, config.jobs, config.concurrency, "t", advancer(progress, task)
        )
        after = [process_cpu_seconds(p.pid) for p in procs]
    finally:
        await asyncio.to_thread(children.stop, *names)
    known = None not in before and None not in after
    workers_cpu = sum(after) - sum(before) if known else None  # type: ignore[arg-type]
    figures = batch.summary()
    # This process only starts jobs and waits for results here; the workers do the work.
    figures["client_cpu_s"] = figures.pop("cpu_s")
    figures["client_cpu_ms_per_job"] = figures.pop("cpu_ms_per_job")
    figures["workers_cpu_s"] = workers_cpu
    return {"workers": size, "task_queue": task_queue} | figures
