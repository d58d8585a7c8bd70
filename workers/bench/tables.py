"""The tables ``keel bench`` prints: one per section and server mode, figures from its JSON.

Each function takes the server mode, the transfer RPS, the config and a section's figures (as
written to ``--json``) and returns a rich ``Table`` whose caption says how to read it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from rich.table import Table

from keel.workers.bench.api_load import API_TARGETS_MS
from keel.workers.bench.cli_timing import CLI_TARGETS_MS
from keel.workers.bench.config import BenchConfig
from keel.workers.bench.overhead import OVERHEAD_TARGETS
from keel.workers.bench.priority import priority_table


def _f(value: float | None, fmt: str = ",.1f", scale: float = 1.0) -> str:
    return "–" if value is None else format(value * scale, fmt)


def _span(values: list[float | None]) -> str:
    known = [v for v in values if v is not None]
    return f"{min(known):.2f}–{max(known):.2f}" if known else "–"


def _title(section: str, mode: str, rps: int) -> str:
    return f"{section} · server {mode} · transferProcessorMaxPollRPS={rps}"


OVERHEAD_COLUMNS = (("keel", "keel"), ("bare", "bare"), ("bare_unsandboxed", "bare-u"))
"""Result keys and column headers: Keel, bare on the SDK's defaults, bare unsandboxed."""


OVERHEAD_ROWS: list[tuple[str, str, str, float]] = [
    ("throughput (jobs/s)", "jobs_per_s", ",.1f", 1.0),
    ("latency p50 (ms)", "latency_p50_s", ",.0f", 1000.0),
    ("latency p95 (ms)", "latency_p95_s", ",.0f", 1000.0),
    ("single-job median (ms, n={sequential})", "single_median_s", ",.0f", 1000.0),
    ("activities per job", "activities_per_job", ",.1f", 1.0),
    ("history events per job", "history_events_per_job", ",.1f", 1.0),
    ("history bytes per job", "history_bytes_per_job", ",.0f", 1.0),
    ("  inputs and results", "history_payloads_bytes_per_job", ",.0f", 1.0),
    ("  summaries, details, search attrs", "history_metadata_bytes_per_job", ",.0f", 1.0),
    ("  markers", "history_markers_bytes_per_job", ",.0f", 1.0),
    ("  the events themselves", "history_events_bytes_per_job", ",.0f", 1.0),
    ("process CPU (s)", "cpu_s", ",.2f", 1.0),
    ("CPU per job (ms): this process", "cpu_ms_per_job", ",.1f", 1.0),
    ("  the Temporal server", "server_cpu_ms_per_job", ",.1f", 1.0),
    ("  the LLM simulator", "simulator_cpu_ms_per_job", ",.1f", 1.0),
    ("  all three", "all_cpu_ms_per_job", ",.1f", 1.0),
    ("wall (s)", "wall_s", ",.2f", 1.0),
]
"""The overhead table's rows: label, result key, number format and scale factor."""


def _overhead_table(mode: str, rps: int, config: BenchConfig, data: dict[str, Any]) -> Table:
    table = Table(title=_title("Overhead: Keel job vs bare Temporal workflow", mode, rps))
    ratios = [(name, data.get(f"ratio_keel_over_{name}", {})) for name, _ in OVERHEAD_COLUMNS[1:]]
    table.add_column("metric")
    for _, header in OVERHEAD_COLUMNS:
        table.add_column(header, justify="right")
    for name, _ in ratios:
        header = dict(OVERHEAD_COLUMNS)[name]
        table.add_column(f"keel/{header}", justify="right")
    columns = [data[name] for name, _ in OVERHEAD_COLUMNS]
    table.add_row(
        f"jobs completed (concurrency {config.concurrency})",
        *(f"{c['completed']}/{c['jobs']}" for c in columns),
        *("" for _ in ratios),
    )
    for label, key, fmt, factor in OVERHEAD_ROWS:
        table.add_row(
            label.format(sequential=config.sequential),
            *(_f(c.get(key), fmt, factor) for c in columns),
            *(_f(r.get(key), ".2f") if key in r else "" for _, r in ratios),
        )
        if key == "jobs_per_s":
            table.add_row(
                "  ratio by round (min–max)",
                *("" for _ in columns),
                *(_span(r.get("jobs_per_s_by_round", [])) for _, r in ratios),
            )
    table.caption = _overhead_caption(config, data)
    return table


def _overhead_caption(config: BenchConfig, data: dict[str, Any]) -> str:
    sandbox = "sandboxed" if data.get("keel_workflow_sandbox") else "unsandboxed"
    return (
        f"{config.jobs} jobs of each kind in {config.rounds} rounds, the kinds taking turns. "
        "bare: the SDK's default worker (sandboxed); bare-u: unsandboxed, like Keel's worker "
        f"(which runs {sandbox}, as `keel worker` does). History: mean over "
        f"{data['keel'].get('history_sampled', 0)} workflows of each kind; CPU: this process "
        "(its workers and the client), and the server and simulator processes while each "
        "kind's rounds ran.\n" + _targets_line(data)
    )


def _targets_line(data: dict[str, Any]) -> str:
    """One line per baseline: each overhead target and whether this run met it."""
    lines = []
    for name, header in OVERHEAD_COLUMNS[1:]:
        ratios, met = data.get(f"ratio_keel_over_{name}", {}), data.get(f"targets_vs_{name}", {})
        cells = [
            f"{label} {op} {limit:.2f}: {_f(ratios.get(key), '.3f')} "
            + {True: "[green]met[/green]", False: "[red]missed[/red]", None: "–"}[met.get(key)]
            for key, (label, op, limit) in OVERHEAD_TARGETS.items()
        ]
        lines.append(f"targets vs {header}: " + " · ".join(cells))
    return "\n".join(lines)


def _long_table(mode: str, rps: int, config: BenchConfig, data: dict[str, Any]) -> Table:
    table = Table(title=_title("Long job", mode, rps))
    table.add_column("run")
    for column in ("iterations", "events", "bytes", "bytes/iteration"):
        table.add_column(column, justify="right")
    runs = data["per_run"]
    picks: dict[int, list[str]] = {}
    for name, index in (("first", 0), ("middle", len(runs) // 2), ("last", len(runs) - 1)):
        if runs:
            picks.setdefault(index, []).append(name)
    for index, names in sorted(picks.items()):
        r = runs[index]
        table.add_row(
            f"{'/'.join(names)} (#{r['run']})",
            str(r["iterations"]),
            f"{r['events']:,}",
            f"{r['bytes']:,}",
            _f(r["bytes_per_iteration"], ",.0f"),
        )
    table.add_row(
        f"all {data['runs']} runs",
        str(data["iterations_reached"]),
        f"{data['total_history_events']:,}",
        f"{data['total_history_bytes']:,}",
        _f(data["history_bytes_per_iteration"], ",.0f"),
        end_section=True,
    )
    verdict = "[green]PASS[/green]" if data["passed"] else "[red]FAIL[/red]"
    table.caption = (
        f"{verdict}: largest run history {data['max_run_history_bytes']:,} B "
        f"(limit {data['history_limit_bytes']:,} B), most events in a run "
        f"{data['max_run_history_events']:,}; "
        f"reached {data['iterations_reached']}/{data['iterations_target']} iterations "
        f"({data['outcome']}, {data['exhausted_budget']}); {data['tool_output_bytes']:,} B per "
        f"tool output; wall {data['wall_s']:.1f} s "
        f"({_f(data['seconds_per_iteration'], '.3f')} s/iteration), CPU {data['cpu_s']:.1f} s"
        + (f"; error: {data['error']}" if data["error"] else "")
    )
    return table


def _scale_table(mode: str, rps: int, config: BenchConfig, data: dict[str, Any]) -> Table:
    title = f"Scale: {config.jobs} Keel jobs, {config.concurrency} in flight"
    table = Table(title=_title(title, mode, rps))
    for column in (
        "worker processes",
        "completed",
        "jobs/s",
        "speed-up",
        "p50 (ms)",
        "p95 (ms)",
        "workers CPU (s)",
    ):
        table.add_column(column, justify="right")
    for fleet in data["fleets"]:
        table.add_row(
            str(fleet["workers"]),
            f"{fleet['completed']}/{fleet['jobs']}",
            _f(fleet["jobs_per_s"]),
            _f(fleet["speedup"], ".2f"),
            _f(fleet["latency_p50_s"], ",.0f", 1000.0),
            _f(fleet["latency_p95_s"], ",.0f", 1000.0),
            _f(fleet["workers_cpu_s"], ",.2f"),
        )
    table.caption = f"{os.cpu_count()} CPUs on this machine, shared by the server and workers"
    return table


CLI_ROWS = (
    ("help", "keel --help"),
    ("status_api", "keel status JOB --json (API)"),
    ("list_api", "keel list --json (API)"),
    ("status_direct", "keel status JOB --json (Temporal)"),
    ("list_direct", "keel list --json (Temporal)"),
)
"""The cli table's rows: timing key and the command as a user types it."""


def _cli_table(mode: str, rps: int, config: BenchConfig, data: dict[str, Any]) -> Table:
    table = Table(title=_title("The keel command, process start included", mode, rps))
    for col in ("command", "min (ms)", "median (ms)", "p95 (ms)", "target"):
        table.add_column(col, justify="left" if col == "command" else "right")
    for key, label in CLI_ROWS:
        t = data["timings"][key]
        limit = CLI_TARGETS_MS.get(key)
        verdict = (
            ""
            if limit is None
            else (f"<= {limit:.0f} " + ("met" if data["targets_met"][key] else "MISSED"))
        )
        table.add_row(
            label,
            _f(t["min_ms"], ",.0f"),
            _f(t["median_ms"], ",.0f"),
            _f(t["p95_ms"], ",.0f"),
            verdict,
        )
    table.caption = (
        f"{data['runs']} runs of each after warm-up, wall time of the whole process; "
        "(API) reads through `keel api` (KEEL_API_URL, as `keel dev` exports), "
        "(Temporal) connects with the Temporal SDK"
    )
    return table


def _api_table(mode: str, rps: int, config: BenchConfig, data: dict[str, Any]) -> Table:
    table = Table(title=_title(f"The HTTP gateway, {data['clients']} clients", mode, rps))
    for col in ("call", "p50 (ms)", "p95 (ms)", "p99 (ms)", "per s", "target"):
        table.add_column(col, justify="left" if col == "call" else "right")
    for kind, label in (("submit", "POST /v1/jobs"), ("status", "GET /v1/jobs/{id}")):
        limit = API_TARGETS_MS[f"{kind}_p95_ms"]
        met = data["targets_met"][f"{kind}_p95_ms"]
        table.add_row(
            label,
            _f(data[f"{kind}_p50_ms"]),
            _f(data[f"{kind}_p95_ms"]),
            _f(data[f"{kind}_p99_ms"]),
            _f(data[f"{kind}_per_s"], ",.0f"),
            f"p95 <= {limit:.0f} " + ("met" if met else "MISSED"),
        )
    table.caption = (
        f"{data['requests']} requests of each kind from {data['clients']} concurrent clients, "
        f"{data.get('api_processes', 1)} `keel api` process(es); "
        "per s is the rate sustained at that concurrency"
    )
    return table


STREAM_ROWS = (
    ("first_progress_ms", "submit -> first progress event"),
    ("first_token_ms", "submit -> first answer token"),
    ("end_ms", "submit -> end (result)"),
    ("streaming_lead_ms", "first token -> end: the lead streaming gives"),
)


def _stream_table(mode: str, rps: int, config: BenchConfig, data: dict[str, Any]) -> Table:
    table = Table(title=_title("Job events over SSE (GET /v1/jobs/{id}/events)", mode, rps))
    for col in ("from submit", "p50 (ms)", "p95 (ms)"):
        table.add_column(col, justify="left" if col == "from submit" else "right")
    for key, label in STREAM_ROWS:
        table.add_row(label, _f(data[f"{key}_p50"], ",.0f"), _f(data[f"{key}_p95"], ",.0f"))
    table.caption = (
        f"{data['jobs']} jobs, {data['concurrency']} at a time, model calls of 300 ms and "
        f"answers streamed at 15 ms a piece; {data['token_events_per_job']:.0f} token events "
        "per job"
    )
    return table


TABLES: dict[str, Callable[[str, int, BenchConfig, dict[str, Any]], Table]] = {
    "overhead": _overhead_table,
    "long": _long_table,
    "scale": _scale_table,
    "cli": _cli_table,
    "api": _api_table,
    "stream": _stream_table,
    "priority": priority_table,
}
