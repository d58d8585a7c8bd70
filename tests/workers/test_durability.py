"""Durability: kill -9 a worker mid-job, or restart the Temporal server under a running worker;
nothing is lost or done twice."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import redis.asyncio as aioredis
from temporalio.api.enums.v1 import EventType
from temporalio.testing import WorkflowEnvironment

from keel.activities.store import notes_list_key
from keel.client import AgentJobs, Budget, JobRequest
from tests.conftest import (
    free_port,
    start_dev_server,
    unique,
    venv_bin,
    wait_port,
    worker_process_env,
)
from tests.workers.conftest import StartWorker, wait_polling

JOBS = 6


async def until_acting(jobs: AgentJobs, ids: list[str]) -> None:
    """Return once some job is in its act phase (or just past it), so tool calls are in flight."""
    while True:
        states = [(await jobs.status(j)).state for j in ids]
        if "acting" in states or "verifying" in states:
            return
        await asyncio.sleep(0.05)


def spawn_worker(env: WorkflowEnvironment, task_queue: str, redis_url: str, sim_url: str):  # type: ignore[no-untyped-def]
    return subprocess.Popen(
        [sys.executable, "-m", "keel.workers.cli", "worker", "--task-queue", task_queue],
        env=worker_process_env(env, redis_url, sim_url),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


async def test_kill_9_mid_job_completes_every_job_with_notes_written_once(
    env: WorkflowEnvironment, redis_url: str, sim_url: str, redis_client: aioredis.Redis
) -> None:
    task_queue, tenant = unique("tq-dur"), unique("dur")
    first = spawn_worker(env, task_queue, redis_url, sim_url)
    second = None
    try:
        jobs = AgentJobs(env.client, task_queue=task_queue)
        ids = [
            await jobs.start(
                JobRequest(
                    goal=f"Write a note about item {i} with write_note [sim: slow=300]",
                    tenant=tenant,
                    tools=["write_note"],
                )
            )
            for i in range(JOBS)
        ]

        # Kill as soon as some job is in its act phase, so notes are in flight.
        await asyncio.wait_for(until_acting(jobs, ids), 60)
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
        second = spawn_worker(env, task_queue, redis_url, sim_url)
        results = await asyncio.gather(*(jobs.result(j, timeout=180) for j in ids))
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=30)

    assert [r.outcome for r in results] == ["completed"] * JOBS
    notes = await redis_client.lrange(notes_list_key(tenant), 0, -1)
    per_job = Counter(op_key.rsplit(":", 2)[0] for op_key in notes)
    assert per_job == Counter(dict.fromkeys(ids, 1))


async def test_a_server_restart_under_a_running_worker_loses_no_job(
    tmp_path: Path, redis_url: str, sim_url: str, redis_client: aioredis.Redis
) -> None:
    """The server (SQLite file) stops mid-job and comes back on the same address; the worker,
    left running, reconnects by itself and every job completes with its note written once."""
    database, port = str(tmp_path / "temporal.db"), free_port()
    server = await start_dev_server(dev_server_database_filename=database, port=port)
    task_queue, tenant = unique("tq-restart"), unique("restart")
    worker = spawn_worker(server, task_queue, redis_url, sim_url)
    try:
        jobs = AgentJobs(server.client, task_queue=task_queue)
        request = JobRequest(
            goal="Write a note about the restart with write_note [sim: slow=300]",
            tenant=tenant,
            tools=["write_note"],
        )
        ids = [await jobs.start(request) for _ in range(3)]
        await asyncio.wait_for(until_acting(jobs, ids), 60)
        await server.shutdown()
        await asyncio.sleep(1)
        server = await start_dev_server(dev_server_database_filename=database, port=port)
        jobs = AgentJobs(server.client, task_queue=task_queue)
        results = await asyncio.gather(*(jobs.result(j, timeout=180) for j in ids))
        assert worker.poll() is None, "the worker exited while the server was away"
    finally:
        if worker.poll() is None:
            worker.terminate()
            worker.wait(timeout=30)
        await server.shutdown()

    assert [r.outcome for r in results] == ["completed"] * len(ids)
    notes = await redis_client.lrange(notes_list_key(tenant), 0, -1)
    assert Counter(op_key.rsplit(":", 2)[0] for op_key in notes) == Counter(dict.fromkeys(ids, 1))


def redis_server(port: int, data: Path) -> subprocess.Popen[bytes]:
    """A redis-server that keeps what it is sent in an append-only file, as production's does."""
    argv = ["--port", str(port), "--bind", "127.0.0.1", "--dir", str(data), "--appendonly", "yes"]
    proc = subprocess.Popen(
        [venv_bin("redis-server"), *argv], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    wait_port(port, proc, "redis-server")
    return proc


async def test_a_redis_outage_mid_job_delays_jobs_but_loses_none(
    env: WorkflowEnvironment, start_worker: StartWorker, tmp_path: Path
) -> None:
    """Redis goes away while jobs are about to write their notes and is back 2 s later: the
    writes fail, Temporal retries them with backoff, and each note is written once.

    The jobs allow 5 retries per tool, so the waits between attempts (the upper halves of
    0.25, 0.5, 1, 2 and 4 s, jittered) add up to at least 3.9 s and ride out the outage; with
    the default 3, a call can spend its retries first and the job ends as ``budget_exhausted``
    (``max_retries_per_tool``) with its partial result, as budgets do.
    """
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    store = redis_server(port, tmp_path)
    task_queue, tenant = unique("tq-redis"), unique("outage")
    worker = start_worker(task_queue, "outage-1", REDIS_URL=url)
    try:
        await wait_polling(env.client, task_queue, [worker])
        jobs = AgentJobs(env.client, task_queue=task_queue)
        request = JobRequest(
            goal="Write a note about the outage with write_note [sim: slow=300]",
            tenant=tenant,
            tools=["write_note"],
            budget=Budget(max_retries_per_tool=5),
        )
        ids = [await jobs.start(request) for _ in range(4)]
        store.kill()  # the plan takes 300 ms, so every note is written while Redis is away
        store.wait(timeout=10)
        await asyncio.sleep(2)
        store = redis_server(port, tmp_path)
        results = await asyncio.gather(*(jobs.result(j, timeout=120) for j in ids))
        notes = await aioredis.Redis.from_url(url).lrange(notes_list_key(tenant), 0, -1)
    finally:
        store.terminate()
        store.wait(timeout=10)

    assert [r.outcome for r in results] == ["completed"] * len(ids), worker.log_tail()
    written = Counter(op_key.decode().rsplit(":", 2)[0] for op_key in notes)
    assert written == Counter(dict.fromkeys(ids, 1))
    retried = [
        e.activity_task_started_event_attributes.attempt
        for h in await asyncio.gather(
            *(env.client.get_workflow_handle(j).fetch_history() for j in ids)
        )
        for e in h.events
        if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED
    ]
    assert max(retried) > 1, "no call met the outage; the test proved nothing"


def test_a_worker_without_redis_says_so_and_exits(env: WorkflowEnvironment, sim_url: str) -> None:
    port = free_port()  # nothing listens there
    settings = worker_process_env(
        env, f"redis://:hunter2-pass@127.0.0.1:{port}/0", sim_url, KEEL_TASK_QUEUES=unique("tq")
    )
    done = subprocess.run(
        [sys.executable, "-m", "keel.workers.cli", "worker"],
        env=settings,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1, done.stderr
    assert f"cannot reach Redis at redis://127.0.0.1:{port}/0" in done.stderr, done.stderr
    assert "hunter2" not in done.stderr and "Traceback" not in done.stderr
