"""Worker versioning: a Worker Deployment build runs jobs once its version is current."""

from __future__ import annotations

import json
import subprocess
import sys
import time

from temporalio.testing import WorkflowEnvironment

from keel.client import AgentJobs, JobRequest
from tests.conftest import unique, venv_bin, worker_process_env


async def test_versioned_worker_runs_jobs_pinned_to_its_build(
    env: WorkflowEnvironment, redis_url: str, sim_url: str, tmp_path
) -> None:
    queue, deployment = unique("tq-ver"), unique("keel")
    address = env.client.service_client.config.target_host
    log = tmp_path / "worker.log"
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "keel.workers.cli",
            "worker",
            "--task-queue",
            queue,
            "--deployment-name",
            deployment,
            "--build-id",
            "build-1",
        ],
        env=worker_process_env(env, redis_url, sim_url),
        stdout=subprocess.DEVNULL,
        stderr=log.open("w"),
    )
    try:
        cli = [venv_bin("temporal"), "worker", "deployment"]
        for _ in range(100):  # the version exists once the worker has polled
            done = subprocess.run(
                [
                    *cli,
                    "set-current-version",
                    "--deployment-name",
                    deployment,
                    "--build-id",
                    "build-1",
                    "--yes",
                    "--address",
                    address,
                ],
                capture_output=True,
                text=True,
                timeout=30,
            )
            if done.returncode == 0:
                break
            time.sleep(0.3)
        assert done.returncode == 0, done.stderr
        jobs = AgentJobs(env.client, task_queue=queue)
        job_id = await jobs.start(JobRequest(goal="What is 2 + 2?"))
        assert (await jobs.result(job_id, timeout=60)).outcome == "completed"
        desc = subprocess.run(
            [
                venv_bin("temporal"),
                "workflow",
                "describe",
                "--workflow-id",
                job_id,
                "--address",
                address,
                "-o",
                "json",
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        info = json.loads(desc.stdout)
        assert "build-1" in json.dumps(info.get("workflowExecutionInfo", info)), desc.stdout[:2000]
    finally:
        worker.terminate()
        worker.wait(timeout=60)
    assert worker.returncode == 0, log.read_text()[-2000:]
