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

import aiohttp
from rich.progress import Progress
from temporalio.client import Client

from keel.workers.bench.api_stack import api_stack
from keel.workers.bench.config import BenchConfig, Servers
from keel.workers.supervisor import Supervisor

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
    processes = api_processes()
    # Limits far above the load, so that none of it is refused.
    rates = {"KEEL_API_RATE_PER_KEY": "100000000/1", "KEEL_API_RATE_PER_TENANT": "100000000/1"}
    async with api_stack(
        client, servers, children, name="api", processes=processes, env=rates
    ) as stack:
        task = progress.add_task("api: submit", total=config.api_requests * 2)
        # aiohttp drives the load: httpx's pool tops out near 80 requests/s at 100 concurrent
        # requests on this machine, which would measure the client, not the gateway.
        async with aiohttp.ClientSession(
            stack.base_url,
            headers={"Authorization": f"Bearer {stack.key}"},
            connector=aiohttp.TCPConnector(limit=config.api_clients),
            timeout=aiohttp.ClientTimeout(total=60),
        ) as http:
            await _until_ready(http)
            submit = await _submit_phase(http, config, progress, task)
            status = await _status_phase(http, config, progress, task)
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
