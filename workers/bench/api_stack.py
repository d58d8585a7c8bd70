"""``keel api`` and one ``keel worker`` on the benchmark's servers, with an API key.

The api and stream sections measure the gateway as a caller meets it: real processes on the
benchmark's dev server, Redis and simulator, the worker polling the interactive queue (of the
benchmark's own server, so no other worker takes its tasks).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from uuid import uuid4

import redis.asyncio as aioredis
from temporalio.client import Client

from keel.client.api.keys import ApiKeys
from keel.workers.bench.cli_timing import keel_command
from keel.workers.bench.config import SIM_MODEL, Servers
from keel.workers.bench.stack import wait_for_pollers, worker_env
from keel.workers.supervisor import Supervisor, free_port
from keel.workflows import TASK_QUEUES

__all__ = ["ApiStack", "api_stack"]

DROPPED_ENV = (
    "KEEL_API_URL",
    "KEEL_TASK_QUEUE",
    "KEEL_QUOTA_JOBS_PER_DAY",
    "KEEL_QUOTA_USD_PER_DAY",
)
"""The caller's settings that would point the processes elsewhere or refuse the load."""


@dataclass(frozen=True)
class ApiStack:
    """Where the API listens and the key to call it with."""

    base_url: str
    key: str


@asynccontextmanager
async def api_stack(
    client: Client,
    servers: Servers,
    children: Supervisor,
    *,
    name: str,
    processes: int = 1,
    env: Mapping[str, str] | None = None,
) -> AsyncIterator[ApiStack]:
    """Start ``keel api`` (``processes`` of them on one port) and a worker; stop both after.

    Args:
        client: The benchmark's client (its server is the one the processes use).
        servers: The benchmark's Redis and simulator.
        children: The supervisor that owns (and on any exit stops) the processes.
        name: A prefix for the processes' names and logs.
        processes: API processes behind the port (``keel api --workers``).
        env: Extra environment for both processes.
    """
    tag = uuid4().hex[:8]
    queue = TASK_QUEUES["interactive"]
    target = client.service_client.config.target_host
    proc_env = worker_env(target, client.namespace, servers.redis_url, servers.sim_url, SIM_MODEL)
    proc_env |= {"KEEL_TASK_QUEUES": queue, **(env or {})}
    for variable in DROPPED_ENV:
        proc_env.pop(variable, None)
    port, keel = free_port(), keel_command()
    names = [f"{name}-api-{tag}", f"{name}-worker-{tag}"]
    api = [*keel, "api", f"--port={port}", f"--workers={processes}"]
    children.start(names[0], api, env=proc_env, port=port)
    worker = children.start(names[1], [*keel, "worker", "--task-queue", queue], env=proc_env)
    redis = aioredis.Redis.from_url(servers.redis_url)
    try:
        key, _ = await ApiKeys(redis).create(f"bench-{tag}", "member", "bench")
        await wait_for_pollers(client, queue, 1, [worker])
        yield ApiStack(f"http://127.0.0.1:{port}", key)
    finally:
        await redis.aclose()
        await asyncio.to_thread(children.stop, *names)
