"""Stop-and-ask, cancellation and notify-workflow: the job's conversation with its caller."""

from __future__ import annotations

import asyncio

import pytest
from temporalio import workflow
from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment

from keel.client import AgentJobs, InputRejected, JobRequest, JobResult
from keel.workflows.types import NOTIFY_SIGNAL
from tests.conftest import unique
from tests.workflows.test_agent_loop import replay_own_history


async def wait_for_state(jobs: AgentJobs, job_id: str, state: str, timeout: float = 30) -> None:
    async def poll() -> None:
        while (await jobs.status(job_id)).state != state:
            await asyncio.sleep(0.1)

    await asyncio.wait_for(poll(), timeout)


async def test_question_answered_by_update(client: Client, make_worker) -> None:
    async with make_worker(client) as worker:
        jobs = AgentJobs(client, task_queue=worker.task_queue)
        job_id = await jobs.start(JobRequest(goal="Summarise the report [sim: ask]"))
        with pytest.raises(InputRejected):
            await jobs.send_input(job_id, "too early")  # validator: nothing pending yet
        await wait_for_state(jobs, job_id, "waiting_for_input")
        status = await jobs.status(job_id)
        assert status.pending_question and "?" in status.pending_question
        ack = await jobs.send_input(job_id, "The Q3 sales report")
        assert "answer recorded" in ack
        result = await jobs.result(job_id, timeout=60)
        assert result.outcome == "completed"
        assert "Clarified: The Q3 sales report" in (result.answer or "")
        with pytest.raises(InputRejected):
            await jobs.send_input(job_id, "late")
        await replay_own_history(client, job_id, record_as="ask_answered")


async def test_question_answered_by_signal(client: Client, make_worker) -> None:
    async with make_worker(client) as worker:
        jobs = AgentJobs(client, task_queue=worker.task_queue)
        job_id = await jobs.start(JobRequest(goal="Summarise the memo [sim: ask]"))
        await wait_for_state(jobs, job_id, "waiting_for_input")
        await jobs.signal_input(job_id, "The March memo")
        result = await jobs.result(job_id, timeout=60)
    assert "Clarified: The March memo" in (result.answer or "")


async def test_question_times_out_to_default_assumption(
    time_skipping_env: WorkflowEnvironment, make_worker
) -> None:
    client = time_skipping_env.client
    async with make_worker(client) as worker:
        jobs = AgentJobs(client, task_queue=worker.task_queue)
        req = JobRequest(goal="Summarise it [sim: ask]", ask_timeout_seconds=6 * 3600)
        job_id = await jobs.start(req)
        await wait_for_state(jobs, job_id, "waiting_for_input")
        await time_skipping_env.sleep(6 * 3600 + 60)  # six hours pass in moments
        result = await jobs.result(job_id, timeout=60)
    assert result.outcome == "completed"
    assert "Clarified: Assume the most common interpretation." in (result.answer or "")


async def test_cancel_ends_gracefully_with_partial_result(client: Client, make_worker) -> None:
    async with make_worker(client) as worker:
        jobs = AgentJobs(client, task_queue=worker.task_queue)
        job_id = await jobs.start(JobRequest(goal="Summarise the paper [sim: ask]"))
        await wait_for_state(jobs, job_id, "waiting_for_input")
        await jobs.cancel(job_id)
        result = await jobs.result(job_id, timeout=30)
        assert result.outcome == "cancelled"
        assert (await jobs.status(job_id)).state == "cancelled"
        await replay_own_history(client, job_id, record_as="cancelled")


@workflow.defn(sandboxed=False)
class ListenerWorkflow:
    """A caller that is itself a workflow and waits to be told a job ended."""

    def __init__(self) -> None:
        self.result: JobResult | None = None

    @workflow.run
    async def run(self) -> JobResult:
        await workflow.wait_condition(lambda: self.result is not None)
        assert self.result is not None
        return self.result

    @workflow.signal(name=NOTIFY_SIGNAL)
    def job_finished(self, result: JobResult) -> None:
        self.result = result


async def test_notify_workflow_is_signalled(client: Client, make_worker) -> None:
    from temporalio.worker import Worker

    async with make_worker(client) as worker:
        listener_id = unique("listener")
        async with Worker(
            client, task_queue=worker.task_queue + "-l", workflows=[ListenerWorkflow]
        ):
            listener = await client.start_workflow(
                ListenerWorkflow.run, id=listener_id, task_queue=worker.task_queue + "-l"
            )
            jobs = AgentJobs(client, task_queue=worker.task_queue)
            job_id = await jobs.start(
                JobRequest(goal="What is 8 + 8?", notify_workflow=listener_id)
            )
            told = await asyncio.wait_for(listener.result(), 60)
    assert told.job_id == job_id and told.outcome == "completed"
