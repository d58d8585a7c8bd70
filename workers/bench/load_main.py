"""Running ``keel bench load``: start the servers, measure (``workers.bench.load``), print.

Redis and the simulator (every call ``--latency-min`` to ``--latency-max`` seconds) are started
once; per ``--server`` mode a Temporal dev server is started as ``keel dev`` starts it
(``workers.devstack.temporal_server_cmd``: its dynamic config and search attributes, a SQLite
file or memory), measured against, and stopped. Tables go to stdout, progress to stderr, every
figure and setting to ``--json``; every process the benchmark started is stopped however it
ends (``workers.bench.subcommand``).
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rich.console import Console
from temporalio.client import Client

from keel.activities.converter import DATA_CONVERTER
from keel.workers.bench import load_report
from keel.workers.bench.load import LoadConfig, LoadServer, measure_load
from keel.workers.bench.stack import start_redis, start_simulator, supervisor
from keel.workers.bench.subcommand import environment, run_subcommand
from keel.workers.devstack import DEV_SERVER_DYNAMIC_CONFIG, temporal_server_cmd
from keel.workers.settings import WorkerSettings
from keel.workers.supervisor import Supervisor, find_binary, free_port

__all__ = ["LoadConfig", "print_tables", "run_load"]


def run_load(config: LoadConfig) -> int:
    """Start the servers, run ``measure_load`` on each, print its tables, stop everything.

    Returns:
        The exit code: 0 once every run ended (targets are reported, not enforced), 1 on an
        error, 130 when interrupted.
    """
    return run_subcommand(
        "load",
        _settings(config),
        lambda state_dir, err: _main(config, state_dir, err),
        lambda out, report: print_tables(out, report, config),
        config.json_path,
        width=160,  # four runs side by side
    )


def print_tables(out: Console, report: dict[str, Any], config: LoadConfig) -> None:
    """Each server's runs and targets."""
    for server, figures in report["servers"].items():
        out.print(load_report.runs_table(server, figures, config))
        out.print(load_report.targets_table(server, figures))
    out.print(
        "The in-flight target compares the most jobs one worker held in this stream; a larger "
        "stream against the in-memory server (--server memory --jobs 2000) asks for more."
    )


async def _main(config: LoadConfig, state_dir: Path, err: Console) -> dict[str, Any]:
    low, high = config.latency_min * 1000, config.latency_max * 1000
    sim_args = ["--latency-ms", f"{low:g}", "--latency-jitter-ms", f"{high - low:g}"]
    servers: dict[str, Any] = {}
    with supervisor(state_dir) as children:
        with err.status("starting Redis and the LLM simulator…"):
            redis_url = os.environ.get("REDIS_URL") or start_redis(children, state_dir)
            sim_url, _ = start_simulator(children, *sim_args, "--seed", str(config.seed))
        for mode in config.servers:
            with err.status(f"starting the Temporal dev server ({mode})…"):
                server = await _start_temporal(mode, state_dir, children, redis_url, sim_url)
            try:
                figures = await measure_load(server, config, children, on_step=err.print)
            finally:
                children.stop(f"temporal-{mode}")
            load_report.compare(figures["single_latency_s"], figures["runs"], config.ramp_seconds)
            servers[mode] = figures
    return {"servers": servers, "temporal": _temporal_version()}


async def _start_temporal(
    mode: str, state_dir: Path, children: Supervisor, redis_url: str, sim_url: str
) -> LoadServer:
    port = free_port()
    db_file = state_dir / f"temporal-{mode}.db" if mode == "sqlite" else None
    cmd = temporal_server_cmd(port, free_port(), db_file)
    proc = children.start(f"temporal-{mode}", cmd, port=port)
    target = f"127.0.0.1:{port}"
    return LoadServer(
        keel_client=await Client.connect(target, data_converter=DATA_CONVERTER),
        floor_client=await Client.connect(target),
        server_pid=proc.pid,
        redis_url=redis_url,
        sim_url=sim_url,
    )


def _temporal_version() -> str:
    out = subprocess.run(
        [find_binary("temporal"), "--version"], capture_output=True, text=True, timeout=30
    ).stdout.strip()
    return (out.splitlines() or ["temporal (unknown version)"])[0]


def _settings(config: LoadConfig) -> dict[str, Any]:
    worker = WorkerSettings()
    return (
        {k: v for k, v in asdict(config).items() if k != "json_path"}
        | {
            "worker": {
                k: getattr(worker, k)
                for k in (
                    "max_concurrent_activities",
                    "max_concurrent_workflow_tasks",
                    "max_cached_workflows",
                    "poller_autoscaling",
                    "max_pollers",
                    "llm_max_connections",
                    "resource_tuner",
                    "workflow_sandbox",
                    "uvloop",
                )
            },
            "temporal_dynamic_config": DEV_SERVER_DYNAMIC_CONFIG,
        }
        | environment()
    )
