"""The ``keel`` command as a user runs it: a subprocess against the real dev server and a worker."""

from __future__ import annotations

import asyncio
import json
import os
import sys

from temporalio.testing import WorkflowEnvironment

from tests.conftest import unique


async def keel(env: WorkflowEnvironment, *args: str, timeout: float = 60) -> tuple[int, str, str]:
    proc_env = os.environ | {
        "TEMPORAL_ADDRESS": env.client.service_client.config.target_host,
        "TEMPORAL_NAMESPACE": env.client.namespace,
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "keel.workers.cli",
        *args,
        env=proc_env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    return proc.returncode or 0, out.decode(), err.decode()


async def test_submit_status_result_list_in_json(env: WorkflowEnvironment, make_worker) -> None:
    tenant = unique("cli")
    async with make_worker(env.client, task_queue="keel-interactive-" + tenant) as worker:
        # The CLI submits to the default queue unless KEEL_TASK_QUEUE says otherwise.
        os.environ["KEEL_TASK_QUEUE"] = worker.task_queue
        try:
            code, out, err = await keel(
                env,
                "submit",
                "What is 12 * 12? use calculator",
                "--tenant",
                tenant,
                "--tool",
                "calculator",
                "--max-steps",
                "10",
                "--json",
            )
            assert code == 0, err
            job_id = json.loads(out)["job_id"]
            assert job_id.startswith("agent-job-")

            code, out, err = await keel(env, "result", job_id, "--json", "--timeout", "60")
            assert code == 0, err
            result = json.loads(out)
            assert result["job_id"] == job_id and result["outcome"] == "completed"
            assert "144" in result["answer"]
            assert set(result["usage"]) >= {"tokens", "cost_usd", "steps", "tool_calls"}
            assert result["exhausted_budget"] is None and result["iterations"] == 1

            code, out, err = await keel(env, "status", job_id, "--json")
            assert code == 0, err
            status = json.loads(out)
            assert status["state"] == "completed" and status["budget"]["max_steps"] == 10

            code, out, _ = await keel(env, "status", job_id)
            assert code == 0 and job_id in out  # human output never truncates the ID
            # Iterations count from 1, as in the UI's summaries: verified in the first of five.
            assert "iteration 1/5" in out

            async def listed() -> list[dict[str, object]]:
                while True:
                    code, out, err = await keel(env, "list", "--tenant", tenant, "--json")
                    assert code == 0, err
                    rows = json.loads(out)
                    if rows and rows[0].get("state") == "completed":
                        return rows
                    await asyncio.sleep(0.5)

            rows = await asyncio.wait_for(listed(), 30)
            assert [r["job_id"] for r in rows] == [job_id]
        finally:
            os.environ.pop("KEEL_TASK_QUEUE", None)


async def test_malformed_submit_creates_nothing(env: WorkflowEnvironment) -> None:
    tenant = unique("bad")
    code, out, err = await keel(
        env, "submit", "hi", "--tenant", tenant, "--max-cost", "nan", "--json"
    )
    assert code == 2 and out == ""
    assert "max_cost_usd" in err and "Traceback" not in err
    code, out, _ = await keel(env, "list", "--tenant", tenant, "--json")
    assert code == 0 and json.loads(out) == []


async def test_unknown_job_is_a_clear_error(env: WorkflowEnvironment) -> None:
    code, out, err = await keel(env, "status", "agent-job-does-not-exist", "--json")
    assert code == 1 and out == ""
    assert "agent-job-does-not-exist" in err and "Traceback" not in err


async def test_a_failed_jobs_result_is_printed_and_the_exit_is_nonzero(
    env: WorkflowEnvironment, make_worker
) -> None:
    async with make_worker(env.client, task_queue="keel-interactive-" + unique("f")) as worker:
        os.environ["KEEL_TASK_QUEUE"] = worker.task_queue
        try:
            code, out, err = await keel(
                env, "submit", "What is 1 + 1? use calculator [sim: fault=401]", "--json"
            )
            assert code == 0, err
            job_id = json.loads(out)["job_id"]
            code, out, err = await keel(env, "result", job_id, "--json", "--timeout", "60")
        finally:
            os.environ.pop("KEEL_TASK_QUEUE", None)
    assert code == 1
    result = json.loads(out)  # stdout still carries exactly one JSON document: the result
    assert result["job_id"] == job_id and result["outcome"] == "failed"
    assert result["error"].startswith("LLMAuthFailed")
    assert set(result["usage"]) >= {"tokens", "cost_usd", "steps"}
    assert "LLMAuthFailed" in err and "Traceback" not in err
