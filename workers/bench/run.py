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
import shutil
import signal
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import Progress
from temporalio.client import Client

from keel.workers.bench.api_load import api_load
from keel.workers.bench.cli_timing import cli_timing
from keel.workers.bench.config import BenchConfig, Servers
from keel.workers.bench.long_job import long_job
from keel.workers.bench.overhead import overhead
from keel.workers.bench.priority import priority
from keel.workers.bench.scale import scale
from keel.workers.bench.stack import (
    child_pid,
    start_redis,
    start_simulator,
    start_temporal,
    supervisor,
)
from keel.workers.bench.streaming import stream_latency
from keel.workers.bench.subcommand import environment, progress_bar
from keel.workers.bench.tables import TABLES
from keel.workers.devstack import TRANSFER_RPS
from keel.workers.logs import configure_logging
from keel.workers.supervisor import Supervisor

__all__ = ["BenchConfig", "run"]

STOCK_TRANSFER_RPS = 20
"""Temporal's own default for history.transferProcessorMaxPollRPS, printed for comparison."""

Section = Callable[[Client, BenchConfig, Servers, Progress, Supervisor], Awaitable[dict[str, Any]]]
SECTIONS: dict[str, Section] = {
    "overhead": lambda client, cfg, servers, progress, _: overhead(client, cfg, servers, progress),
    "long": lambda client, cfg, servers, progress, _: long_job(client, cfg, servers, progress),
    "scale": scale,
    "cli": cli_timing,
    "api": api_load,
    "stream": stream_latency,
    "priority": priority,
}


@dataclasses.dataclass(frozen=True)
class _Run:
    """One benchmark run: what it was asked for, where it writes, what it has measured so far."""

    config: BenchConfig
    rps: int
    report: dict[str, Any]
    state_dir: Path
    out: Console
    err: Console


def run(config: BenchConfig) -> int:
    """Run the benchmark; returns the exit code (1 on an error or a failed long-job target)."""
    out, err = Console(), Console(stderr=True)
    configure_logging("WARNING")
    rps = config.transfer_rps or TRANSFER_RPS
    report: dict[str, Any] = {"settings": _settings(config, rps), "results": {}, "complete": False}
    state_dir = Path(tempfile.mkdtemp(prefix="keel-bench-"))
    code = 1
    try:
        asyncio.run(_main(_Run(config, rps, report, state_dir, out, err)))
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


async def _main(bench: _Run) -> None:
    main = asyncio.current_task()
    if main is not None:
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main.cancel)
    with supervisor(bench.state_dir) as children:
        with bench.err.status("starting Redis and the LLM simulator…"):
            redis_url = os.environ.get("REDIS_URL") or start_redis(children, bench.state_dir)
            sim_url, sim_pid = start_simulator(children)
            servers = Servers(redis_url=redis_url, sim_url=sim_url, sim_pid=sim_pid)
        for mode in bench.config.servers:
            await _run_mode(bench, mode, servers, children)


async def _run_mode(bench: _Run, mode: str, servers: Servers, children: Supervisor) -> None:
    """Run every section against a dev server of one persistence mode, printing its tables.

    The figures go into the report as each section ends, so an interrupted run keeps them.
    """
    config, rps, out, err = bench.config, bench.rps, bench.out, bench.err
    with err.status(f"starting the Temporal dev server ({mode})…"):
        env, temporal_version = await start_temporal(mode, bench.state_dir, rps)
    mode_servers = dataclasses.replace(servers, temporal_pid=child_pid("temporal"))
    results: dict[str, Any] = {"temporal": temporal_version}
    bench.report["results"][mode] = results
    err.print(f"{mode}: {temporal_version}")
    out.rule(f"server {mode} · transferProcessorMaxPollRPS={rps} (stock {STOCK_TRANSFER_RPS})")
    try:
        for name in config.sections:
            started = time.perf_counter()
            with progress_bar(err, spinner=True) as progress:
                results[name] = await SECTIONS[name](
                    env.client, config, mode_servers, progress, children
                )
            err.print(f"{mode} · {name}: done in {time.perf_counter() - started:.1f} s")
            out.print(TABLES[name](mode, rps, config, results[name]))
    finally:
        await env.shutdown()


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
        "cli_runs": config.cli_runs,
        "api_clients": config.api_clients,
        "api_requests": config.api_requests,
    } | environment()
