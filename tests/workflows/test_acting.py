"""The act phase end to end (issue 16): steps' ids and a tool's retries shared by a wave.

Real dev server, real Redis, the simulator over HTTP, and a local HTTP server that counts what
``http_get`` asked of it.
"""

from __future__ import annotations

import itertools
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from temporalio import activity
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client
from temporalio.worker import UnsandboxedWorkflowRunner, Worker

from keel.activities.breakers import BreakerSettings
from keel.activities.cache import CacheSettings
from keel.activities.llm import LLMConfig
from keel.activities.store import KeelStore
from keel.activities.types import PlanInput, PlanResult, ToolResult
from keel.client import AgentJobs, Budget, JobRequest
from keel.workers.plugin import KeelPlugin
from keel.workers.registry import build_activities, build_deps
from tests.conftest import unique
from tests.workflows.test_agent_loop import replay_own_history, run_job


class Pages(ThreadingHTTPServer):
    """Answers every GET with ``status`` and a large body numbered by the request."""

    def __init__(self, status: int) -> None:
        self.status = status
        self.hits = 0
        self._count = itertools.count(1)
        self._lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _PageHandler)

    def next_page(self) -> int:
        with self._lock:
            self.hits += 1
            return next(self._count)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/page"


class _PageHandler(BaseHTTPRequestHandler):
    server: Pages

    def do_GET(self) -> None:  # noqa: N802 (http.server API)
        n = self.server.next_page()
        # Longer than a preview, so each output is stored by reference (a blob per op_key).
        body = f"page {n} ".encode() * 200
        self.send_response(self.server.status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def serve(status: int) -> Iterator[Pages]:
    server = Pages(status)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def pages() -> Iterator[Pages]:
    yield from serve(200)


@pytest.fixture
def failing_pages() -> Iterator[Pages]:
    yield from serve(503)


async def tool_results(client: Client, job_id: str) -> list[ToolResult]:
    """The results of a job's ``execute_tool`` calls, as its history recorded them."""
    history = await client.get_workflow_handle(job_id).fetch_history()
    kinds = {
        e.event_id: e.activity_task_scheduled_event_attributes.activity_type.name
        for e in history.events
        if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
    }
    results: list[ToolResult] = []
    for event in history.events:
        if event.event_type != EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED:
            continue
        done = event.activity_task_completed_event_attributes
        if kinds[done.scheduled_event_id] == "execute_tool":
            [result] = await client.data_converter.decode(done.result.payloads, [ToolResult])
            results.append(result)
    return results


async def assert_every_step_wrote_its_own(
    client: Client, redis_url: str, job_id: str, tenant: str
) -> None:
    """Two notes written (not one and an "already written"), and two distinct stored outputs."""
    results = await tool_results(client, job_id)
    assert sum("written" in r.content for r in results) == 2, [r.content for r in results]
    assert not any("already written" in r.content for r in results)
    refs = [r.ref for r in results if r.ref]
    assert len(refs) == 2 and len(set(refs)) == 2, refs
    store = KeelStore.from_url(redis_url)
    try:
        notes = await store.list_notes(tenant)
        outputs = await store.get_blobs(refs, job_id=job_id, tenant=tenant)
    finally:
        await store.aclose()
    assert len(notes) == 2 and len({n["op_key"] for n in notes}) == 2
    assert all(o is not None for o in outputs) and len(set(outputs)) == 2


async def test_steps_sharing_an_id_each_write_and_store_their_own(
    client: Client, make_worker, pages: Pages, redis_url: str
) -> None:
    tenant = unique("dup")
    req = JobRequest(
        goal=f"Fetch {pages.url} with http_get and keep it with write_note "
        "[sim: duplicate-step-ids, fanout=2]",
        tenant=tenant,
        tools=["http_get", "write_note"],
    )
    job_id, result, _ = await run_job(client, make_worker, req)

    assert result.outcome == "completed", result
    assert pages.hits == 2
    await assert_every_step_wrote_its_own(client, redis_url, job_id, tenant)
    await replay_own_history(client, job_id)


async def test_a_recorded_plan_with_repeated_ids_is_renumbered_by_the_workflow(
    client: Client, pages: Pages, redis_url: str, sim_url: str
) -> None:
    """A plan from a planner activity without the fix (as in a job recorded before it) reaches
    the workflow with its ids repeated; the workflow renumbers them (``unique-step-ids``)."""
    model = "sim-small"
    deps = build_deps(
        redis_url=redis_url,
        openai_base_url=sim_url,
        openai_api_key="sim-local-key",
        llm_config=LLMConfig(planner_model=model, verifier_model=model, answerer_model=model),
        cache_settings=CacheSettings(enabled=False),
        breaker_settings=BreakerSettings(enabled=False),
        http_allowed_hosts=["127.0.0.1:*"],
    )
    real = build_activities(deps)
    [planner] = [a for a in real if getattr(a, "__name__", "") == "plan_step"]

    @activity.defn(name="plan_step")
    async def plan_with_repeated_ids(inp: PlanInput) -> PlanResult:
        result: PlanResult = await planner(inp)
        if result.plan is not None:
            result.plan.steps = [s.model_copy(update={"id": "s1"}) for s in result.plan.steps]
        return result

    tenant = unique("dup-old")
    req = JobRequest(
        goal=f"Fetch {pages.url} with http_get and keep it with write_note [sim: fanout=2]",
        tenant=tenant,
        tools=["http_get", "write_note"],
    )
    worker = Worker(
        client,
        task_queue=f"tq-{uuid.uuid4()}",
        plugins=[KeelPlugin(tracing=False)],
        activities=[plan_with_repeated_ids, *(a for a in real if a is not planner)],
        max_cached_workflows=0,
        workflow_runner=UnsandboxedWorkflowRunner(),
    )
    try:
        async with worker:
            jobs = AgentJobs(client, task_queue=worker.task_queue)
            job_id = await jobs.start(req, request_key=unique("job"))
            result = await jobs.result(job_id, timeout=120)
    finally:
        await deps.aclose()

    assert result.outcome == "completed", result
    await assert_every_step_wrote_its_own(client, redis_url, job_id, tenant)
    await replay_own_history(client, job_id)


async def test_parallel_calls_of_a_tool_share_its_retry_budget(
    client: Client, make_worker, failing_pages: Pages
) -> None:
    """Four calls of ``http_get`` at once against a host answering 503: together they retry at
    most ``max_retries_per_tool`` times, and the job ends with its partial result."""
    req = JobRequest(
        goal=f"Fetch {failing_pages.url} with http_get [sim: fanout=4]",
        tenant=unique("wave"),
        tools=["http_get"],
        budget=Budget(max_retries_per_tool=3),
    )
    job_id, result, _ = await run_job(client, make_worker, req)

    assert result.outcome == "budget_exhausted", result
    assert result.exhausted_budget == "max_retries_per_tool"
    # Four first attempts and the three retries the budget has, however they were shared.
    assert 4 < failing_pages.hits <= 4 + 3, failing_pages.hits
    await replay_own_history(client, job_id)
