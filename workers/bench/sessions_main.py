"""Running ``keel bench sessions``: start the servers, measure (``workers.bench.sessions``), print.

Tables go to stdout, progress and notices to stderr, every figure and setting to ``--json``.
Whatever happens (an error, Ctrl-C, SIGTERM), every process the benchmark started is stopped
before it exits; its temporary directory (child logs) is removed after a clean run and kept,
with its path printed, after a failed one.
"""

from __future__ import annotations

import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rich.console import Console

from keel.workers.bench import sessions_report
from keel.workers.bench.sessions import SessionsConfig, measure_sessions
from keel.workers.bench.stack import start_redis, start_simulator, start_temporal, supervisor
from keel.workers.bench.subcommand import environment, progress_bar, run_subcommand
from keel.workers.devstack import TRANSFER_RPS
from keel.workers.supervisor import Supervisor, free_port

__all__ = ["SessionsConfig", "run_sessions"]


def run_sessions(config: SessionsConfig) -> int:
    """Start the servers, run ``measure_sessions``, print its tables, stop everything.

    Returns:
        The exit code: 0 once every section ended (the target is reported, not enforced), 1
        on an error, 130 when interrupted.
    """
    return run_subcommand(
        "sessions",
        _settings(config),
        lambda state_dir, err: _main(config, state_dir, err),
        lambda out, report: print_tables(out, report, config),
        config.json_path,
    )


def print_tables(out: Console, report: dict[str, Any], config: SessionsConfig) -> None:
    """The four tables of a complete report."""
    out.print(sessions_report.overhead_table(report["overhead"], config.overhead_latency_ms))
    out.print(sessions_report.context_table(report["context"]))
    out.print(sessions_report.history_table(report["history"]))
    out.print(sessions_report.reads_table(report["reads"], config.readers))


async def _main(config: SessionsConfig, state_dir: Path, err: Console) -> dict[str, Any]:
    with supervisor(state_dir) as children:
        with err.status("starting Redis, two LLM simulators and the Temporal dev server…"):
            redis_url = os.environ.get("REDIS_URL") or start_redis(children, state_dir)
            sim_url, _ = start_simulator(children)
            latency = f"{config.overhead_latency_ms:g}"
            overhead_sim_url = _second_simulator(children, "--latency-ms", latency)
            env, temporal = await start_temporal("memory", state_dir, TRANSFER_RPS)
        err.print(f"{temporal}; overhead simulator {latency} ms per call, the other 0 ms")
        try:
            with progress_bar(err) as progress:
                report = await measure_sessions(
                    env.client,
                    redis_url,
                    sim_url,
                    overhead_sim_url,
                    config,
                    progress,
                    on_section=lambda name, _: err.print(f"{name}: done"),
                )
        finally:
            await env.shutdown()
    return report | {"temporal": temporal}


def _second_simulator(children: Supervisor, *args: str) -> str:
    """Start the overhead runs' simulator beside ``stack.start_simulator``'s; its base URL.

    Named apart from that one: a supervisor's children have unique names.
    """
    port = free_port()
    cmd = [sys.executable, "-m", "keel.workers.cli", "sim-llm", "--port", str(port), *args]
    children.start("llm-simulator-overhead", cmd, port=port)
    return f"http://127.0.0.1:{port}/v1"


def _settings(config: SessionsConfig) -> dict[str, Any]:
    return (
        {k: v for k, v in asdict(config).items() if k != "json_path"}
        | {
            "temporal_server": (
                "dev server, in memory, Temporal's default continue-as-new suggestion"
            ),
            "conversation_sim_latency_ms": 0,
        }
        | environment()
    )
