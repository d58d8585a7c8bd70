"""Durability: kill -9 a worker mid-job, start another; nothing is lost or done twice."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from collections import Counter

import redis.asyncio as aioredis
from temporalio.testing import WorkflowEnvironment

from client import AgentJobs, JobRequest
from tests.conftest import unique, worker_process_env

JOBS = 6


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
        async def some_job_acting() -> None:
            while True:
                states = [(await jobs.status(j)).state for j in ids]
                if "acting" in states or "verifying" in states:
                    return
                await asyncio.sleep(0.05)

        await asyncio.wait_for(some_job_acting(), 60)
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
