"""The api section of ``keel bench``: the HTTP gateway under 100 concurrent clients.

It starts ``keel api`` and one ``keel worker`` on the benchmark's servers, makes an API key, and
measures what a caller waits for: ``POST /v1/jobs`` until the job ID comes back (every submit
authenticated, rate-limited, counted against quotas and started in Temporal), and
``GET /v1/jobs/{id}`` (a query answered by the worker) on jobs that wait for input. The jobs
submitted in the first phase wait on a task queue no worker polls, so the submit figures are
the gateway's, not the agent loop's: they are batch jobs, and the worker polls only the
interactive queue (of the benchmark's own dev server). The limits are raised far above the load
so that none of it is refused. ``KEEL_BENCH_API_PROCESSES`` sets how many API processes share
the port (``keel api --workers``; default ``API_PROCESSES``).
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from typing import Any
from uuid import uuid4

import aiohttp
import redis.asyncio as aioredis
from rich.progress import Progress
from temporalio.client import Client

from keel.client.api.keys import ApiKeys
from keel.workers.bench.cli_timing import keel_command
from keel.workers.bench.config import SIM_MODEL, BenchConfig, Servers
from keel.workers.bench.stack import wait_for_pollers, worker_env
from keel.workers.supervisor import Supervisor, free_port
from keel.workflows import TASK_QUEUES

API_TARGETS_MS = {"submit_p95_ms": 50.0, "status_p95_ms": 30.0}
"""p95 targets at 100 concurrent clients."""
WAITING_JOBS = 20
"""Jobs waiting for input whose status the status phase reads."""
API_PROCESSES = 1
"""``keel api`` processes behind the port unless ``KEEL_BENCH_API_PROCESSES`` says otherwise."""


def api_processes() -> int:
    """How many API processes to run: ``KEEL_BENCH_API_PROCESSES``, else ``API_PROCESSES``.

    Raises:
        ValueError: If the variable is not a whole number from 1 to 64.
    """
    value = int(os.environ.get("KEEL_BENCH_API_PROCESSES") or API_PROCESSES)
    if not 1 <= value <= 64:
        raise ValueError("KEEL_BENCH_API_PROCESSES must be 1 to 64")
    return value


async def api_load(
    client: Client,
    config: BenchConfig,
    servers: Servers,
    progress: Progress,
    children: Supervisor,
) -> dict[str, Any]:
    """Submit and status latency through ``keel api`` at ``config.api_clients`` clients."""
    tag = uuid4().hex[:8]
    queue = TASK_QUEUES["interactive"]  # the benchmark's own server: no other worker polls it
    target = client.service_client.config.target_host
    env = worker_env(target, client.namespace, servers.redis_url, servers.sim_url, SIM_MODEL)
    env |= {
        "KEEL_TASK_QUEUES": queue,
        "KEEL_API_RATE_PER_KEY": "100000000/1",
        "KEEL_API_RATE_PER_TENANT": "100000000/1",
    }
    for name in (
        "KEEL_QUOTA_JOBS_PER_DAY",
        "KEEL_QUOTA_USD_PER_DAY",
        "KEEL_API_URL",
        "KEEL_TASK_QUEUE",
    ):
        env.pop(name, None)
    port, keel, processes = free_port(), keel_command(), api_processes()
    names = [f"api-{tag}", f"api-worker-{tag}"]
    api_cmd = [*keel, "api", f"--port={port}", f"--workers={processes}"]
    children.start(names[0], api_cmd, env=env, port=port)
    worker = children.start(names[1], [*keel, "worker", "--task-queue", queue], env=env)
    redis = aioredis.Redis.from_url(servers.redis_url)
    try:
        key, _ = await ApiKeys(redis).create(f"bench-{tag}", "member", "bench")
        await wait_for_pollers(client, queue, 1, [worker])
        base = f"http://127.0.0.1:{port}"
        task = progress.add_task("api: submit", total=config.api_requests * 2)
        # aiohttp drives the load: httpx's pool tops out near 80 requests/s at 100 concurrent
        # requests on this machine, which would measure the client, not the gateway.
        async with aiohttp.ClientSession(
            base,
            headers={"Authorization": f"Bearer {key}"},
            connector=aiohttp.TCPConnector(limit=config.api_clients),
            timeout=aiohttp.ClientTimeout(total=60),
        ) as http:
            await _until_ready(http)
            submit = await _submit_phase(http, config, progress, task)
            status = await _status_phase(http, config, progress, task)
    finally:
        await redis.aclose()
        await asyncio.to_thread(children.stop, *names)
    measured = {**submit, **status}
    return {
        "clients": config.api_clients,
        "api_processes": processes,
        "requests": config.api_requests,
        **measured,
        "targets_met": {k: measured[k] <= v for k, v in API_TARGETS_MS.items()},
    }


async def _until_ready(http: aiohttp.ClientSession, timeout: float = 60.0) -> None:
    """Wait until the API answers ``/readyz`` (its processes start after the port opens).

    Raises:
        TimeoutError: If it is not ready within ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if (await _call(http, "GET", "/readyz"))[0] == 200:
                return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.2)
    raise TimeoutError("keel api did not become ready")


async def _load(
    clients: int, total: int, call: Any, progress: Progress, task: Any
) -> tuple[list[float], float]:
    """``total`` calls from ``clients`` concurrent loops; latencies (ms) and wall seconds."""
    latencies: list[float] = []
    counter = iter(range(total))

    async def client_loop() -> None:
        for i in counter:
            started = time.perf_counter()
            status, text = await call(i)
            latencies.append((time.perf_counter() - started) * 1000)
            if status >= 400:
                raise RuntimeError(f"{status}: {text[:200]}")
            progress.advance(task)

    started = time.perf_counter()
    await asyncio.gather(*(client_loop() for _ in range(clients)))
    return latencies, time.perf_counter() - started


def _summary(prefix: str, latencies: list[float], wall: float) -> dict[str, float]:
    ordered = sorted(latencies)
    return {
        f"{prefix}_p50_ms": statistics.median(ordered),
        f"{prefix}_p95_ms": ordered[round(0.95 * (len(ordered) - 1))],
        f"{prefix}_p99_ms": ordered[round(0.99 * (len(ordered) - 1))],
        f"{prefix}_per_s": len(ordered) / wall,
    }


async def _call(http: aiohttp.ClientSession, method: str, path: str, **kw: Any) -> tuple[int, str]:
    async with http.request(method, path, **kw) as response:
        return response.status, await response.text()


async def _json(http: aiohttp.ClientSession, method: str, path: str, **kw: Any) -> Any:
    async with http.request(method, path, **kw) as response:
        response.raise_for_status()
        return await response.json()


async def _submit_phase(
    http: aiohttp.ClientSession, config: BenchConfig, progress: Progress, task: Any
) -> dict[str, float]:
    # Jobs on a queue nobody polls: the figure is the gateway and Temporal's start, not a run.
    body = {"goal": "What is 1 + 1? use calculator", "mode": "batch"}

    async def submit(_: int) -> tuple[int, str]:
        return await _call(http, "POST", "/v1/jobs", json=body)

    latencies, wall = await _load(config.api_clients, config.api_requests, submit, progress, task)
    return _summary("submit", latencies, wall)


async def _status_phase(
    http: aiohttp.ClientSession, config: BenchConfig, progress: Progress, task: Any
) -> dict[str, float]:
    body = {"goal": "Book the usual [sim: ask]", "tools": ["calculator"]}
    ids = [
        (await _json(http, "POST", "/v1/jobs", json=body))["job_id"] for _ in range(WAITING_JOBS)
    ]
    for job_id in ids:  # each has asked its question: its state is cached on the worker
        while (await _json(http, "GET", f"/v1/jobs/{job_id}"))["state"] != "waiting_for_input":
            await asyncio.sleep(0.1)

    async def status(i: int) -> tuple[int, str]:
        return await _call(http, "GET", f"/v1/jobs/{ids[i % len(ids)]}")

    latencies, wall = await _load(config.api_clients, config.api_requests, status, progress, task)
    for job_id in ids:
        await _call(http, "POST", f"/v1/jobs/{job_id}/cancel")
    return _summary("status", latencies, wall)
