"""The worker fleet as Temporal sees it: pollers and backlog per task queue.

These are the figures an autoscaler should act on (a growing backlog, or a backlog that ages,
means too few workers; no pollers means none at all). ``keel fleet`` prints them and every
worker exports them as Prometheus gauges.
"""

from __future__ import annotations

import os
from datetime import datetime
from typing import Any

from pydantic import BaseModel
from temporalio.api.enums.v1 import DescribeTaskQueueMode, TaskQueueKind, TaskQueueType
from temporalio.api.taskqueue.v1 import PollerInfo, TaskQueue, TaskQueueVersionSelection
from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest
from temporalio.client import Client

from keel.workflows import TASK_QUEUES

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
        pollers = await _pollers(client, name)
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
            # Union with the root partition's pollers: each view can miss one the other has.
            found = pollers[queue_type] | {p.identity: _poller(p) for p in resp.pollers}
            stats.append(
                QueueStats(
                    task_queue=name,
                    kind=kind,
                    pollers=sorted(found.values(), key=lambda p: p.identity),
                    backlog=s.approximate_backlog_count,
                    backlog_age_seconds=s.approximate_backlog_age.ToTimedelta().total_seconds(),
                    add_rate=s.tasks_add_rate,
                    dispatch_rate=s.tasks_dispatch_rate,
                )
            )
    return stats


async def _pollers(client: Client, name: str) -> dict[int, dict[str, Poller]]:
    """Pollers of every partition and build of a queue, by task type.

    The default describe mode reads the root partition only and can miss workers for a while;
    the enhanced mode gathers every partition (and every worker build, when versioned).
    """
    resp = await client.workflow_service.describe_task_queue(
        DescribeTaskQueueRequest(
            namespace=client.namespace,
            task_queue=TaskQueue(name=name, kind=TaskQueueKind.TASK_QUEUE_KIND_NORMAL),
            api_mode=DescribeTaskQueueMode.DESCRIBE_TASK_QUEUE_MODE_ENHANCED,
            versions=TaskQueueVersionSelection(unversioned=True),
            task_queue_types=list(KINDS.values()),
            report_pollers=True,
        )
    )
    found: dict[int, dict[str, Poller]] = {t: {} for t in KINDS.values()}
    for version in resp.versions_info.values():
        for queue_type, info in version.types_info.items():
            for p in info.pollers:
                found.setdefault(queue_type, {})[p.identity] = _poller(p)
    return found


def _poller(info: PollerInfo) -> Poller:
    seen = info.last_access_time.ToDatetime() if info.HasField("last_access_time") else None
    return Poller(identity=info.identity, last_access=seen)


async def breaker_states() -> dict[str, dict[str, Any]] | None:
    """The circuit breakers the fleet shares in Redis (``REDIS_URL``), by name (issue 16).

    Returns:
        Each breaker that has tripped: ``state`` (closed, open, half_open) and ``open_until``
        (epoch seconds, None when closed); None when Redis cannot be reached.
    """
    from redis.exceptions import RedisError

    from keel.activities.breakers import Breakers

    breakers = Breakers.from_url(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
    try:
        return await breakers.states()
    except (RedisError, OSError):
        return None
    finally:
        await breakers.aclose()
