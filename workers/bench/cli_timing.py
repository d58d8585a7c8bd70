"""The cli section of ``keel bench``: how long the ``keel`` command takes, process start included.

It starts what ``keel dev`` starts for the command line (a ``keel worker`` and ``keel api`` on
the benchmark's servers), runs one job to its end, and then times whole ``keel`` processes as a
user runs them: ``keel --help``, and ``keel status JOB --json`` and ``keel list --json`` both
through the HTTP API (``KEEL_API_URL``, what ``keel dev`` exports) and straight to Temporal.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import time
from typing import Any
from uuid import uuid4

from rich.progress import Progress
from temporalio.client import Client

from keel.client.jobs import AgentJobs
from keel.workers.bench.config import OVERHEAD_REQUEST, SIM_MODEL, BenchConfig, Servers
from keel.workers.bench.stack import wait_for_pollers, worker_env
from keel.workers.supervisor import Supervisor, free_port

CLI_TARGETS_MS = {"help": 200.0, "status_api": 300.0, "list_api": 300.0}
"""Wall-time targets (median, ms) for ``keel --help`` and the two reads through the API."""


def keel_command() -> list[str]:
    """The installed ``keel`` console script, as a user types it; else ``python -m``."""
    script = shutil.which("keel", path=os.path.dirname(sys.executable))
    return [script] if script else [sys.executable, "-m", "keel.workers.cli"]


async def cli_timing(
    client: Client,
    config: BenchConfig,
    servers: Servers,
    progress: Progress,
    children: Supervisor,
) -> dict[str, Any]:
    """Time ``keel --help``, ``keel status`` and ``keel list`` as whole processes."""
    tag = uuid4().hex[:8]
    queue = f"bench-cli-{tag}"
    target = client.service_client.config.target_host
    env = worker_env(target, client.namespace, servers.redis_url, servers.sim_url, SIM_MODEL)
    env |= {"KEEL_TASK_QUEUE": queue, "KEEL_TASK_QUEUES": queue}
    for name in ("KEEL_API_URL", "KEEL_API_KEY"):  # the direct runs go straight to Temporal
        env.pop(name, None)
    api_port = free_port()
    keel = keel_command()
    names = [f"cli-worker-{tag}", f"cli-api-{tag}"]
    worker = children.start(names[0], [*keel, "worker", "--task-queue", queue], env=env)
    children.start(names[1], [*keel, "api", f"--port={api_port}"], env=env, port=api_port)
    try:
        await wait_for_pollers(client, queue, 1, [worker])
        jobs = AgentJobs(client, task_queue=queue)
        job_id = await jobs.start(OVERHEAD_REQUEST)
        await jobs.result(job_id, timeout=120)
        # An operator's key, as `keel dev` makes: the reads see what the direct ones see.
        key = await _operator_key(servers.redis_url)
        via_api = env | {"KEEL_API_URL": f"http://127.0.0.1:{api_port}", "KEEL_API_KEY": key}
        commands = {
            "help": (["--help"], env),
            "status_api": (["status", job_id, "--json"], via_api),
            "list_api": (["list", "--json"], via_api),
            "status_direct": (["status", job_id, "--json"], env),
            "list_direct": (["list", "--json"], env),
        }
        task = progress.add_task("keel commands", total=len(commands) * config.cli_runs)
        timings = {}
        for name, (argv, cmd_env) in commands.items():
            timings[name] = await asyncio.to_thread(
                _time_runs, [*keel, *argv], cmd_env, config.cli_runs, config.warmup
            )
            progress.advance(task, config.cli_runs)
    finally:
        await asyncio.to_thread(children.stop, *names)
    met = {name: timings[name]["median_ms"] <= limit for name, limit in CLI_TARGETS_MS.items()}
    return {"runs": config.cli_runs, "command": keel, "timings": timings, "targets_met": met}


async def _operator_key(redis_url: str) -> str:
    import redis.asyncio as aioredis

    from keel.client.api.keys import ApiKeys

    redis = aioredis.Redis.from_url(redis_url)
    try:
        key, _ = await ApiKeys(redis).create("bench", "operator", "bench")
        return key
    finally:
        await redis.aclose()


def _time_runs(argv: list[str], env: dict[str, str], runs: int, warmup: int) -> dict[str, Any]:
    """Wall time of ``argv`` as a whole process over ``runs`` runs after ``warmup`` uncounted."""
    walls = []
    for i in range(warmup + runs):
        started = time.perf_counter()
        done = subprocess.run(argv, env=env, capture_output=True, timeout=60, check=False)
        wall = time.perf_counter() - started
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} exited {done.returncode}: {done.stderr!r}")
        if i >= warmup:
            walls.append(wall * 1000)
    walls.sort()
    return {
        "min_ms": walls[0],
        "median_ms": statistics.median(walls),
        "p95_ms": walls[min(len(walls) - 1, round(0.95 * (len(walls) - 1)))],
        "max_ms": walls[-1],
    }
