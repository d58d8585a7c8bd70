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
from temporalio.testing import WorkflowEnvironment

from client import AgentJobs, JobRequest
from tests.conftest import free_port, start_dev_server, unique, worker_process_env

JOBS = 6


async def until_acting(jobs: AgentJobs, ids: list[str]) -> None:
    """Return once some job is in its act phase (or just past it), so tool calls are in flight."""
    while True:
        states = [(await jobs.status(j)).state for j in ids]
        if "acting" in states or "verifying" in states:
            return
        await asyncio.sleep(0.05)


def start_worker(env: WorkflowEnvironment, task_queue: str, redis_url: str, sim_url: str):  # type: ignore[no-untyped-def]
    return subprocess.Popen(
        [sys.executable, "-m", "workers.cli", "worker", "--task-queue", task_queue],
        env=worker_process_env(env, redis_url, sim_url),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


async def test_kill_9_mid_job_completes_every_job_with_notes_written_once(
    env: WorkflowEnvironment, redis_url: str, sim_url: str, redis_client: aioredis.Redis
) -> None:
    task_queue, tenant = unique("tq-dur"), unique("dur")
    first = start_worker(env, task_queue, redis_url, sim_url)
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
        second = start_worker(env, task_queue, redis_url, sim_url)
        results = await asyncio.gather(*(jobs.result(j, timeout=180) for j in ids))
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=30)

    assert [r.outcome for r in results] == ["completed"] * JOBS
    notes = await redis_client.lrange(f"keel:notes:{tenant}", 0, -1)
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
    worker = start_worker(server, task_queue, redis_url, sim_url)
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
    notes = await redis_client.lrange(f"keel:notes:{tenant}", 0, -1)
    assert Counter(op_key.rsplit(":", 2)[0] for op_key in notes) == Counter(dict.fromkeys(ids, 1))
