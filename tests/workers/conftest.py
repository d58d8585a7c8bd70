"""Fleet fixtures: `keel worker` subprocesses on the session's servers, and waiting for them."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from temporalio.api.enums.v1 import DescribeTaskQueueMode, TaskQueueType
from temporalio.api.taskqueue.v1 import TaskQueue, TaskQueueVersionSelection
from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest
from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment

from tests.conftest import worker_process_env

GRACE_SECONDS = 30.0
"""KEEL_GRACEFUL_SHUTDOWN_SECONDS of every worker (the default, stated explicitly)."""
KINDS = (TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW, TaskQueueType.TASK_QUEUE_TYPE_ACTIVITY)


@dataclass
class FleetWorker:
    """One ``keel worker`` subprocess and the file its output goes to."""

    identity: str
    proc: subprocess.Popen[bytes]
    log: Path

    def log_tail(self, lines: int = 40) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return f"--- {self.identity} log ---\n" + "\n".join(text.splitlines()[-lines:])


StartWorker = Callable[..., FleetWorker]
"""``start(task_queue, identity, **extra_env)``: one more worker process."""


@pytest.fixture
def start_worker(
    env: WorkflowEnvironment, redis_url: str, sim_url: str, tmp_path: Path
) -> Iterator[StartWorker]:
    """Start ``python -m workers.cli worker`` subprocesses; any still running are stopped after."""
    started: list[FleetWorker] = []
    worker_env = worker_process_env(
        env, redis_url, sim_url, KEEL_GRACEFUL_SHUTDOWN_SECONDS=str(GRACE_SECONDS)
    )

    def start(task_queue: str, identity: str, **extra_env: str) -> FleetWorker:
        log = tmp_path / f"worker-{identity}.log"
        argv = ["worker", "--task-queue", task_queue, "--identity", identity]
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "keel.workers.cli", *argv],
                env=worker_env | extra_env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        started.append(FleetWorker(identity, proc, log))
        return started[-1]

    yield start
    for w in started:
        if w.proc.poll() is None:
            w.proc.terminate()
    for w in started:
        try:
            w.proc.wait(timeout=GRACE_SECONDS + 15)
        except subprocess.TimeoutExpired:
            w.proc.kill()
            w.proc.wait(timeout=10)


async def until(
    check: Callable[[], Awaitable[bool]], timeout: float, what: str, poll: float = 0.05
) -> None:
    """Poll ``check`` until it returns true; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(poll)


async def wait_polling(client: Client, task_queue: str, workers: list[FleetWorker]) -> None:
    """Wait until every worker polls both the workflow and the activity tasks of the queue."""
    wanted = {w.identity for w in workers}

    async def all_polling() -> bool:
        for w in workers:
            if w.proc.poll() is not None:
                pytest.fail(f"{w.identity} exited with {w.proc.returncode}\n{w.log_tail()}")
        # ENHANCED mode gathers pollers from every partition of the queue. The default mode
        # reads the root partition only, which may not see a worker's pollers for a minute.
        resp = await client.workflow_service.describe_task_queue(
            DescribeTaskQueueRequest(
                namespace=client.namespace,
                task_queue=TaskQueue(name=task_queue),
                api_mode=DescribeTaskQueueMode.DESCRIBE_TASK_QUEUE_MODE_ENHANCED,
                versions=TaskQueueVersionSelection(unversioned=True),
                task_queue_types=KINDS,
                report_pollers=True,
            )
        )
        polling: dict[int, set[str]] = {kind: set() for kind in KINDS}
        for version in resp.versions_info.values():
            for kind, info in version.types_info.items():
                polling.setdefault(kind, set()).update(p.identity for p in info.pollers)
        return all(wanted <= polling[kind] for kind in KINDS)

    await until(all_polling, 60, f"{sorted(wanted)} to poll {task_queue}", poll=0.2)
