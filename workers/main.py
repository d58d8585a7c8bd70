"""A Keel worker process: connect, build the real dependencies, poll until SIGTERM, shut down.

Composition only. Start as many as you like, on as many machines as you like: they share work
through Temporal's task queues and nothing in Keel assumes a single worker. One process polls
every queue it is given (by default the interactive and the batch queue) with one shared set
of clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Coroutine
from datetime import timedelta
from typing import Any, TypeVar

import structlog
from redis.exceptions import RedisError
from temporalio.client import Client
from temporalio.common import VersioningBehavior, WorkerDeploymentVersion
from temporalio.runtime import PrometheusConfig, Runtime, TelemetryConfig
from temporalio.worker import (
    PollerBehaviorAutoscaling,
    UnsandboxedWorkflowRunner,
    Worker,
    WorkerDeploymentConfig,
    WorkerTuner,
    WorkflowRunner,
)
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner

from keel.client.connect import connect
from keel.client.fleet import describe_fleet
from keel.workers.logs import loggable_url
from keel.workers.plugin import KeelPlugin
from keel.workers.registry import deps_from_settings
from keel.workers.settings import WorkerSettings

log = structlog.get_logger(__name__)

T = TypeVar("T")

BEHAVIORS = {
    "auto_upgrade": VersioningBehavior.AUTO_UPGRADE,
    "pinned": VersioningBehavior.PINNED,
}


def run_event_loop(main: Coroutine[Any, Any, T], *, use_uvloop: bool = True) -> T:
    """Run ``main`` to its end on uvloop's loop when ``use_uvloop`` and it is installed.

    Otherwise on asyncio's own loop (uvloop has no Windows build). Workflow code never runs on
    this loop: the SDK runs each workflow on its own deterministic loop, whichever this is.
    """
    if use_uvloop:
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return uvloop.run(main)
    return asyncio.run(main)


class RedisUnavailable(RuntimeError):
    """Redis did not answer when the worker started; nothing was polled."""


def build_worker(
    client: Client, settings: WorkerSettings, queue: str, *, plugin: KeelPlugin
) -> Worker:
    """A Worker running ``plugin`` (Keel's workflow and activities) on one queue, tuned."""
    tuning = worker_tuning(settings)
    if settings.deployment_name and settings.build_id:
        tuning["deployment_config"] = WorkerDeploymentConfig(
            version=WorkerDeploymentVersion(
                deployment_name=settings.deployment_name, build_id=settings.build_id
            ),
            use_worker_versioning=True,
            default_versioning_behavior=BEHAVIORS[settings.versioning_behavior],
        )
    return Worker(
        client,
        task_queue=queue,
        workflow_runner=workflow_runner(settings),
        plugins=[plugin],
        graceful_shutdown_timeout=timedelta(seconds=settings.graceful_shutdown_seconds),
        identity=settings.identity,
        **tuning,
    )


def worker_tuning(settings: WorkerSettings) -> dict[str, Any]:
    """The ``Worker`` keyword arguments that size it: slots, sticky cache and pollers.

    ``keel bench load`` gives its bare floor worker the same values, so the floor runs with
    the limits a ``keel worker`` gets.
    """
    tuning: dict[str, Any] = {"max_cached_workflows": settings.max_cached_workflows}
    if settings.resource_tuner:
        tuning["tuner"] = WorkerTuner.create_resource_based(
            target_memory_usage=settings.target_memory, target_cpu_usage=settings.target_cpu
        )
    else:
        tuning["max_concurrent_activities"] = settings.max_concurrent_activities
        tuning["max_concurrent_workflow_tasks"] = settings.max_concurrent_workflow_tasks
    if settings.poller_autoscaling:
        pollers = PollerBehaviorAutoscaling(maximum=settings.max_pollers)
        tuning["workflow_task_poller_behavior"] = pollers
        tuning["activity_task_poller_behavior"] = pollers
    return tuning


def workflow_runner(settings: WorkerSettings) -> WorkflowRunner:
    """Temporal's sandbox only when ``KEEL_WORKFLOW_SANDBOX`` asks for it (see the setting)."""
    return SandboxedWorkflowRunner() if settings.workflow_sandbox else UnsandboxedWorkflowRunner()


def metrics_runtime(port: int | None) -> Runtime | None:
    """An SDK runtime exporting Prometheus metrics on ``port``, or None for the default."""
    if port is None:
        return None
    return Runtime(
        telemetry=TelemetryConfig(metrics=PrometheusConfig(bind_address=f"0.0.0.0:{port}"))
    )


async def export_fleet_gauges(
    client: Client, runtime: Runtime, queues: list[str], every: float
) -> None:
    """Publish each queue's backlog and poller count as gauges, the autoscaling signal."""
    meter = runtime.metric_meter
    backlog = meter.create_gauge("keel_task_queue_backlog", "Tasks waiting for a worker")
    age = meter.create_gauge_float(
        "keel_task_queue_backlog_age_seconds", "Age of the oldest waiting task", "s"
    )
    pollers = meter.create_gauge("keel_task_queue_pollers", "Workers polling the queue")
    while True:
        try:
            for q in await describe_fleet(client, queues):
                labels = {"task_queue": q.task_queue, "kind": q.kind}
                backlog.with_additional_attributes(labels).set(q.backlog)
                age.with_additional_attributes(labels).set(q.backlog_age_seconds)
                pollers.with_additional_attributes(labels).set(len(q.pollers))
        except Exception as err:  # noqa: BLE001 - metrics must never take a worker down
            log.warning("fleet_metrics.failed", error=str(err))
        await asyncio.sleep(every)


async def run_worker(settings: WorkerSettings, stop: asyncio.Event | None = None) -> None:
    """Run one worker process until ``stop`` is set or it gets SIGINT/SIGTERM.

    On the signal every queue's worker stops polling at once, running activities get
    ``graceful_shutdown_seconds`` to finish, and the process exits; Temporal hands any
    unfinished work to the other workers.

    Args:
        settings: Worker configuration.
        stop: Optional event to stop on (tests); signals are handled either way.
    """
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    runtime = metrics_runtime(settings.metrics_port)
    client = await connect(runtime=runtime)
    deps = deps_from_settings(settings)
    try:
        await deps.store.ping()
    except RedisError as err:
        await deps.aclose()
        raise RedisUnavailable(
            f"cannot reach Redis at {loggable_url(settings.redis_url)} ({err}); "
            "start one with `keel dev`, or set REDIS_URL"
        ) from None
    # One plugin, one set of clients, shared by every queue's worker.
    plugin = KeelPlugin(deps)
    workers = [build_worker(client, settings, q, plugin=plugin) for q in settings.queues()]
    gauges = None
    if runtime is not None:
        gauges = asyncio.create_task(
            export_fleet_gauges(client, runtime, settings.queues(), settings.metrics_poll_seconds)
        )
    log.info(
        "worker.started",
        task_queues=settings.queues(),
        identity=workers[0].config().get("identity"),
        llm_endpoint=loggable_url(settings.openai_base_url),
        metrics_port=settings.metrics_port,
        build_id=settings.build_id,
    )
    running = [asyncio.create_task(w.run()) for w in workers]
    stopping = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait([*running, stopping], return_when=asyncio.FIRST_COMPLETED)
        log.info("worker.stopping", grace_seconds=settings.graceful_shutdown_seconds)
        # Every queue stops polling at once; running activities drain in parallel.
        await asyncio.gather(*(w.shutdown() for w in workers), return_exceptions=True)
        failures = [r for r in await asyncio.gather(*running, return_exceptions=True) if r]
        if failures:
            raise failures[0]
    finally:
        stopping.cancel()
        if gauges is not None:
            gauges.cancel()
        await deps.aclose()
        log.info("worker.stopped")
