"""``keel bench load``: Keel and a bare Temporal floor at real model latency, side by side.

On one Temporal dev server (``workers.bench.load_main`` starts it as ``keel dev`` does), for
each fleet size, the same stream of jobs runs first on ``keel worker`` processes and then on
floor worker processes (``workers.bench.load_floor``), each fleet started fresh for its run so
its peak memory is its own. Before the runs, a few jobs of each kind run alone for the
single-job latency every run is compared with.

What each run measures, and from where:

- makespan (first start to last result), every job's start-to-result latency and the most
  jobs in flight, from this process's clock;
- CPU of the worker processes and of the Temporal server over the run, from
  ``/proc/<pid>/stat`` (utime + stime) read before the first start and after the last result;
- each worker's peak resident memory (``VmHWM`` in ``/proc/<pid>/status``, read before it
  stops: the high-water mark of a process started for this run);
- workflow cache evictions and misses, and activity tasks' schedule-to-start latency, from
  each worker's Prometheus endpoint (the SDK's ``sticky_cache_*`` counters and its
  ``activity_schedule_to_start_latency`` histogram: history cannot say, as the server writes
  an activity's started event when it ends, stamped with the time it was scheduled);
- workflow tasks, events and workflow task timeouts per job, and workflow tasks'
  schedule-to-start latency (scheduled event to started event), from every completed job's
  history, fetched after the CPU readings so fetching costs no run.

Nothing here judges a target: ``workers.bench.load_report`` does.
"""

from __future__ import annotations

import asyncio
import importlib.util
import statistics
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from uuid import uuid4

import httpx
from temporalio.api.enums.v1 import EventType, TimeoutType
from temporalio.api.history.v1 import HistoryEvent
from temporalio.client import Client

from keel.client.jobs import AgentJobs
from keel.workers.bench.config import SIM_MODEL
from keel.workers.bench.load_floor import FloorInput, LoadFloorWorkflow
from keel.workers.bench.measure import percentile
from keel.workers.bench.stack import process_cpu_seconds, wait_for_pollers, worker_env
from keel.workers.settings import WorkerSettings
from keel.workers.supervisor import Supervisor, free_port
from keel.workflows.types import JobRequest

__all__ = [
    "LoadConfig",
    "LoadServer",
    "activity_wait_figures",
    "history_figures",
    "measure_load",
    "peak_rss_bytes",
    "scrape_metrics",
    "stream_jobs",
]

GOAL = "Compute {n} + 2 with calculator [sim: difficulty=1]"
"""Each job's goal: plan, one calculator call, answer, verify (three model calls). Numbered so
no two jobs of a run share a prompt, and the jobs opt out of the caches, since every run
repeats the goals; difficulty 1 lets the simulator's small model draft it right the first
time."""
KINDS = ("keel", "floor")
"""The two kinds of job every run compares, in the order they run."""
HISTORY_FETCHES = 16
"""History requests in flight at once when the histories are read back."""
CACHE_METRICS = {
    "cache_evictions": "temporal_sticky_cache_total_forced_eviction",
    "cache_misses": "temporal_sticky_cache_miss",
    "cache_hits": "temporal_sticky_cache_hit",
}
"""Figure name to the SDK's Prometheus counter it is summed from (every label)."""
ACTIVITY_WAIT = "temporal_activity_schedule_to_start_latency"
"""The SDK's histogram of activity tasks' schedule-to-start latency, in milliseconds."""


@dataclass(frozen=True)
class LoadConfig:
    """What ``keel bench load`` was asked to run (the command's options, validated)."""

    jobs: int = 1000
    ramp_seconds: float = 60.0
    """The jobs start evenly spread over this many seconds, as a stream, not all at once."""
    latency_min: float = 45.0
    latency_max: float = 75.0
    """Every model call (the simulator's and the floor's) takes a uniform draw in this range."""
    workers: list[int] = field(default_factory=lambda: [1, 3])
    """Fleet sizes: each runs the whole stream of Keel jobs, then of floor jobs."""
    single_jobs: int = 3
    """Jobs of each kind run alone (at once, nothing else running) for single-job latency."""
    servers: list[str] = field(default_factory=lambda: ["sqlite"])
    seed: int = 0
    json_path: Path | None = None


@dataclass(frozen=True)
class LoadServer:
    """The servers one measurement runs against (started by ``workers.bench.load_main``)."""

    keel_client: Client
    """Keel's converter and codec, for AgentJobs."""
    floor_client: Client
    """The SDK's default converter, as the floor's workers use."""
    server_pid: int
    redis_url: str
    sim_url: str


@dataclass
class Stream:
    """One stream of jobs as this process saw it."""

    latencies: list[float] = field(default_factory=list)
    outcomes: dict[str, int] = field(default_factory=dict)
    completed_ids: list[str] = field(default_factory=list)
    makespan_s: float = 0.0
    peak_in_flight: int = 0


RunOne = Callable[[int], Awaitable[tuple[str, str]]]
"""Starts job ``n`` and waits for it; returns its workflow ID and outcome."""


async def stream_jobs(run_one: RunOne, jobs: int, ramp_seconds: float) -> Stream:
    """Start ``jobs`` jobs evenly over ``ramp_seconds`` and wait for every one of them.

    A job that raises is counted under its exception's type instead of ending the stream.
    """
    result = Stream()
    in_flight = 0
    began = time.perf_counter()
    last_end = began

    async def one(n: int) -> None:
        nonlocal in_flight, last_end
        await asyncio.sleep(max(0.0, began + n * ramp_seconds / jobs - time.perf_counter()))
        started = time.perf_counter()
        in_flight += 1
        result.peak_in_flight = max(result.peak_in_flight, in_flight)
        try:
            workflow_id, outcome = await run_one(n)
        except Exception as err:  # noqa: BLE001 - counted as an outcome, see the docstring
            workflow_id, outcome = "", f"error: {type(err).__name__}"
        finally:
            in_flight -= 1
        last_end = time.perf_counter()
        result.latencies.append(last_end - started)
        result.outcomes[outcome] = result.outcomes.get(outcome, 0) + 1
        if outcome == "completed":
            result.completed_ids.append(workflow_id)

    await asyncio.gather(*(one(n) for n in range(jobs)))
    result.makespan_s = last_end - began
    return result


def peak_rss_bytes(pid: int) -> int | None:
    """The process's peak resident memory (``VmHWM``), from /proc; None where unreadable."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return None


async def scrape_metrics(port: int) -> dict[str, Any] | None:
    """Cache counters and the activity wait histogram from a worker's Prometheus endpoint.

    Returns:
        ``CACHE_METRICS``' figures, and ``activity_wait``: the histogram's cumulative bucket
        counts by upper bound (ms), ``sum`` and ``count``, every label summed; None when the
        endpoint does not answer.
    """
    try:
        async with httpx.AsyncClient(timeout=5) as http:
            text = (await http.get(f"http://127.0.0.1:{port}/metrics")).text
    except httpx.HTTPError:
        return None
    figures: dict[str, Any] = dict.fromkeys(CACHE_METRICS, 0.0)
    wait: dict[str, Any] = {"buckets": {}, "sum": 0.0, "count": 0.0}
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name, value = line.split("{", 1)[0].split(" ", 1)[0], float(line.rsplit(" ", 1)[1])
        for figure, metric in CACHE_METRICS.items():
            if name in (metric, f"{metric}_total"):
                figures[figure] += value
        if name == f"{ACTIVITY_WAIT}_bucket":
            bound = float(line.split('le="', 1)[1].split('"', 1)[0])
            wait["buckets"][bound] = wait["buckets"].get(bound, 0.0) + value
        elif name in (f"{ACTIVITY_WAIT}_sum", f"{ACTIVITY_WAIT}_count"):
            wait[name.rsplit("_", 1)[1]] += value
    return figures | {"activity_wait": wait}


def activity_wait_figures(waits: list[dict[str, Any]]) -> dict[str, float | None]:
    """Mean, and the bucket bound under which 95% fall, of the workers' activity waits (ms)."""
    count = sum(w["count"] for w in waits)
    buckets: dict[float, float] = {}
    for wait in waits:
        for bound, n in wait["buckets"].items():
            buckets[bound] = buckets.get(bound, 0.0) + n
    p95 = next((b for b in sorted(buckets) if buckets[b] >= 0.95 * count), None) if count else None
    mean = sum(w["sum"] for w in waits) / count if count else None
    return {
        "activity_schedule_to_start_mean_ms": mean,
        "activity_schedule_to_start_p95_bound_ms": p95,
    }


def history_figures(histories: list[list[HistoryEvent]]) -> dict[str, Any]:
    """Per-job workflow tasks, events and timeouts, and workflow tasks' schedule-to-start."""
    tasks, events, waits, timeouts, sticky = [], [], [], 0, 0
    kinds: Counter[str] = Counter()
    for history in histories:
        scheduled: dict[int, float] = {}
        count = 0
        for event in history:
            kind = event.event_type
            kinds[EventType.Name(kind).removeprefix("EVENT_TYPE_")] += 1
            when = event.event_time.ToDatetime().timestamp()
            if kind == EventType.EVENT_TYPE_WORKFLOW_TASK_SCHEDULED:
                scheduled[event.event_id] = when
            elif kind == EventType.EVENT_TYPE_WORKFLOW_TASK_STARTED:
                count += 1
                attrs = event.workflow_task_started_event_attributes
                if attrs.scheduled_event_id in scheduled:
                    waits.append(when - scheduled[attrs.scheduled_event_id])
            elif kind == EventType.EVENT_TYPE_WORKFLOW_TASK_TIMED_OUT:
                timeouts += 1
                timed_out = event.workflow_task_timed_out_event_attributes
                sticky += timed_out.timeout_type == TimeoutType.TIMEOUT_TYPE_SCHEDULE_TO_START
        tasks.append(count)
        events.append(len(history))
    figures: dict[str, Any] = {
        "histories": len(histories),
        "workflow_tasks_per_job": statistics.fmean(tasks) if tasks else None,
        "events_per_job": statistics.fmean(events) if events else None,
        "workflow_task_timeouts": timeouts,
        # Of those, the tasks no worker started in time on a sticky queue (the rest timed out
        # while a worker held them): a backed-up worker, not a slow one.
        "workflow_task_schedule_to_start_timeouts": sticky,
        # What the events are, per job: where a job's history differs from the floor's.
        "events_per_job_by_type": {k: n / len(histories) for k, n in kinds.most_common()},
    }
    for pct in (50, 95):
        value = percentile(waits, pct)
        figures[f"workflow_schedule_to_start_p{pct}_ms"] = None if value is None else value * 1e3
    return figures


async def _histories(client: Client, workflow_ids: list[str]) -> list[list[HistoryEvent]]:
    gate = asyncio.Semaphore(HISTORY_FETCHES)

    async def fetch(workflow_id: str) -> list[HistoryEvent]:
        async with gate:
            return list((await client.get_workflow_handle(workflow_id).fetch_history()).events)

    return list(await asyncio.gather(*(fetch(w) for w in workflow_ids)))


def _has_uvloop() -> bool:
    """Whether ``keel worker`` here runs on uvloop (installed), so the floor's workers do too."""
    return importlib.util.find_spec("uvloop") is not None


class _Fleet:
    """Worker processes of one kind on a fresh task queue, started and stopped together."""

    def __init__(self, kind: str, size: int, server: LoadServer, children: Supervisor) -> None:
        self.kind, self.size, self.server, self.children = kind, size, server, children
        tag = uuid4().hex[:8]
        self.task_queue = f"bench-load-{kind}-{size}-{tag}"
        self.names = [f"{kind}-worker-{tag}-{i}" for i in range(size)]
        self.metrics_ports = [free_port() for _ in range(size)]
        self.pids: list[int] = []

    async def __aenter__(self) -> _Fleet:
        procs = [
            self.children.start(name, self._cmd(i), env=self._env(i))
            for i, name in enumerate(self.names)
        ]
        self.pids = [p.pid for p in procs]
        try:
            await wait_for_pollers(self.server.floor_client, self.task_queue, self.size, procs)
        except BaseException:
            await asyncio.to_thread(self.children.stop, *self.names)
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.to_thread(self.children.stop, *self.names)

    def _cmd(self, i: int) -> list[str]:
        identity = ["--identity", f"{self.names[i]}"]
        if self.kind == "keel":
            return [
                *(sys.executable, "-m", "keel.workers.cli", "worker"),
                *("--task-queue", self.task_queue, *identity),
            ]
        settings = WorkerSettings()  # the limits a `keel worker` here gets, for the floor too
        return [
            *(sys.executable, "-m", "keel.workers.bench.load_floor"),
            *("--task-queue", self.task_queue, *identity),
            *("--metrics-port", str(self.metrics_ports[i])),
            *("--max-concurrent-activities", str(settings.max_concurrent_activities)),
            *("--max-concurrent-workflow-tasks", str(settings.max_concurrent_workflow_tasks)),
            *("--max-cached-workflows", str(settings.max_cached_workflows)),
            *("--max-pollers", str(settings.max_pollers if settings.poller_autoscaling else 0)),
            *(["--uvloop"] if settings.uvloop and _has_uvloop() else []),
        ]

    def _env(self, i: int) -> dict[str, str]:
        client = self.server.keel_client
        target = client.service_client.config.target_host
        env = worker_env(
            target, client.namespace, self.server.redis_url, self.server.sim_url, SIM_MODEL
        )
        return env | {
            "KEEL_TASK_QUEUE": self.task_queue,
            "KEEL_TASK_QUEUES": self.task_queue,
            "KEEL_METRICS_PORT": str(self.metrics_ports[i]),
            # The worker's queue gauges poll the server; once an hour keeps their cost out of
            # the CPU this run measures (a worker without a metrics port has none).
            "KEEL_METRICS_POLL_SECONDS": "3600",
        }

    def cpu(self) -> float | None:
        readings = [process_cpu_seconds(pid) for pid in self.pids]
        return None if None in readings else sum(r for r in readings if r is not None)

    async def finish(self) -> dict[str, Any]:
        """Peak memory and cache counters of every process, read while they still run."""
        rss = [peak_rss_bytes(pid) for pid in self.pids]
        scraped = [await scrape_metrics(port) for port in self.metrics_ports]
        known = [s for s in scraped if s is not None]
        counters = {k: sum(s[k] for s in known) if known else None for k in CACHE_METRICS}
        counters |= activity_wait_figures([s["activity_wait"] for s in known])
        peak = [r for r in rss if r is not None]
        return {
            "worker_peak_rss_mib": max(peak) / 2**20 if peak else None,
            "workers_peak_rss_mib": [r / 2**20 if r is not None else None for r in rss],
            **counters,
        }


def _runner(kind: str, server: LoadServer, config: LoadConfig, queue: str, tag: str) -> RunOne:
    if kind == "keel":
        jobs = AgentJobs(server.keel_client, task_queue=queue)

        async def keel(n: int) -> tuple[str, str]:
            request = JobRequest(
                goal=GOAL.format(n=n), tools=["calculator"], tenant="bench", user="bench",
                tier="deep",  # forced, so no router call: the floor makes none either
                # Caches off: runs repeat the same goals, and a later run must not be answered
                # from an earlier one's replies (the floor has no cache to answer from).
                cache=False,
            )  # fmt: skip
            job_id = await jobs.start(request, request_key=f"load-{tag}-{n}")
            return job_id, (await jobs.result(job_id)).outcome

        return keel

    async def floor(n: int) -> tuple[str, str]:
        job = FloorInput(f"{tag}-{n}", config.latency_min, config.latency_max)
        handle = await server.floor_client.start_workflow(
            LoadFloorWorkflow.run, job, id=f"bench-floor-{tag}-{n}", task_queue=queue
        )
        await handle.result()
        return handle.id, "completed"

    return floor


async def _single(
    server: LoadServer, config: LoadConfig, children: Supervisor
) -> dict[str, float | None]:
    """Median latency of ``single_jobs`` jobs of each kind, all at once on idle workers."""
    async with (
        _Fleet("keel", 1, server, children) as keel,
        _Fleet("floor", 1, server, children) as floor,
    ):
        tag = uuid4().hex[:8]
        streams = await asyncio.gather(
            *(
                stream_jobs(
                    _runner(f.kind, server, config, f.task_queue, f"s{tag}"),
                    config.single_jobs,
                    0.0,
                )
                for f in (keel, floor)
            )
        )
    return {
        kind: statistics.median(s.latencies) if s.completed_ids else None
        for kind, s in zip(KINDS, streams, strict=True)
    }


async def _run(
    kind: str, size: int, server: LoadServer, config: LoadConfig, children: Supervisor
) -> dict[str, Any]:
    async with _Fleet(kind, size, server, children) as fleet:
        runner = _runner(kind, server, config, fleet.task_queue, uuid4().hex[:8])
        server_before, workers_before = process_cpu_seconds(server.server_pid), fleet.cpu()
        stream = await stream_jobs(runner, config.jobs, config.ramp_seconds)
        server_after, workers_after = process_cpu_seconds(server.server_pid), fleet.cpu()
        processes = await fleet.finish()
    client = server.keel_client if kind == "keel" else server.floor_client
    history = history_figures(await _histories(client, stream.completed_ids))

    def per_job_ms(before: float | None, after: float | None) -> float | None:
        if before is None or after is None or not config.jobs:
            return None
        return 1000 * (after - before) / config.jobs

    completed = len(stream.completed_ids)
    return {
        "kind": kind,
        "workers": size,
        "jobs": config.jobs,
        "completed": completed,
        "outcomes": stream.outcomes,
        "makespan_s": stream.makespan_s,
        "latency_p50_s": percentile(stream.latencies, 50),
        "latency_p95_s": percentile(stream.latencies, 95),
        "peak_in_flight": stream.peak_in_flight,
        "jobs_per_s": completed / stream.makespan_s if stream.makespan_s > 0 else None,
        "server_cpu_ms_per_job": per_job_ms(server_before, server_after),
        "worker_cpu_ms_per_job": per_job_ms(workers_before, workers_after),
        **processes,
        **history,
    }


async def measure_load(
    server: LoadServer,
    config: LoadConfig,
    children: Supervisor,
    on_step: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """Single-job latency, then each fleet size's Keel run and floor run, on one server.

    Returns:
        ``{"single_latency_s": {kind: s}, "runs": [run figures, ...]}`` in the order run.
    """
    on_step(f"single jobs: {config.single_jobs} of each kind, alone")
    single = await _single(server, config, children)
    on_step(f"single-job latency: keel {single['keel']}, floor {single['floor']}")
    runs = []
    for size in config.workers:
        for kind in KINDS:
            on_step(
                f"{kind} on {size} worker(s): {config.jobs} jobs over {config.ramp_seconds:g} s"
            )
            run = await _run(kind, size, server, config, children)
            on_step(
                f"{kind} on {size} worker(s): {run['completed']}/{run['jobs']} completed, "
                f"makespan {run['makespan_s']:.1f} s"
            )
            runs.append(run)
    return {"single_latency_s": single, "runs": runs}
