"""History stays bounded: what an iteration records depends neither on output size nor on age.

Tool outputs over the preview size go to Redis by reference, and model calls see a window of the
last ``MAX_OBSERVATIONS`` observations, so an iteration costs the same bytes of history whether its
tool returned 2 KiB or 64 KiB, and once the window is full, the same at iteration 20 as at
iteration 17. With context compression (the default) older observations are folded into a bounded
summary by an extra call every few iterations, how often depending on their size: the history of an
iteration then stays within a bound that does not grow with the job's age. ``keel bench --only
long`` shows the 1,000-iteration case; this test keeps the property from regressing."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from temporalio.api.enums.v1 import EventType
from temporalio.api.history.v1 import HistoryEvent
from temporalio.client import Client

from keel.client import AgentJobs, Budget, JobRequest
from keel.workflows.agent_loop import MAX_OBSERVATIONS
from tests.conftest import unique

ITERATIONS = MAX_OBSERVATIONS + 4
SIZES = {"small": 2 * 1024, "large": 64 * 1024}
COMPRESSED = 12
"""Iterations of the compressed run: enough for several folds after the first."""
TOLERANCE = 0.02
"""Iterations may differ by a few digits (token counts, costs, sizes), never by the output."""


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
    async with make_worker(client) as worker:
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
            return iteration_bytes(history.events)

        small, large, folded = await asyncio.gather(
            run("small"), run("large"), run("large", compress=True, iterations=COMPRESSED)
        )

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
