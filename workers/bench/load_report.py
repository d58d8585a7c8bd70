"""``keel bench load``'s report: ratios to the floor and to one job, targets, and tables.

Pure arithmetic over what ``workers.bench.load`` measured. Targets are printed PASS or MISS
and never change the exit code: a benchmark, not a test.
"""

from __future__ import annotations

from typing import Any

from rich.table import Table

from keel.workers.bench.measure import ratio

__all__ = ["TARGETS", "compare", "runs_table", "targets_table"]

TIME_TARGET = 1.1
"""Makespan and p95 latency within this factor of the floor's."""
CPU_TARGET = 1.3
"""Worker and server CPU per job within this factor of the floor's."""
RSS_TARGET_MIB = 1024
"""Each worker's peak resident memory below 1 GiB."""
IN_FLIGHT_TARGET = 1.1
"""The most jobs one worker holds in flight within this factor of the floor's."""
TARGETS = (
    "makespan <= 1.1x floor",
    "p95 latency <= 1.1x floor",
    "worker RSS < 1 GiB",
    "no workflow task timeouts",
    "worker CPU/job <= 1.3x floor",
    "server CPU/job <= 1.3x floor",
    "in flight on one worker >= floor/1.1",
)


def compare(single: dict[str, float | None], runs: list[dict[str, Any]], ramp: float) -> None:
    """Add each run's ratios to one job and to the floor, and each Keel run's targets, in place.

    Ideal throughput is every job taking a single job's time, started as the stream starts
    them: ``jobs / (ramp + single-job latency)``.
    """
    floors = {r["workers"]: r for r in runs if r["kind"] == "floor"}
    for run in runs:
        alone = single.get(run["kind"])
        run["single_latency_s"] = alone
        run["p50_to_single"] = ratio(run["latency_p50_s"], alone)
        run["p95_to_single"] = ratio(run["latency_p95_s"], alone)
        run["ideal_jobs_per_s"] = ratio(run["jobs"], ramp + alone) if alone else None
        run["jobs_per_s_to_ideal"] = ratio(run["jobs_per_s"], run["ideal_jobs_per_s"])
        floor = floors.get(run["workers"])
        if run["kind"] != "keel" or floor is None:
            continue
        run["to_floor"] = {
            key: ratio(run[key], floor[key])
            for key in (
                "makespan_s",
                "latency_p50_s",
                "latency_p95_s",
                "server_cpu_ms_per_job",
                "worker_cpu_ms_per_job",
                "peak_in_flight",
            )
        }
        run["targets"] = _targets(run, run["to_floor"])


def _targets(run: dict[str, Any], to_floor: dict[str, float | None]) -> dict[str, bool | None]:
    def within(value: float | None, limit: float) -> bool | None:
        return None if value is None else value <= limit

    rss = run.get("worker_peak_rss_mib")
    in_flight = to_floor["peak_in_flight"]
    return {
        TARGETS[0]: within(to_floor["makespan_s"], TIME_TARGET),
        TARGETS[1]: within(to_floor["latency_p95_s"], TIME_TARGET),
        TARGETS[2]: None if rss is None else rss < RSS_TARGET_MIB,
        TARGETS[3]: run["workflow_task_timeouts"] == 0 and run["histories"] > 0,
        TARGETS[4]: within(to_floor["worker_cpu_ms_per_job"], CPU_TARGET),
        TARGETS[5]: within(to_floor["server_cpu_ms_per_job"], CPU_TARGET),
        TARGETS[6]: (
            None if run["workers"] != 1 or in_flight is None else in_flight >= 1 / IN_FLIGHT_TARGET
        ),
    }


ROWS: tuple[tuple[str, str, str], ...] = (
    ("completed", "completed", "{:,}"),
    ("makespan_s", "makespan (s)", "{:,.1f}"),
    ("latency_p50_s", "latency p50 (s)", "{:,.1f}"),
    ("latency_p95_s", "latency p95 (s)", "{:,.1f}"),
    ("single_latency_s", "single job (s)", "{:,.1f}"),
    ("p50_to_single", "p50 / single job", "{:.2f}x"),
    ("p95_to_single", "p95 / single job", "{:.2f}x"),
    ("jobs_per_s", "jobs/s", "{:.2f}"),
    ("ideal_jobs_per_s", "ideal jobs/s", "{:.2f}"),
    ("jobs_per_s_to_ideal", "jobs/s / ideal", "{:.2f}x"),
    ("peak_in_flight", "most in flight", "{:,}"),
    ("worker_peak_rss_mib", "worker peak RSS (MiB)", "{:,.0f}"),
    ("worker_cpu_ms_per_job", "worker CPU / job (ms)", "{:,.1f}"),
    ("server_cpu_ms_per_job", "server CPU / job (ms)", "{:,.1f}"),
    ("workflow_tasks_per_job", "workflow tasks / job", "{:.1f}"),
    ("events_per_job", "history events / job", "{:.1f}"),
    ("workflow_task_timeouts", "workflow task timeouts", "{:,}"),
    ("workflow_task_schedule_to_start_timeouts", "  of which sticky queue waits", "{:,}"),
    ("cache_evictions", "cache evictions", "{:,.0f}"),
    ("cache_misses", "cache misses", "{:,.0f}"),
    ("workflow_schedule_to_start_p50_ms", "wf task sched-to-start p50 (ms)", "{:,.1f}"),
    ("workflow_schedule_to_start_p95_ms", "wf task sched-to-start p95 (ms)", "{:,.1f}"),
    ("activity_schedule_to_start_mean_ms", "activity sched-to-start mean (ms)", "{:,.1f}"),
    ("activity_schedule_to_start_p95_bound_ms", "activity sched-to-start p95 <= (ms)", "{:,.0f}"),
)
"""The runs table's rows: figure, label, format."""


def _cell(value: Any, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def runs_table(server: str, figures: dict[str, Any], config: Any) -> Table:
    """Every run on one server, Keel and floor columns side by side per fleet size."""
    title = (
        f"Load on the {server} dev server: {config.jobs:,} jobs started over "
        f"{config.ramp_seconds:g} s, model calls {config.latency_min:g}-{config.latency_max:g} s"
    )
    table = Table(title=title)
    table.add_column("")
    runs = figures["runs"]
    for run in runs:
        table.add_column(f"{run['kind']} x{run['workers']}", justify="right")
    for key, label, fmt in ROWS:
        table.add_row(label, *(_cell(run.get(key), fmt) for run in runs))
    return table


def targets_table(server: str, figures: dict[str, Any]) -> Table:
    """Each Keel run's targets against the floor: PASS, MISS, or - when not measured."""
    keel = [r for r in figures["runs"] if "targets" in r]
    table = Table(title=f"Targets on the {server} dev server (reported, not enforced)")
    table.add_column("target")
    for run in keel:
        table.add_column(f"keel x{run['workers']}", justify="center")
    for name in TARGETS:
        marks = [run["targets"][name] for run in keel]
        table.add_row(name, *("-" if m is None else "PASS" if m else "MISS" for m in marks))
    return table
