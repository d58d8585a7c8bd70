"""The priority section of ``keel bench``: interactive jobs through a batch flood, fair tenants.

Every run has one ``keel worker`` process with its default slots, on fresh task queues of the
benchmark's dev server (which runs with ``matching.enableFairness=true``, as ``keel dev`` does),
and reads what happened from the jobs' histories (``workers.bench.dispatch``).

- flood: ``FLOOD_JOBS`` batch jobs are started as fast as the server takes them; once
  ``INTERACTIVE_AFTER`` are queued, ``INTERACTIVE_JOBS`` interactive jobs start at a steady
  rate. Reported: each mode's first workflow task and first activity schedule-to-start, and how
  many queued batch jobs each interactive job overtook. It runs twice: with both modes on one
  task queue, where only the priority keys order them, and on Keel's default layout, each mode
  on its own queue with one worker polling both.
- fairness: tenant A starts ``FAIR_FLOOD_JOBS`` batch jobs, then tenant B ``FAIR_LATE_JOBS``
  on the same queue; reported are where B's jobs were dispatched among A's and when both
  tenants' jobs ended, with equal weights and with B at ``LATE_WEIGHT``.

The jobs are the cheapest Keel runs (no tools: plan, answer, verify) against the simulator, so
the worker, not the model, is what they queue for.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any
from uuid import uuid4

from rich.progress import Progress
from rich.table import Table
from temporalio.client import Client

from keel.client.jobs import AgentJobs
from keel.workers.bench.config import SIM_MODEL, BenchConfig, Servers
from keel.workers.bench.dispatch import (
    Dispatch,
    fetch_dispatches,
    overtaken,
    share_while_waiting,
    start_ranks,
    terminate_open,
    wait_figures,
)
from keel.workers.bench.measure import advancer, median
from keel.workers.bench.stack import wait_for_pollers, worker_env
from keel.workers.supervisor import Supervisor
from keel.workflows.types import JobRequest

FLOOD_JOBS = 1000
INTERACTIVE_JOBS = 40
INTERACTIVE_EVERY_S = 0.25
"""Four interactive jobs a second, from when the whole flood is queued: ten seconds of them."""
FAIR_FLOOD_JOBS = 500
FAIR_LATE_JOBS = 50
LATE_WEIGHT = 3.0
START_CONCURRENCY = 32
"""Starts in flight at once: enough to outrun the worker, so a backlog forms."""
WORKER_ACTIVITY_SLOTS = 8
"""The worker's activity slots. With model calls of ``MODEL_CALL_MS`` the slots, not the dev
server's SQLite writes, are what the flood queues for, as a fleet's workers would be; with 64
slots and instant calls a 2-core machine measures the server's own write queue instead, which
no task priority reaches (it orders tasks in the matcher, after the server has queued them)."""
MODEL_CALL_MS = 300
TASK_WAIT_TARGET_S = 1.0
"""Target: interactive jobs' first workflow task waits under a second at p95."""
LAYOUTS = {"shared_queue": "one queue for both modes", "own_queues": "each mode its own queue"}


def quick_request(mode: str, tenant: str) -> JobRequest:
    """A small job: no tools, so the loop plans, answers and verifies once (300 ms calls)."""
    goal = f"Say hello [sim: slow={MODEL_CALL_MS}]"
    return JobRequest.model_validate(
        {"goal": goal, "tools": [], "tenant": tenant, "user": "bench", "mode": mode}
    )


async def priority(
    client: Client,
    config: BenchConfig,
    servers: Servers,
    progress: Progress,
    children: Supervisor,
) -> dict[str, Any]:
    """Interactive jobs through a batch flood in both queue layouts, then two fairness runs."""
    target = client.service_client.config.target_host
    env = worker_env(target, client.namespace, servers.redis_url, servers.sim_url, SIM_MODEL)
    bench = _Bench(client, env, children, progress, uuid4().hex[:8])
    figures: dict[str, Any] = {
        "target_task_wait_p95_s": TASK_WAIT_TARGET_S,
        "worker_activity_slots": WORKER_ACTIVITY_SLOTS,
        "model_call_ms": MODEL_CALL_MS,
    }
    for layout in LAYOUTS:
        figures[layout] = await bench.flood(layout)
    figures["fair_equal"] = await bench.fairness(None)
    figures["fair_weighted"] = await bench.fairness(LATE_WEIGHT)
    return figures


class _Bench:
    """The section's runs, sharing the server, the worker's environment and the progress bar."""

    def __init__(
        self,
        client: Client,
        env: dict[str, str],
        children: Supervisor,
        progress: Progress,
        tag: str,
    ) -> None:
        self.client, self.env, self.children = client, env, children
        self.progress, self.tag = progress, tag

    @contextlib.asynccontextmanager
    async def worker(self, name: str, queues: Sequence[str]) -> AsyncIterator[None]:
        """One ``keel worker`` process polling ``queues``, stopped on exit."""
        # One worker per queue in the process: a queue named twice would be refused.
        queues = list(dict.fromkeys(queues))
        cmd = [sys.executable, "-m", "keel.workers.cli", "worker", "--identity", name]
        cmd += [f"--task-queue={q}" for q in queues]
        cmd += [f"--max-concurrent-activities={WORKER_ACTIVITY_SLOTS}"]
        env = self.env | {"KEEL_TASK_QUEUES": ",".join(queues)}
        proc = self.children.start(name, cmd, env=env)
        try:
            for queue in queues:
                await wait_for_pollers(self.client, queue, 1, [proc])
            yield
        finally:
            await asyncio.to_thread(self.children.stop, name)

    async def flood(self, layout: str) -> dict[str, Any]:
        """A queued batch flood, then a steady trickle of interactive jobs; both modes' waits."""
        queues = {m: f"bench-prio-{self.tag}-{layout}-{m}" for m in ("interactive", "batch")}
        if layout == "shared_queue":
            queues["interactive"] = queues["batch"]
        jobs = AgentJobs(self.client)
        task = self.progress.add_task(f"priority: {LAYOUTS[layout]}", total=INTERACTIVE_JOBS)
        async with self.worker(f"prio-{self.tag}-{layout}", list(queues.values())):
            wall = time.perf_counter()
            batch_ids = await _start_many(
                jobs, quick_request("batch", "bench"), FLOOD_JOBS, f"{layout}-b-{self.tag}",
                queues["batch"],
            )  # fmt: skip
            interactive_ids = await _trickle(jobs, f"{layout}-i-{self.tag}", queues["interactive"])
            outcomes = await _await_all(jobs, interactive_ids, self._advance(task))
            wall_s = time.perf_counter() - wall
            dispatches = await fetch_dispatches(
                self.client, {"batch": batch_ids, "interactive": interactive_ids}
            )
            ended = await terminate_open(self.client, dispatches, "benchmark run over")
        return _flood_figures(layout, dispatches, outcomes, wall_s) | {"terminated": ended}

    async def fairness(self, late_weight: float | None) -> dict[str, Any]:
        """Tenant A's flood, then tenant B's jobs on the same queue; where B's were served."""
        run = "weighted" if late_weight else "equal"
        queue = f"bench-fair-{self.tag}-{run}"
        flood, late = f"tenant-a-{self.tag}-{run}", f"tenant-b-{self.tag}-{run}"
        weights = {late: late_weight} if late_weight else None
        jobs = AgentJobs(self.client, task_queue=queue, fairness_weights=weights)
        task = self.progress.add_task(f"priority: fairness, {run} weights", total=FAIR_LATE_JOBS)
        async with self.worker(f"fair-{self.tag}-{run}", [queue]):
            flood_ids = await _start_many(
                jobs, quick_request("batch", flood), FAIR_FLOOD_JOBS, f"{run}-a-{self.tag}"
            )
            late_ids = await _start_many(
                jobs, quick_request("batch", late), FAIR_LATE_JOBS, f"{run}-b-{self.tag}"
            )
            outcomes = await _await_all(jobs, late_ids, self._advance(task))
            dispatches = await fetch_dispatches(self.client, {"a": flood_ids, "b": late_ids})
            ended = await terminate_open(self.client, dispatches, "benchmark run over")
        return _fair_figures(dispatches, outcomes, late_weight or 1.0) | {"terminated": ended}

    def _advance(self, task: Any) -> Callable[[], None]:
        return advancer(self.progress, task)


async def _start_many(
    jobs: AgentJobs, request: JobRequest, count: int, prefix: str, task_queue: str | None = None
) -> list[str]:
    """Start ``count`` copies of ``request``, ``START_CONCURRENCY`` at a time."""
    gate = asyncio.Semaphore(START_CONCURRENCY)

    async def one(i: int) -> str:
        async with gate:
            return await jobs.start(request, request_key=f"{prefix}-{i:05d}", task_queue=task_queue)

    return list(await asyncio.gather(*(one(i) for i in range(count))))


async def _trickle(jobs: AgentJobs, prefix: str, queue: str) -> list[str]:
    """Interactive jobs at a steady rate, each started on its own schedule."""
    request = quick_request("interactive", "bench")

    async def one(i: int) -> str:
        # On a schedule, not one after another, so a slow start does not lower the rate.
        await asyncio.sleep(i * INTERACTIVE_EVERY_S)
        return await jobs.start(request, request_key=f"{prefix}-{i:03d}", task_queue=queue)

    return list(await asyncio.gather(*(one(i) for i in range(INTERACTIVE_JOBS))))


async def _await_all(
    jobs: AgentJobs, ids: Sequence[str], advance: Callable[[], None]
) -> dict[str, int]:
    """Every job's outcome, counted (an error counts under its type, and does not stop the run)."""

    async def one(job_id: str) -> str:
        try:
            outcome: str = (await jobs.result(job_id)).outcome
        except Exception as err:  # noqa: BLE001 - reported in the figures
            outcome = f"error: {type(err).__name__}"
        advance()
        return outcome

    return dict(sorted(Counter(await asyncio.gather(*(one(j) for j in ids))).items()))


def _flood_figures(
    layout: str, dispatches: Sequence[Dispatch], outcomes: dict[str, int], wall_s: float
) -> dict[str, Any]:
    modes = {m: [d for d in dispatches if d.group == m] for m in ("interactive", "batch")}
    tasks = overtaken(dispatches, "interactive", "batch")
    activities = overtaken(dispatches, "interactive", "batch", activity=True)
    interactive = wait_figures(modes["interactive"])
    p95 = interactive["task_wait_p95_s"]
    return {
        "layout": layout,
        "outcomes": outcomes,
        "wall_s": wall_s,
        "interactive": interactive
        | {
            "overtaken_tasks_p50": median(tasks),
            "overtaken_activities_p50": median(activities),
        },
        "batch": wait_figures(modes["batch"]),
        "target_met": p95 is not None and p95 < TASK_WAIT_TARGET_S,
    }


def _fair_figures(
    dispatches: Sequence[Dispatch], outcomes: dict[str, int], late_weight: float
) -> dict[str, Any]:
    ranks = start_ranks(dispatches)
    t0 = min(d.scheduled for d in dispatches)
    late_first = min(d.scheduled for d in dispatches if d.group == "b")
    tenants: dict[str, Any] = {}
    for tenant in ("a", "b"):
        mine = [d for d in dispatches if d.group == tenant]
        done = [d.closed - t0 for d in mine if d.closed is not None]
        tenants[tenant] = {
            "jobs": len(mine),
            "start_rank_p50": statistics.median(ranks[d.job_id] for d in mine),
            "start_rank_max": max(ranks[d.job_id] for d in mine),
            "done_p50_s": median(done),
            "done_max_s": max(done, default=None),
        }
    return {
        "late_weight": late_weight,
        "outcomes": outcomes,
        "tenants": tenants,
        # A's jobs B would have waited behind in first-in-first-out order.
        "queued_ahead_of_b": sum(
            1
            for d in dispatches
            if d.group == "a" and (d.started is None or d.started > late_first)
        ),
        "late_share": share_while_waiting(dispatches, "b"),
        "fair_share": late_weight / (late_weight + 1),
    }


def _ms(value: float | None) -> str:
    return "–" if value is None else f"{value * 1000:,.0f}"


def _s(value: float | None) -> str:
    return "–" if value is None else f"{value:,.1f}"


def priority_table(mode: str, rps: int, config: BenchConfig, data: dict[str, Any]) -> Table:
    """The section's two tables, stacked: waits through the flood, then the tenants' shares."""
    stacked = Table.grid(padding=(1, 0))
    stacked.add_row(_flood_table(mode, rps, data))
    stacked.add_row(_fair_table(data))
    return stacked


def _flood_table(mode: str, rps: int, data: dict[str, Any]) -> Table:
    table = Table(
        title=f"Priority: {INTERACTIVE_JOBS} interactive jobs through {FLOOD_JOBS} batch ones "
        f"· server {mode} · transferProcessorMaxPollRPS={rps}"
    )
    for column in ("queues", "mode", "jobs", "task wait p50 / p95 / max (ms)"):
        table.add_column(column, justify="left" if column in ("queues", "mode") else "right")
    table.add_column("1st activity wait p50 / p95 / max (ms)", justify="right")
    table.add_column("batch overtaken p50: task / activity", justify="right")
    verdicts = []
    for layout, label in LAYOUTS.items():
        run = data[layout]
        for kind in ("interactive", "batch"):
            f = run[kind]
            table.add_row(
                label if kind == "interactive" else "",
                kind,
                str(f["jobs"]),
                " / ".join(_ms(f[f"task_wait_{p}_s"]) for p in ("p50", "p95", "max")),
                " / ".join(_ms(f[f"activity_wait_{p}_s"]) for p in ("p50", "p95", "max")),
                (
                    f"{f['overtaken_tasks_p50'] or 0:.0f} / "
                    f"{f['overtaken_activities_p50'] or 0:.0f}"
                    if kind == "interactive"
                    else f"{f['jobs'] - f['task_measured']} / "
                    f"{f['jobs'] - f['activity_measured']} still queued"
                ),
                end_section=kind == "batch",
            )
        verdict = "[green]met[/green]" if run["target_met"] else "[red]missed[/red]"
        p95 = _ms(run["interactive"]["task_wait_p95_s"])
        verdicts.append(f"{label}: {p95} ms {verdict}")
    table.caption = (
        "Wait: schedule-to-start of each job's first workflow task and first activity, from "
        f"history. Interactive jobs start at {1 / INTERACTIVE_EVERY_S:.0f}/s once all "
        f"{FLOOD_JOBS} batch jobs are queued; overtaken: batch jobs queued before an "
        "interactive job and dispatched after it. Batch waits are of the jobs dispatched by "
        "the time the last interactive job ended (the rest are then terminated). One `keel "
        f"worker` with {WORKER_ACTIVITY_SLOTS} activity slots; model calls take "
        f"{MODEL_CALL_MS} ms.\n"
        f"target interactive task wait p95 < {TASK_WAIT_TARGET_S * 1000:.0f} ms: "
        + " · ".join(verdicts)
    )
    return table


def _fair_table(data: dict[str, Any]) -> Table:
    table = Table(
        title=f"Fairness: tenant A floods {FAIR_FLOOD_JOBS} batch jobs, then tenant B starts "
        f"{FAIR_LATE_JOBS} on the same queue"
    )
    for column in ("B's weight", "tenant", "jobs", "dispatch rank p50 / max", "done p50 / max (s)"):
        table.add_column(column, justify="left" if column == "tenant" else "right")
    table.add_column("B's share while waiting (fair)", justify="right")
    for run in ("fair_equal", "fair_weighted"):
        f = data[run]
        for tenant in ("a", "b"):
            t = f["tenants"][tenant]
            share = f["late_share"]
            table.add_row(
                f"{f['late_weight']:g}" if tenant == "a" else "",
                tenant.upper(),
                str(t["jobs"]),
                f"{t['start_rank_p50']:.0f} / {t['start_rank_max']}",
                f"{_s(t['done_p50_s'])} / {_s(t['done_max_s'])}",
                (f"{share:.2f} ({f['fair_share']:.2f})" if share is not None else "–")
                if tenant == "b"
                else "",
                end_section=tenant == "b",
            )
    queued = " and ".join(
        str(data[r]["queued_ahead_of_b"]) for r in ("fair_equal", "fair_weighted")
    )
    table.caption = (
        "Rank: place among all first workflow tasks dispatched; done: seconds from A's first "
        "job to each job's end (A's jobs still open when B's last ended are terminated: their "
        f"ranks count as last). {queued} of A's jobs were still queued when B's first one "
        "was, so under first-in-first-out B's jobs would have been dispatched after all of "
        "them. Share: of the first tasks dispatched while B had jobs queued, B's fraction."
    )
    return table
