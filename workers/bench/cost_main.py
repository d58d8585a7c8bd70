"""Running ``keel bench cost``: start the servers, measure (``workers.bench.cost``), print, stop.

Tables go to stdout, progress and notices to stderr, every figure and setting to ``--json``.
Whatever happens (an error, Ctrl-C, SIGTERM), every process the benchmark started is stopped
before it exits; its temporary directory (the corpus, child logs) is removed after a clean run
and kept, with its path printed, after a failed one.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from rich.console import Console

from keel.activities.llm import LLMConfig
from keel.workers.bench import cost_report
from keel.workers.bench.config import Servers
from keel.workers.bench.cost import EMBEDDING_MODEL, TIER_MODELS, CostConfig, measure_cost
from keel.workers.bench.stack import start_redis, start_simulator, start_temporal, supervisor
from keel.workers.bench.subcommand import environment, progress_bar, run_subcommand
from keel.workers.devstack import TRANSFER_RPS

__all__ = ["CostConfig", "run_cost"]

WIDE = 160
"""Columns the tables are drawn in when stdout is not a terminal (a file, a pipe)."""


def run_cost(config: CostConfig) -> int:
    """Start the servers, run ``measure_cost``, print its tables, stop everything.

    Tables go to stdout, progress to stderr, every figure and setting to ``config.json_path``.
    Targets are reported PASS or MISS, not enforced: a benchmark, not a test.

    Returns:
        The exit code: 0 once the runs ended, 1 on an error, 130 when interrupted.
    """
    # bm25s sets its own logger to DEBUG when imported and logs every index it builds; the
    # benchmark's stderr is for progress.
    logging.getLogger("bm25s").setLevel(logging.WARNING)
    return run_subcommand(
        "cost",
        _settings(config),
        lambda state_dir, err: _main(config, state_dir, err),
        lambda out, report: _print(out, report, config),
        config.json_path,
        width=WIDE,  # seven runs side by side need more than rich's 80 columns
    )


async def _main(config: CostConfig, state_dir: Path, err: Console) -> dict[str, Any]:
    sim_args = ["--latency-ms", f"{config.sim_latency_ms:g}", "--seed", str(config.seed)]
    with supervisor(state_dir) as children:
        with err.status("starting Redis, the LLM simulator and the Temporal dev server…"):
            redis_url = os.environ.get("REDIS_URL") or start_redis(children, state_dir)
            sim_url, sim_pid = start_simulator(children, *sim_args)
            env, temporal = await start_temporal("memory", state_dir, TRANSFER_RPS)
        servers = Servers(redis_url=redis_url, sim_url=sim_url, sim_pid=sim_pid)
        err.print(f"{temporal}; simulator {config.sim_latency_ms:g} ms per call")
        try:
            with progress_bar(err, spinner=True) as progress:
                report = await measure_cost(
                    env.client,
                    servers,
                    config,
                    progress,
                    state_dir,
                    on_run=lambda name, f: err.print(
                        f"{name}: {f['completed']}/{f['jobs']} completed, "
                        f"{f['cost_per_job'] * 1e6:,.1f} µ$ per job, "
                        f"correct {f['correct_rate']:.1%}, {f['wall_s']:.1f} s"
                    ),
                )
        finally:
            await env.shutdown()
    return report | {"temporal": temporal}


def _print(out: Console, report: dict[str, Any], config: CostConfig) -> None:
    out.print(cost_report.workload_table(report, config.sim_latency_ms))
    out.print(cost_report.runs_table(report["runs"], config.sim_latency_ms, config.concurrency))
    out.print(cost_report.targets_table(report["comparison"]))
    out.print(cost_report.ablation_table(report["ablations"]))


def _settings(config: CostConfig) -> dict[str, Any]:
    return {
        "jobs": config.jobs,
        "tenants": config.tenants,
        "seed": config.seed,
        "sim_latency_ms": config.sim_latency_ms,
        "concurrency": config.concurrency,
        "ablations": config.ablations,
        "tier_models": TIER_MODELS,
        "prices_usd_per_mtok": {m: LLMConfig().price(m) for m in sorted(set(TIER_MODELS.values()))},
        "embedding_model": EMBEDDING_MODEL,
        "temporal_server": "dev server, in memory",
    } | environment()
