"""``keel bench load``: its arithmetic, and one tiny run of the command end to end.

The report's ratios, the activity-wait histogram and the job stream are checked directly; one
``keel bench load`` process (four jobs, model calls of 0.2 to 0.4 s, one worker) starts its
own dev server, simulator and worker processes and must measure every figure of every run.
Nothing here asserts a duration: only structure.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from temporalio.api.enums.v1 import EventType, TimeoutType
from temporalio.api.history.v1 import HistoryEvent, WorkflowTaskTimedOutEventAttributes

from keel.workers.bench import load_report
from keel.workers.bench.load import (
    activity_wait_figures,
    history_figures,
    peak_rss_bytes,
    stream_jobs,
)

TINY = ["--jobs", "4", "--latency-min", "0.2", "--latency-max", "0.4", "--ramp-seconds", "0.5"]


async def test_the_stream_spreads_its_starts_and_counts_what_is_in_flight() -> None:
    started: dict[int, float] = {}

    async def run_one(n: int) -> tuple[str, str]:
        started[n] = time.perf_counter()
        await asyncio.sleep(0.2)
        if n == 3:
            raise RuntimeError("broken job")
        return f"wf-{n}", "completed"

    stream = await stream_jobs(run_one, 6, 0.3)
    assert sorted(started) == list(range(6))
    gaps = [started[n + 1] - started[n] for n in range(5)]
    assert min(gaps) >= 0.045  # 0.3 s over six jobs: one every 0.05 s, never early
    assert stream.outcomes == {"completed": 5, "error: RuntimeError": 1}
    assert sorted(stream.completed_ids) == [f"wf-{n}" for n in (0, 1, 2, 4, 5)]
    assert stream.makespan_s >= 0.45 and len(stream.latencies) == 6
    # Without a ramp every job starts before the first one ends: all six are in flight.
    assert (await stream_jobs(run_one, 6, 0.0)).peak_in_flight == 6


def test_the_activity_wait_is_summed_over_workers() -> None:
    one = {"buckets": {100.0: 90.0, 500.0: 99.0, float("inf"): 100.0}, "sum": 2000, "count": 100}
    two = {"buckets": {100.0: 100.0, 500.0: 100.0, float("inf"): 100.0}, "sum": 0, "count": 100}
    figures = activity_wait_figures([one, two])
    assert figures["activity_schedule_to_start_mean_ms"] == pytest.approx(10.0)
    assert figures["activity_schedule_to_start_p95_bound_ms"] == 100.0  # 190 of 200 under 100
    assert activity_wait_figures([])["activity_schedule_to_start_mean_ms"] is None


def test_keel_runs_are_held_to_the_floor_of_the_same_fleet_size() -> None:
    def run(kind: str, makespan: float, p95: float, cpu: float, rss: float) -> dict[str, Any]:
        return {
            "kind": kind, "workers": 1, "jobs": 100, "jobs_per_s": 100 / makespan,
            "makespan_s": makespan, "latency_p50_s": p95 - 1, "latency_p95_s": p95,
            "server_cpu_ms_per_job": cpu, "worker_cpu_ms_per_job": cpu,
            "peak_in_flight": 100, "worker_peak_rss_mib": rss,
            "workflow_task_timeouts": 0, "histories": 100,
        }  # fmt: skip

    runs = [run("keel", 20.0, 12.0, 140.0, 300.0), run("floor", 19.0, 10.0, 100.0, 80.0)]
    load_report.compare({"keel": 10.0, "floor": 9.0}, runs, ramp=5.0)
    keel, floor = runs
    assert keel["ideal_jobs_per_s"] == pytest.approx(100 / 15)
    assert floor["p95_to_single"] == pytest.approx(10 / 9)
    assert keel["to_floor"]["makespan_s"] == pytest.approx(20 / 19)
    assert keel["targets"] == {
        "makespan <= 1.1x floor": True,
        "p95 latency <= 1.1x floor": False,  # 1.2x
        "worker RSS < 1 GiB": True,
        "no workflow task timeouts": True,
        "worker CPU/job <= 1.3x floor": False,  # 1.4x
        "server CPU/job <= 1.3x floor": False,
        "in flight on one worker >= floor/1.1": True,
    }
    assert "targets" not in floor


def test_histories_split_workflow_task_timeouts_and_count_events_by_type() -> None:
    def timed_out(kind: TimeoutType.ValueType) -> HistoryEvent:
        attrs = WorkflowTaskTimedOutEventAttributes(timeout_type=kind)
        return HistoryEvent(
            event_type=EventType.EVENT_TYPE_WORKFLOW_TASK_TIMED_OUT,
            workflow_task_timed_out_event_attributes=attrs,
        )

    started = HistoryEvent(event_type=EventType.EVENT_TYPE_WORKFLOW_EXECUTION_STARTED)
    one = [
        started,
        timed_out(TimeoutType.TIMEOUT_TYPE_SCHEDULE_TO_START),
        timed_out(TimeoutType.TIMEOUT_TYPE_START_TO_CLOSE),
    ]
    figures = history_figures([one, [started]])
    assert figures["workflow_task_timeouts"] == 2
    assert figures["workflow_task_schedule_to_start_timeouts"] == 1
    assert figures["events_per_job_by_type"] == {
        "WORKFLOW_EXECUTION_STARTED": 1.0,
        "WORKFLOW_TASK_TIMED_OUT": 1.0,
    }


def test_peak_rss_is_read_from_proc() -> None:
    rss = peak_rss_bytes(os.getpid())
    assert rss is not None and rss > 10 * 2**20
    assert peak_rss_bytes(2**22 + 12345) is None


def test_a_tiny_run_measures_every_figure(redis_url: str, tmp_path: Path) -> None:
    out = tmp_path / "load.json"
    cmd = [sys.executable, "-m", "keel.workers.cli", "bench", "load", *TINY]
    cmd += ["--workers", "1", "--single-jobs", "1", "--json", str(out)]
    env = os.environ | {"REDIS_URL": redis_url}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]

    report = json.loads(out.read_text())
    assert report["complete"] is True
    figures = report["servers"]["sqlite"]
    assert figures["single_latency_s"]["keel"] > 0 and figures["single_latency_s"]["floor"] > 0
    runs = figures["runs"]
    assert [(r["kind"], r["workers"]) for r in runs] == [("keel", 1), ("floor", 1)]
    for run in runs:
        assert run["outcomes"] == {"completed": 4}, run["kind"]
        missing = [key for key, _, _ in load_report.ROWS if run.get(key) is None]
        assert missing == [], (run["kind"], missing)
        assert run["histories"] == 4 and run["workflow_tasks_per_job"] >= 4
        assert run["worker_peak_rss_mib"] > 10
    keel = runs[0]
    assert set(keel["targets"]) == set(load_report.TARGETS)
    assert all(mark in (True, False) for mark in keel["targets"].values())
    assert report["settings"]["worker"]["max_concurrent_activities"] >= 1000

    for title in ("Load on the sqlite dev server", "Targets on the sqlite dev server"):
        assert title in proc.stdout
    assert "PASS" in proc.stdout or "MISS" in proc.stdout
