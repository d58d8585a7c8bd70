"""History stays bounded: what an iteration records depends neither on output size nor on age.

Tool outputs over the preview size go to Redis by reference, and model calls see a window of the
last ``MAX_OBSERVATIONS`` observations, so an iteration costs the same bytes of history whether its
tool returned 2 KiB or 64 KiB, and once the window is full, the same at iteration 20 as at
iteration 17. With context compression (the default) older observations are folded into a bounded
summary by an extra call every few iterations, how often depending on their size: the history of an
iteration then stays within a bound that does not grow with the job's age. ``keel bench --only
long`` shows the 1,000-iteration case; this test keeps the property from regressing.

The worker keeps a workflow cache, as ``keel worker`` does. Without one (``make_worker``'s default)
every workflow task replays the whole history so far, 81 tasks a job here, so that cost grows with
the square of a job's length and was 90 % of the test's time (each activity ran in 20-50 ms; a
task took 0.5 s on average and 1.7 s by the end). Each finished history is replayed once instead,
which checks every command the run issued. Tasks then go to the worker's sticky queue, whose name
each task's scheduled event carries: every iteration of every job is larger by the same bytes."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from temporalio.api.enums.v1 import EventType
from temporalio.api.history.v1 import HistoryEvent
from temporalio.client import Client, WorkflowHistory
from temporalio.worker import Replayer, UnsandboxedWorkflowRunner

from keel.activities.converter import DATA_CONVERTER
from keel.client import AgentJobs, Budget, JobRequest
from keel.workers.registry import WORKFLOWS
from keel.workflows.agent_loop import MAX_OBSERVATIONS
from tests.conftest import unique

ITERATIONS = MAX_OBSERVATIONS + 4
SIZES = {"small": 2 * 1024, "large": 64 * 1024}
COMPRESSED = 12
"""Iterations of the compressed run: enough for several folds after the first."""
TOLERANCE = 0.02
"""Iterations may differ by a few digits (token counts, costs, sizes), never by the output."""
CACHED_RUNS = 10
"""Workflow cache of the test's worker: room for its three jobs (see the module docstring)."""


@pytest.fixture
def pages() -> Iterator[str]:
    """An HTTP server answering ``/small`` and ``/large`` with text of those sizes."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b"k" * SIZES[self.path.strip("/")]
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def iteration_bytes(events: Sequence[HistoryEvent]) -> list[int]:
    """History bytes of each iteration but the last, cut where each iteration's plan call is
    scheduled (its activity summary reads ``plan · iteration N``)."""
    starts = [
        i
        for i, e in enumerate(events)
        if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
        and json.loads(e.user_metadata.summary.data).startswith("plan · iteration ")
    ]
    bounds = zip(starts, starts[1:], strict=False)
    return [sum(e.ByteSize() for e in events[a:b]) for a, b in bounds]


async def test_iteration_bytes_do_not_grow_with_output_size_or_job_length(
    client: Client, make_worker, pages: str
) -> None:
    budget = Budget(
        max_iterations=ITERATIONS,
        max_steps=1_000,
        max_tool_calls=1_000,
        max_tokens=10**8,
        max_cost_usd=1_000,
    )
    histories: list[WorkflowHistory] = []
    async with make_worker(client, max_cached_workflows=CACHED_RUNS) as worker:
        jobs = AgentJobs(client, task_queue=worker.task_queue)

        async def run(
            size: str, *, compress: bool = False, iterations: int = ITERATIONS
        ) -> list[int]:
            req = JobRequest(
                goal=f"Fetch {pages}/{size} with http_get [sim: replan, fail_verify=1000000]",
                tools=["http_get"],
                budget=budget.model_copy(update={"max_iterations": iterations}),
                # One tier for every run: a job the router put on fast escalates in iteration
                # 1 (an event and a KeelTier upsert) and one it put on deep does not, which
                # would differ by more than output size ever may.
                tier="deep",
            )
            job_id = await jobs.start(req, request_key=unique(size), compress=compress)
            result = await jobs.result(job_id, timeout=240)
            assert result.exhausted_budget == "max_iterations", result
            assert result.iterations == iterations
            history = await client.get_workflow_handle(job_id).fetch_history()
            histories.append(history)
            return iteration_bytes(history.events)

        small, large, folded = await asyncio.gather(
            run("small"), run("large"), run("large", compress=True, iterations=COMPRESSED)
        )

    # The cached worker replayed nothing, so nondeterminism is checked here, on whole runs.
    replayer = Replayer(
        workflows=WORKFLOWS,
        data_converter=DATA_CONVERTER,
        workflow_runner=UnsandboxedWorkflowRunner(),
    )
    for history in histories:
        await replayer.replay_workflow(history)

    assert len(small) == len(large) == ITERATIONS - 1
    # 62 KiB more output per iteration changes an iteration's history by a few digits at most.
    for i, (s, big) in enumerate(zip(small, large, strict=True), start=1):
        assert abs(big - s) <= TOLERANCE * s, f"iteration {i}: {s} vs {big} bytes"
    # Iterations grow while the observation window fills, then stay flat.
    full = small[MAX_OBSERVATIONS:]
    assert len(full) >= 3
    assert max(full) - min(full) <= TOLERANCE * min(full), full
    assert max(small) <= max(full) * (1 + TOLERANCE), small
    # Compressed: a fold every other iteration or so, and no growth with age.
    assert len(folded) == COMPRESSED - 1
    early, late = folded[2:6], folded[6:]
    assert max(late) <= max(early) * (1 + TOLERANCE), folded
