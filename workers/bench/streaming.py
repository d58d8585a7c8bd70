"""The stream section of ``keel bench``: how soon a caller sees a job move, and its answer.

It starts ``keel api`` and one ``keel worker`` on the benchmark's servers and runs jobs whose
model calls take a realistic while (STREAM_GOAL: every call waits before it answers, and a
streamed answer arrives a piece at a time). For each job it posts ``POST /v1/jobs``, opens
``GET /v1/jobs/{id}/events`` at once, and records when the first progress event, the first
answer token and the final ``end`` event arrive, counted from the submit. The gap between the
first token and the end is what streaming saves a reader: without it, the answer is seen only
when the job has verified it and ended.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from typing import Any

import aiohttp
from rich.progress import Progress
from temporalio.client import Client

from keel.workers.bench.api_stack import api_stack
from keel.workers.bench.config import BenchConfig, Servers
from keel.workers.supervisor import Supervisor

STREAM_GOAL = "Explain why 6 * 7 is 42, step by step [sim: slow=300, token_ms=15]"
"""Every model call of these jobs takes 300 ms before it answers; a streamed answer then
arrives in pieces 15 ms apart (about 60 tokens a second, a hosted model's pace)."""
STREAM_JOBS = 20
"""Jobs measured, STREAM_CONCURRENCY at a time."""
STREAM_CONCURRENCY = 4


async def stream_latency(
    client: Client,
    config: BenchConfig,
    servers: Servers,
    progress: Progress,
    children: Supervisor,
) -> dict[str, Any]:
    """Time to first progress event, first answer token and end, through ``keel api``."""
    async with api_stack(client, servers, children, name="stream") as stack:
        task = progress.add_task("stream: jobs", total=STREAM_JOBS)
        async with aiohttp.ClientSession(
            stack.base_url,
            headers={"Authorization": f"Bearer {stack.key}"},
            timeout=aiohttp.ClientTimeout(total=120),
        ) as http:
            gate = asyncio.Semaphore(STREAM_CONCURRENCY)

            async def one() -> dict[str, float]:
                async with gate:
                    timings = await _follow_one(http)
                progress.advance(task)
                return timings

            runs = await asyncio.gather(*(one() for _ in range(STREAM_JOBS)))
    figures: dict[str, Any] = {"jobs": STREAM_JOBS, "concurrency": STREAM_CONCURRENCY}
    for name in ("first_progress_ms", "first_token_ms", "end_ms", "streaming_lead_ms"):
        ordered = sorted(run[name] for run in runs)
        figures[f"{name}_p50"] = statistics.median(ordered)
        figures[f"{name}_p95"] = ordered[round(0.95 * (len(ordered) - 1))]
    figures["token_events_per_job"] = statistics.mean(run["tokens"] for run in runs)
    return figures


async def _follow_one(http: aiohttp.ClientSession) -> dict[str, float]:
    """Submit one job and read its events to the end; milliseconds from the submit."""
    started = time.perf_counter()
    async with http.post("/v1/jobs", json={"goal": STREAM_GOAL, "tools": ["calculator"]}) as r:
        r.raise_for_status()
        job_id = (await r.json())["job_id"]
    seen: dict[str, float] = {}
    tokens = 0
    async with http.get(f"/v1/jobs/{job_id}/events") as response:
        response.raise_for_status()
        async for raw in response.content:
            line = raw.decode().rstrip("\r\n")
            if not line.startswith("event: "):
                continue
            kind = line.removeprefix("event: ")
            tokens += kind == "token"
            seen.setdefault(kind, (time.perf_counter() - started) * 1000)
            if kind == "end":
                break
    missing = {"progress", "token", "end"} - seen.keys()
    if missing:
        raise RuntimeError(f"job {job_id}: no {', '.join(sorted(missing))} event")
    return {
        "first_progress_ms": seen["progress"],
        "first_token_ms": seen["token"],
        "end_ms": seen["end"],
        "streaming_lead_ms": seen["end"] - seen["token"],
        "tokens": float(tokens),
    }
