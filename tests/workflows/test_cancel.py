"""Cancel means cancelled, in every phase: the job ends ``cancelled`` with its partial result.

Before issue 13, a cancel that arrived while a model call was in flight ended the job ``failed``
(``LLMTransient: answer call failed: Cancelled``): the activity's cancellation was read as a
failed call. Each test cancels a job while it is planning, acting, verifying or waiting for
input, and checks the outcome, the history (completed, never failed) and that it replays.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from temporalio.api.enums.v1 import EventType
from temporalio.client import Client

from keel.client import AgentJobs, JobRequest
from keel.workflows.types import JobState
from tests.conftest import unique
from tests.workflows.test_agent_loop import replay_own_history

SLOW_SECONDS = 20
"""How long a slow model call or tool takes: far longer than a test waits to cancel it."""


@contextlib.contextmanager
def slow_server() -> Iterator[str]:
    """An HTTP server whose every answer takes SLOW_SECONDS (or until it is shut down)."""
    stop = threading.Event()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the http.server hook name
            stop.wait(SLOW_SECONDS)
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"late")

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            """Quiet."""

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/slow"
    finally:
        stop.set()
        server.shutdown()
        server.server_close()


async def wait_for_state(jobs: AgentJobs, job_id: str, state: JobState) -> None:
    deadline = time.monotonic() + 60
    while (await jobs.status(job_id)).state != state:
        assert time.monotonic() < deadline, f"{job_id} never reached {state}"
        await asyncio.sleep(0.1)
    await asyncio.sleep(0.3)  # the phase's call is in flight now


async def cancel_in(  # type: ignore[no-untyped-def]
    client: Client, make_worker, req: JobRequest, state: JobState, record_as: str | None = None
):
    async with make_worker(client) as worker:
        jobs = AgentJobs(client, task_queue=worker.task_queue)
        job_id = await jobs.start(req, request_key=unique("cancel"))
        await wait_for_state(jobs, job_id, state)
        await jobs.cancel(job_id)
        result = await jobs.result(job_id, timeout=60)
        status = await jobs.status(job_id)
    history = await client.get_workflow_handle(job_id).fetch_history()
    kinds = {e.event_type for e in history.events}
    assert EventType.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED in kinds
    assert EventType.EVENT_TYPE_WORKFLOW_EXECUTION_FAILED not in kinds
    assert result.outcome == "cancelled" and result.error is None
    assert status.state == "cancelled"
    await replay_own_history(client, job_id, record_as=record_as)
    return result


async def test_cancel_while_planning(client: Client, make_worker) -> None:
    # Forced onto a tier, so the first call is the plan (no router call before it).
    goal = f"What is 2 + 2? use calculator [sim: slow={SLOW_SECONDS * 1000}]"
    req = JobRequest(goal=goal, tier="deep")
    result = await cancel_in(client, make_worker, req, "planning", "cancelled_in_flight")
    # The plan call was reserved (a step) but never answered, so it cost nothing.
    assert result.usage.steps == 1 and result.usage.tokens == 0


async def test_cancel_while_acting(client: Client, make_worker) -> None:
    with slow_server() as url:
        req = JobRequest(goal=f"Fetch {url} with http_get", tools=["http_get"])
        result = await cancel_in(client, make_worker, req, "acting")
    # The plan was paid for; the tool call was reserved and cut short.
    assert result.usage.tokens > 0 and result.usage.tool_calls == 1


async def test_cancel_while_verifying(client: Client, make_worker) -> None:
    # Every model call takes 3 s: the cancel lands while the draft is being written.
    req = JobRequest(goal="What is 4 + 4? use calculator [sim: slow=3000]")
    result = await cancel_in(client, make_worker, req, "verifying")
    assert result.usage.steps >= 2 and result.usage.tool_calls == 1


async def test_cancel_while_waiting_for_input(client: Client, make_worker) -> None:
    req = JobRequest(goal="Book the usual [sim: ask]", tools=["calculator"])
    result = await cancel_in(client, make_worker, req, "waiting_for_input")
    assert result.outcome == "cancelled"


async def test_keel_cancel_then_result_through_the_cli(client: Client, make_worker) -> None:
    target = client.service_client.config.target_host
    env = os.environ | {"TEMPORAL_ADDRESS": target, "TEMPORAL_NAMESPACE": client.namespace}
    env.pop("KEEL_API_URL", None)

    async def keel(*argv: str) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "keel.workers.cli", *argv, env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        return proc.returncode or 0, out.decode(), err.decode()

    # Forced onto a tier: with the router's call first, the job reaches planning only after
    # that slow call, and the test waited it out (20 s) before it could cancel.
    goal = f"What is 3 + 3? use calculator [sim: slow={SLOW_SECONDS * 1000}]"
    req = JobRequest(goal=goal, tier="deep")
    async with make_worker(client) as worker:
        jobs = AgentJobs(client, task_queue=worker.task_queue)
        job_id = await jobs.start(req)
        await wait_for_state(jobs, job_id, "planning")
        code, out, err = await keel("cancel", job_id)
        assert code == 0, err
        code, out, err = await keel("result", job_id, "--json", "--timeout", "60")
    assert code == 0, err
    assert json.loads(out)["outcome"] == "cancelled"
