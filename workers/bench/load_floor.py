"""The floor ``keel bench load`` holds Keel against: a bare Temporal job of the same shape.

Plan, a calculator call, answer and verify as plain activities: the three model calls sleep a
latency drawn uniformly from the range in the input, as the simulator answers Keel's, and the
calculator returns at once, as Keel's runs in the worker. No converter, codec, interceptor,
heartbeat, Redis or search attribute: what is left is what Temporal itself costs per job.

Run as its own process (``python -m keel.workers.bench.load_floor``), so its CPU and memory
are read per process like a ``keel worker``'s. It imports the SDK and the standard library
only (and uvloop, when ``keel worker`` runs on it), so the floor's memory holds none of Keel's
libraries; the bench passes it the slot, cache, poller and event-loop settings a ``keel
worker`` gets.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta

from temporalio import activity, workflow
from temporalio.client import Client
from temporalio.runtime import PrometheusConfig, Runtime, TelemetryConfig
from temporalio.worker import (
    PollerBehavior,
    PollerBehaviorAutoscaling,
    PollerBehaviorSimpleMaximum,
    UnsandboxedWorkflowRunner,
    Worker,
)

FLOOR_TIMEOUT = timedelta(minutes=5)
"""Start-to-close timeout of the floor's activities (Temporal requires one): above any latency
the benchmark draws, so no call is ever timed out."""


@dataclass(frozen=True)
class FloorInput:
    """One floor job: its tag and the model calls' latency range, in seconds."""

    tag: str
    latency_min_s: float
    latency_max_s: float


@activity.defn(name="bench__model_call")
async def floor_model_call(call: FloorInput) -> str:
    """Wait as long as a model call, drawn uniformly from the input's range."""
    await asyncio.sleep(random.uniform(call.latency_min_s, call.latency_max_s))  # noqa: S311
    return call.tag


@activity.defn(name="bench__calculator")
async def floor_calculator(call: FloorInput) -> str:
    """Return at once, as Keel's calculator does (it runs in the worker, no model call)."""
    return call.tag


@workflow.defn(name="BenchLoadFloorWorkflow")
class LoadFloorWorkflow:
    """Plan, calculator, answer, verify: Keel's small job with nothing of Keel's around it."""

    @workflow.run
    async def run(self, job: FloorInput) -> str:
        """Run the four calls in order and return the last one's result."""
        await self._call(floor_model_call, job)
        await self._call(floor_calculator, job)
        await self._call(floor_model_call, job)
        return await self._call(floor_model_call, job)

    async def _call(self, fn: Callable[[FloorInput], Awaitable[str]], job: FloorInput) -> str:
        return await workflow.execute_activity(fn, job, start_to_close_timeout=FLOOR_TIMEOUT)


def poller_behavior(max_pollers: int) -> PollerBehavior:
    """Autoscaling pollers up to ``max_pollers``; 0 means the SDK's fixed five."""
    if max_pollers > 0:
        return PollerBehaviorAutoscaling(maximum=max_pollers)
    return PollerBehaviorSimpleMaximum(maximum=5)


async def _serve(args: argparse.Namespace) -> None:
    runtime = Runtime(
        telemetry=TelemetryConfig(
            metrics=PrometheusConfig(bind_address=f"127.0.0.1:{args.metrics_port}")
        )
    )
    client = await Client.connect(
        os.environ["TEMPORAL_ADDRESS"],
        namespace=os.environ.get("TEMPORAL_NAMESPACE", "default"),
        runtime=runtime,
    )
    pollers = poller_behavior(args.max_pollers)
    worker = Worker(
        client,
        task_queue=args.task_queue,
        workflows=[LoadFloorWorkflow],
        activities=[floor_model_call, floor_calculator],
        # As ``keel worker`` runs workflows by default (``KEEL_WORKFLOW_SANDBOX`` off).
        workflow_runner=UnsandboxedWorkflowRunner(),
        identity=args.identity,
        max_concurrent_activities=args.max_concurrent_activities,
        max_concurrent_workflow_tasks=args.max_concurrent_workflow_tasks,
        max_cached_workflows=args.max_cached_workflows,
        workflow_task_poller_behavior=pollers,
        activity_task_poller_behavior=pollers,
    )
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    async with worker:
        await stop.wait()


def main(argv: list[str] | None = None) -> None:
    """Poll one task queue with the floor's workflow and activities until SIGTERM."""
    parser = argparse.ArgumentParser(prog="keel.workers.bench.load_floor")
    parser.add_argument("--task-queue", required=True)
    parser.add_argument("--identity", required=True)
    parser.add_argument("--metrics-port", type=int, required=True)
    parser.add_argument("--max-concurrent-activities", type=int, required=True)
    parser.add_argument("--max-concurrent-workflow-tasks", type=int, required=True)
    parser.add_argument("--max-cached-workflows", type=int, required=True)
    parser.add_argument("--max-pollers", type=int, default=0)
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop, as keel worker")
    args = parser.parse_args(argv)
    if args.uvloop:
        import uvloop

        uvloop.run(_serve(args))
    else:
        asyncio.run(_serve(args))


if __name__ == "__main__":
    main()
