"""Waiting callers wait on the server's history long poll (issue 16), against the dev server.

``result`` with a timeout (and so ``keel result --timeout`` and the API's ``wait``) used to poll
``describe`` every 0.5 s. These tests hold it to the long poll: it answers as soon as the job
closes, gives up at its deadline with the job still running, makes a handful of history calls
and no describe over a wait, follows continue-as-new, and leaves nothing in flight that keeps a
process from exiting.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from temporalio import workflow
from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.worker import Worker

from keel.client import AgentJobs, JobRequest, JobTimeout
from keel.client._long_poll import wait_closed
from keel.workflows.types import job_id_for
from tests.conftest import unique

GOAL = "What is 6 * 7? use calculator"


def idle_queue() -> str:
    """A task queue no worker polls: a job started there runs (stays open) and never moves."""
    return unique("idle")


async def start_idle(client: Client, queue: str) -> tuple[AgentJobs, str]:
    jobs = AgentJobs(client, task_queue=queue)
    return jobs, await jobs.start(JobRequest(goal=GOAL), request_key=unique("wait"))


async def test_result_answers_as_soon_as_the_job_closes(client: Client, make_worker) -> None:
    queue = idle_queue()
    jobs, job_id = await start_idle(client, queue)
    waiting = asyncio.ensure_future(jobs.result(job_id, timeout=120))
    await asyncio.sleep(1.0)  # the wait is parked on the server's long poll by now
    assert not waiting.done()
    async with make_worker(client, task_queue=queue):
        result = await waiting
        returned = time.time()
    assert result.outcome == "completed" and "42" in (result.answer or "")
    history = await client.get_workflow_handle(job_id).fetch_history()
    closed = history.events[-1].event_time.ToDatetime().timestamp()
    # The old wait checked every 0.5 s; the long poll answers when the close event is written.
    assert returned - closed < 0.4, f"result came {returned - closed:.2f}s after the job closed"


async def test_timeout_raises_at_the_deadline_and_the_job_keeps_running(client: Client) -> None:
    jobs, job_id = await start_idle(client, idle_queue())
    handle = client.get_workflow_handle(job_id)
    try:
        started = time.monotonic()
        with pytest.raises(JobTimeout) as raised:
            await jobs.result(job_id, timeout=1.5)
        waited = time.monotonic() - started
        assert 1.45 <= waited < 1.5 + 0.5, f"JobTimeout after {waited:.2f}s"
        assert raised.value.job_id == job_id and raised.value.timeout == 1.5
        assert (await handle.describe()).status == WorkflowExecutionStatus.RUNNING

        # A deadline shorter than the server's soft-timeout buffer still waits, not spins.
        started = time.monotonic()
        with pytest.raises(JobTimeout):
            await jobs.final_result(job_id, timeout=0.3)
        assert 0.25 <= time.monotonic() - started < 0.8
    finally:
        await handle.terminate("test over")


def count_rpcs(monkeypatch: pytest.MonkeyPatch, client: Client) -> dict[str, int]:
    """Count the calls the client makes to the RPCs a wait could use."""
    counts = {"describe": 0, "history": 0}
    service = client.workflow_service

    def counting(name: str, rpc: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        async def call(*args: Any, **kwargs: Any) -> Any:
            counts[name] += 1
            return await rpc(*args, **kwargs)

        return call

    monkeypatch.setattr(
        service,
        "describe_workflow_execution",
        counting("describe", service.describe_workflow_execution),
    )
    monkeypatch.setattr(
        service,
        "get_workflow_execution_history",
        counting("history", service.get_workflow_execution_history),
    )
    return counts


async def test_a_wait_is_a_few_long_polls_and_no_describe(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    jobs, job_id = await start_idle(client, idle_queue())
    counts = count_rpcs(monkeypatch, client)
    try:
        with pytest.raises(JobTimeout):
            await jobs.result(job_id, timeout=3.0)
        # One poll the server holds for the whole 3 s (the describe loop made 7 calls).
        assert counts == {"describe": 0, "history": 1}, counts

        # A wait longer than one poll (20 s; 2 s here, to keep the suite short) is a few
        # polls, each held by the server to its own deadline.
        from keel.client import _long_poll

        monkeypatch.setattr(_long_poll, "LONG_POLL_SECONDS", 2.0)
        counts.update(describe=0, history=0)
        with pytest.raises(JobTimeout):
            await jobs.result(job_id, timeout=5.0)
        assert counts["describe"] == 0 and 2 <= counts["history"] <= 4, counts
    finally:
        await client.get_workflow_handle(job_id).terminate("test over")


@workflow.defn(sandboxed=False)
class Chain:
    """Continues as new ``runs - 1`` times, then returns how many runs it took."""

    @workflow.run
    async def run(self, runs: int, done: int = 1) -> int:
        await workflow.sleep(timedelta(milliseconds=200))
        if done < runs:
            workflow.continue_as_new(args=[runs, done + 1])
        return done


async def test_wait_closed_follows_continue_as_new(client: Client) -> None:
    queue = unique("chain")
    async with Worker(client, task_queue=queue, workflows=[Chain]):
        handle = await client.start_workflow(
            Chain.run, args=[3], id=unique("chain"), task_queue=queue
        )
        last_run = await wait_closed(client, handle.id, 30)
        assert last_run and last_run != handle.result_run_id
        final = client.get_workflow_handle_for(Chain.run, handle.id, run_id=last_run)
        assert await final.result(follow_runs=False) == 3


async def test_missing_job_is_not_found_at_once(client: Client) -> None:
    from keel.client import JobNotFound

    jobs = AgentJobs(client)
    started = time.monotonic()
    with pytest.raises(JobNotFound):
        await jobs.result(job_id_for("acme", unique("nope")), timeout=30)
    assert time.monotonic() - started < 2


SCRIPT = """
import asyncio, sys, time
from temporalio.client import Client
from keel.activities.converter import DATA_CONVERTER
from keel.client import AgentJobs, JobTimeout

async def main() -> None:
    client = await Client.connect(sys.argv[1], namespace=sys.argv[2], data_converter=DATA_CONVERTER)
    try:
        await AgentJobs(client).result(sys.argv[3], timeout=1.0)
    except JobTimeout:
        print("timed out", flush=True)

asyncio.run(main())
"""


async def test_a_process_exits_promptly_after_a_timed_out_wait(
    client: Client, tmp_path: Path
) -> None:
    _, job_id = await start_idle(client, idle_queue())
    script = tmp_path / "wait.py"
    script.write_text(textwrap.dedent(SCRIPT))
    target = client.service_client.config.target_host
    try:
        started = time.monotonic()
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(script),
            target,
            client.namespace,
            job_id,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=os.environ,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 30)
        took = time.monotonic() - started
        assert out.decode().strip() == "timed out", err.decode()[-2000:]
        # A cancelled long poll kept the old ``wait_for(handle.result())`` process alive until
        # the server answered it (up to 20 s), or forever; nothing is in flight here.
        assert took < 8, f"the process took {took:.1f}s to exit"
    finally:
        await client.get_workflow_handle(job_id).terminate("test over")
