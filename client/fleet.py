"""The worker fleet as Temporal sees it: pollers and backlog per task queue.

These are the figures an autoscaler should act on (a growing backlog, or a backlog that ages,
means too few workers; no pollers means none at all). ``keel fleet`` prints them and every
worker exports them as Prometheus gauges.
"""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel
from temporalio.api.enums.v1 import TaskQueueKind, TaskQueueType
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest
from temporalio.client import Client

from workflows import TASK_QUEUES

KINDS = {
    "workflow": TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW,
    "activity": TaskQueueType.TASK_QUEUE_TYPE_ACTIVITY,
}


class Poller(BaseModel):
    """One worker polling a queue."""

    identity: str
    last_access: datetime | None = None


class QueueStats(BaseModel):
    """One task queue, for one kind of task (workflow or activity)."""

    task_queue: str
    kind: str
    pollers: list[Poller]
    backlog: int
    """Tasks waiting for a worker (approximate)."""
    backlog_age_seconds: float
    """Age of the oldest waiting task."""
    add_rate: float
    """Tasks added per second, recently."""
    dispatch_rate: float
    """Tasks handed to workers per second, recently."""


async def describe_fleet(client: Client, queues: list[str] | None = None) -> list[QueueStats]:
    """Pollers and backlog of each queue's workflow and activity tasks.

    Args:
        client: A connected client.
        queues: Task queues to describe; defaults to Keel's interactive and batch queues.

    Returns:
        One entry per queue and task kind.
    """
    stats: list[QueueStats] = []
    for name in queues or list(TASK_QUEUES.values()):
        for kind, queue_type in KINDS.items():
            resp = await client.workflow_service.describe_task_queue(
                DescribeTaskQueueRequest(
                    namespace=client.namespace,
                    task_queue=TaskQueue(name=name, kind=TaskQueueKind.TASK_QUEUE_KIND_NORMAL),
                    task_queue_type=queue_type,
                    report_stats=True,
                )
            )
            s = resp.stats
            stats.append(
                QueueStats(
                    task_queue=name,
                    kind=kind,
                    pollers=[
                        Poller(
                            identity=p.identity,
                            last_access=p.last_access_time.ToDatetime()
                            if p.HasField("last_access_time")
                            else None,
                        )
                        for p in resp.pollers
                    ],
                    backlog=s.approximate_backlog_count,
                    backlog_age_seconds=s.approximate_backlog_age.ToTimedelta().total_seconds(),
                    add_rate=s.tasks_add_rate,
                    dispatch_rate=s.tasks_dispatch_rate,
                )
            )
    return stats
