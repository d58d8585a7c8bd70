"""Running ``keel bench``: start the servers, run the sections per server mode, report, stop.

Tables go to stdout, progress and notices to stderr, every figure and setting to ``--json``.
Whatever happens (an error, Ctrl-C, SIGTERM), every process the benchmark started is stopped
before it exits; its temporary directory (SQLite file, child logs) is removed after a clean run
and kept, with its path printed, after a failed one.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import platform
import shutil
import signal
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table
from temporalio.client import Client

from keel.workers._bench_sections import (
    OVERHEAD_TARGETS,
    BenchConfig,
    Servers,
    long_job,
    overhead,
    scale,
)
from keel.workers._bench_stack import (
    Children,
    child_pid,
    start_redis,
    start_simulator,
    start_temporal,
)
from keel.workers.devstack import TRANSFER_RPS
from keel.workers.logs import configure_logging

__all__ = ["BenchConfig", "run"]

STOCK_TRANSFER_RPS = 20
"""Temporal's own default for history.transferProcessorMaxPollRPS, printed for comparison."""

Section = Callable[[Client, BenchConfig, Servers, Progress, Children], Awaitable[dict[str, Any]]]
SECTIONS: dict[str, Section] = {
    "overhead": lambda client, cfg, servers, progress, _: overhead(client, cfg, servers, progress),
    "long": lambda client, cfg, servers, progress, _: long_job(client, cfg, servers, progress),
    "scale": scale,
}


def run(config: BenchConfig) -> int:
    """Run the benchmark; returns the exit code (1 on an error or a failed long-job target)."""
    out, err = Console(), Console(stderr=True)
    configure_logging("WARNING")
    rps = config.transfer_rps or TRANSFER_RPS
    report: dict[str, Any] = {"settings": _settings(config, rps), "results": {}, "complete": False}
    state_dir = Path(tempfile.mkdtemp(prefix="keel-bench-"))
    code = 1
    try:
        asyncio.run(_main(config, rps, report, state_dir, out, err))
        report["complete"] = True
        failed = [
            mode for mode, sections in report["results"].items()
            if "long" in sections and not sections["long"]["passed"]
        ]  # fmt: skip
        code = 1 if failed else 0
    except (KeyboardInterrupt, asyncio.CancelledError):
        err.print("[yellow]interrupted[/yellow]: everything the benchmark started is stopped")
        code = 130
    except Exception as error:  # noqa: BLE001 - reported with where the logs are
        err.print(f"[red]error:[/red] {type(error).__name__}: {error}")
    finally:
        if config.json_path is not None:
            config.json_path.write_text(json.dumps(report, indent=2, default=str) + "\n")
            err.print(f"figures written to {config.json_path}")
        if code == 0:
            shutil.rmtree(state_dir, ignore_errors=True)
        else:
            err.print(f"logs and server files kept in {state_dir}")
    return code


async def _main(
    config: BenchConfig,
    rps: int,
    report: dict[str, Any],
    state_dir: Path,
    out: Console,
    err: Console,
) -> None:
    main = asyncio.current_task()
    if main is not None:
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main.cancel)
    with Children(state_dir) as children:
        with err.status("starting Redis and the LLM simulator…"):
            redis_url = os.environ.get("REDIS_URL") or start_redis(children, state_dir)
            sim_url, sim_pid = start_simulator(children)
            servers = Servers(redis_url=redis_url, sim_url=sim_url, sim_pid=sim_pid)
        for mode in config.servers:
            with err.status(f"starting the Temporal dev server ({mode})…"):
                env, temporal_version = await start_temporal(mode, state_dir, rps)
            mode_servers = dataclasses.replace(servers, temporal_pid=child_pid("temporal"))
            results: dict[str, Any] = {"temporal": temporal_version}
            report["results"][mode] = results
            err.print(f"{mode}: {temporal_version}")
            out.rule(
                f"server {mode} · transferProcessorMaxPollRPS={rps} (stock {STOCK_TRANSFER_RPS})"
            )
            try:
                for name in config.sections:
                    started = time.perf_counter()
                    with _progress(err) as progress:
                        results[name] = await SECTIONS[name](
                            env.client, config, mode_servers, progress, children
                        )
                    err.print(f"{mode} · {name}: done in {time.perf_counter() - started:.1f} s")
                    out.print(TABLES[name](mode, rps, config, results[name]))
            finally:
                await env.shutdown()


def _progress(err: Console) -> Progress:
    return Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=True,
        disable=not err.is_terminal,
        redirect_stdout=False,
        redirect_stderr=False,
    )


def _settings(config: BenchConfig, rps: int) -> dict[str, Any]:
    return {
        "servers": config.servers,
        "sections": config.sections,
        "transfer_rps": rps,
        "transfer_rps_source": "--transfer-rps"
        if config.transfer_rps
        else "keel.workers.devstack.TRANSFER_RPS",
        "transfer_rps_stock": STOCK_TRANSFER_RPS,
        "jobs": config.jobs,
        "concurrency": config.concurrency,
        "rounds": config.rounds,
        "warmup": config.warmup,
        "sequential": config.sequential,
        "history_sample": config.history_sample,
        "iterations": config.iterations,
        "output_kib": config.output_kib,
        "fleet": config.fleet,
        "cpu_count": os.cpu_count(),
        "redis": "REDIS_URL" if os.environ.get("REDIS_URL") else "started",
        "python": platform.python_version(),
        "temporalio": version("temporalio"),
        "platform": platform.platform(),
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def _f(value: float | None, fmt: str = ",.1f", scale: float = 1.0) -> str:
    return "–" if value is None else format(value * scale, fmt)


def _span(values: list[float | None]) -> str:
    known = [v for v in values if v is not None]
    return f"{min(known):.2f}–{max(known):.2f}" if known else "–"


def _title(section: str, mode: str, rps: int) -> str:
    return f"{section} · server {mode} · transferProcessorMaxPollRPS={rps}"


OVERHEAD_COLUMNS = (("keel", "keel"), ("bare", "bare"), ("bare_unsandboxed", "bare-u"))
"""Result keys and column headers: Keel, bare on the SDK's defaults, bare unsandboxed."""


def _overhead_table(mode: str, rps: int, config: BenchConfig, data: dict[str, Any]) -> Table:
    table = Table(title=_title("Overhead: Keel job vs bare Temporal workflow", mode, rps))
    ratios = [(name, data.get(f"ratio_keel_over_{name}", {})) for name, _ in OVERHEAD_COLUMNS[1:]]
    table.add_column("metric")
    for _, header in OVERHEAD_COLUMNS:
        table.add_column(header, justify="right")
    for name, _ in ratios:
        header = dict(OVERHEAD_COLUMNS)[name]
        table.add_column(f"keel/{header}", justify="right")
    rows: list[tuple[str, str, str, float]] = [
        ("throughput (jobs/s)", "jobs_per_s", ",.1f", 1.0),
        ("latency p50 (ms)", "latency_p50_s", ",.0f", 1000.0),
        ("latency p95 (ms)", "latency_p95_s", ",.0f", 1000.0),
        (f"single-job median (ms, n={config.sequential})", "single_median_s", ",.0f", 1000.0),
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
    columns = [data[name] for name, _ in OVERHEAD_COLUMNS]
    table.add_row(
        f"jobs completed (concurrency {config.concurrency})",
        *(f"{c['completed']}/{c['jobs']}" for c in columns),
        *("" for _ in ratios),
    )
    for label, key, fmt, factor in rows:
        table.add_row(
            label,
            *(_f(c.get(key), fmt, factor) for c in columns),
            *(_f(r.get(key), ".2f") if key in r else "" for _, r in ratios),
        )
        if key == "jobs_per_s":
            table.add_row(
                "  ratio by round (min–max)",
                *("" for _ in columns),
                *(_span(r.get("jobs_per_s_by_round", [])) for _, r in ratios),
            )
    sandbox = "sandboxed" if data.get("keel_workflow_sandbox") else "unsandboxed"
    table.caption = (
        f"{config.jobs} jobs of each kind in {config.rounds} rounds, the kinds taking turns. "
        "bare: the SDK's default worker (sandboxed); bare-u: unsandboxed, like Keel's worker "
        f"(which runs {sandbox}, as `keel worker` does). History: mean over "
        f"{columns[0].get('history_sampled', 0)} workflows of each kind; CPU: this process "
        "(its workers and the client), and the server and simulator processes while each "
        "kind's rounds ran.\n" + _targets_line(data)
    )
    return table


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


TABLES: dict[str, Callable[[str, int, BenchConfig, dict[str, Any]], Table]] = {
    "overhead": _overhead_table,
    "long": _long_table,
    "scale": _scale_table,
}
