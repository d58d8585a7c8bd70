"""Fleet figures (pollers, backlog) from `keel fleet` and from a worker's Prometheus endpoint."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import sys
import time

import httpx
from temporalio.testing import WorkflowEnvironment

from keel.client import AgentJobs, JobRequest
from keel.client.fleet import describe_fleet
from tests.conftest import free_port, unique, worker_process_env


async def test_fleet_shows_pollers_and_worker_exports_metrics(
    env: WorkflowEnvironment, redis_url: str, sim_url: str, tmp_path
) -> None:
    log = tmp_path / "worker.log"
    queue, port = unique("tq-fleet"), free_port()
    proc_env = worker_process_env(env, redis_url, sim_url, KEEL_METRICS_POLL_SECONDS="0.5")
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "keel.workers.cli",
            "worker",
            "--task-queue",
            queue,
            "--identity",
            "fleet-w1",
            "--metrics-port",
            str(port),
        ],
        env=proc_env,
        stdout=subprocess.DEVNULL,
        stderr=log.open("w"),
    )
    try:
        jobs = AgentJobs(env.client, task_queue=queue)
        job_id = await jobs.start(JobRequest(goal="What is 2 + 3?"))
        assert (await jobs.result(job_id, timeout=60)).outcome == "completed"

        fleet = subprocess.run(
            [sys.executable, "-m", "keel.workers.cli", "fleet", "--task-queue", queue, "--json"],
            env=proc_env,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        rows = json.loads(fleet.stdout)
        assert {(r["task_queue"], r["kind"]) for r in rows} == {
            (queue, "workflow"),
            (queue, "activity"),
        }
        for row in rows:
            assert [p["identity"] for p in row["pollers"]] == ["fleet-w1"], rows
            assert row["backlog"] >= 0  # approximate: the server updates it lazily

        deadline = time.monotonic() + 30
        async with httpx.AsyncClient() as http:
            while True:
                text = (await http.get(f"http://127.0.0.1:{port}/metrics")).text
                pollers = re.search(
                    rf'keel_task_queue_pollers{{kind="activity",[^}}]*task_queue="{queue}"}} (\d+)',
                    text,
                )
                if pollers and pollers.group(1) == "1":
                    break
                assert time.monotonic() < deadline, text[-2000:]
                await asyncio.sleep(0.5)
        assert "keel_task_queue_backlog" in text
        assert "temporal_worker_task_slots_available" in text  # the SDK's own metrics
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=60)
    assert worker.returncode == 0, log.read_text()[-3000:]


async def test_backlog_grows_on_a_queue_nobody_polls(env: WorkflowEnvironment) -> None:
    queue = unique("tq-idle")
    jobs = AgentJobs(env.client, task_queue=queue)
    for _ in range(3):
        await jobs.start(JobRequest(goal="What is 1 + 1?"))
    deadline = time.monotonic() + 30
    while True:
        stats = await describe_fleet(env.client, [queue])
        wf = next(s for s in stats if s.kind == "workflow")
        if wf.backlog >= 3:
            break
        assert time.monotonic() < deadline, stats
        await asyncio.sleep(0.5)
    assert wf.pollers == [] and wf.backlog_age_seconds >= 0
    for workflow in [w async for w in env.client.list_workflows(f"TaskQueue = '{queue}'")]:
        await env.client.get_workflow_handle(workflow.id).terminate("test cleanup")
