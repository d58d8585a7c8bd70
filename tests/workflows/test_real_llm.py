"""Opt-in: the demo job against a real OpenAI-compatible endpoint, so prompts and schemas are
known to suit a real model. Runs only when OPENAI_API_KEY is set."""

from __future__ import annotations

import os

import pytest
from temporalio.client import Client

from keel.client import AgentJobs, Budget, JobRequest
from tests.conftest import unique

pytestmark = pytest.mark.skipif(
    not os.environ.get("OPENAI_API_KEY"), reason="set OPENAI_API_KEY to run against a real model"
)


async def test_demo_job_against_real_model(client: Client, make_worker) -> None:
    async with make_worker(
        client,
        base_url=os.environ.get("OPENAI_BASE_URL", "https://api.openai.com/v1"),
        api_key=os.environ["OPENAI_API_KEY"],
        model=os.environ.get("KEEL_TEST_MODEL", "gpt-4.1-mini"),
    ) as worker:
        jobs = AgentJobs(client, task_queue=worker.task_queue)
        req = JobRequest(
            goal="What is 17 * (23 + 4)? Use the calculator and write a note with the result.",
            tools=["calculator", "write_note"],
            budget=Budget(max_cost_usd=0.50, max_iterations=3),
        )
        job_id = await jobs.start(req, request_key=unique("real"))
        result = await jobs.result(job_id, timeout=600)
    assert result.outcome in ("completed", "budget_exhausted")
    assert result.usage.tool_calls >= 1
    assert "459" in (result.answer or "")
