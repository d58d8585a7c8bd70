"""A Keel worker process: connect, build the real dependencies, poll until SIGTERM, shut down.

Composition only. Start as many as you like, on as many machines as you like: they share work
through Temporal's task queues and nothing in Keel assumes a single worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from datetime import timedelta

import structlog
from temporalio.client import Client
from temporalio.worker import Worker

from client.connect import connect
from workers.registry import WORKFLOWS, build_activities, build_deps
from workers.settings import WorkerSettings

log = structlog.get_logger(__name__)


def build_worker(client: Client, settings: WorkerSettings, activities: list) -> Worker:  # type: ignore[type-arg]
    """A Worker for Keel's workflows and the given activities, tuned by ``settings``."""
    return Worker(
        client,
        task_queue=settings.task_queue,
        workflows=WORKFLOWS,
        activities=activities,
        max_concurrent_activities=settings.max_concurrent_activities,
        max_concurrent_workflow_tasks=settings.max_concurrent_workflow_tasks,
        graceful_shutdown_timeout=timedelta(seconds=settings.graceful_shutdown_seconds),
        identity=settings.identity,
    )


async def run_worker(settings: WorkerSettings, stop: asyncio.Event | None = None) -> None:
    """Run one worker until ``stop`` is set or the process gets SIGINT/SIGTERM.

    Args:
        settings: Worker configuration.
        stop: Optional event to stop on (tests); signals are handled either way.
    """
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    client = await connect()
    deps = build_deps(
        redis_url=settings.redis_url,
        openai_base_url=settings.openai_base_url,
        openai_api_key=settings.openai_api_key.get_secret_value(),
        llm_config=settings.llm_config(),
        http_allowed_hosts=settings.allowed_hosts(),
        http_max_bytes=settings.http_max_bytes,
    )
    await deps.store.ping()
    worker = build_worker(client, settings, build_activities(deps))
    log.info(
        "worker started",
        task_queue=settings.task_queue,
        identity=worker.config().get("identity"),
        llm_endpoint=settings.openai_base_url,
    )
    try:
        async with worker:
            await stop.wait()
            log.info("worker stopping", grace_seconds=settings.graceful_shutdown_seconds)
    finally:
        await deps.aclose()
        log.info("worker stopped")
