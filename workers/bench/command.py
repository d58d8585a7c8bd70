"""The ``keel bench`` command: its options, validated into a ``BenchConfig``, and nothing more.

The ``keel`` command line imports this module to build its help, so it imports only typer and
the standard library; the machinery (``workers.bench.run`` and what it imports) is imported
when the command runs.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer


class ServerMode(StrEnum):
    """Which Temporal dev server persistence to benchmark against."""

    sqlite = "sqlite"
    memory = "memory"
    both = "both"


SECTIONS = ("overhead", "long", "scale", "cli", "api", "stream", "priority")
"""Benchmark sections, in the order they run."""


def _csv(value: str, allowed: tuple[str, ...] | None = None) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise typer.BadParameter("give at least one value")
    unknown = [v for v in items if allowed is not None and v not in allowed]
    if unknown:
        raise typer.BadParameter(
            f"unknown {', '.join(unknown)}; choose from {', '.join(allowed or ())}"
        )
    return list(dict.fromkeys(items))


def _fleet(value: str) -> list[int]:
    try:
        sizes = [int(v) for v in _csv(value)]
    except ValueError:
        raise typer.BadParameter("comma-separated worker counts, e.g. 1,2,3") from None
    if any(n < 1 or n > 32 for n in sizes):
        raise typer.BadParameter("worker counts must be between 1 and 32")
    return sizes


def bench(
    server: Annotated[
        ServerMode, typer.Option(help="Temporal dev server persistence to run against.")
    ] = ServerMode.both,
    only: Annotated[
        str,
        typer.Option(help="Comma list of sections: overhead,long,scale,cli,api,stream,priority."),
    ] = ",".join(SECTIONS),
    jobs: Annotated[int, typer.Option(min=1, help="Jobs per throughput run.")] = 200,
    concurrency: Annotated[int, typer.Option(min=1, help="Jobs in flight at most.")] = 16,
    rounds: Annotated[
        int,
        typer.Option(
            min=1, help="Overhead: run each kind's jobs in this many rounds, taking turns."
        ),
    ] = 4,
    warmup: Annotated[int, typer.Option(min=0, help="Uncounted jobs before each run.")] = 5,
    sequential: Annotated[
        int,
        typer.Option(
            min=1,
            help="Jobs of each kind run one at a time, the kinds taking turns, for single-job "
            "latency (the median; one job's time swings with whatever else the machine does).",
        ),
    ] = 50,
    history_sample: Annotated[
        int,
        typer.Option(
            min=1,
            help="Completed workflows of each kind whose history is measured, spread over "
            "the rounds (the count of workflow tasks, and so of events, varies with timing).",
        ),
    ] = 50,
    iterations: Annotated[
        int, typer.Option(min=1, max=10_000, help="Iterations of the long job.")
    ] = 1000,
    output_kib: Annotated[
        int, typer.Option(min=1, max=200, help="KiB of text each long-job tool call returns.")
    ] = 20,
    api_clients: Annotated[
        int, typer.Option(min=1, max=1000, help="Concurrent HTTP clients (api).")
    ] = 100,
    api_requests: Annotated[
        int, typer.Option(min=1, help="Requests of each kind, submit and status (api).")
    ] = 2000,
    fleet: Annotated[str, typer.Option(help="Worker process counts for the scale run.")] = "1,2,3",
    cli_runs: Annotated[
        int, typer.Option(min=1, max=200, help="Timed runs of each keel command (cli).")
    ] = 20,
    transfer_rps: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="history.transferProcessorMaxPollRPS for the dev server "
            "(default: workers.devstack.TRANSFER_RPS; 20 is Temporal's stock value).",
        ),
    ] = None,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Also write every figure to this JSON file.")
    ] = None,
) -> None:
    """Benchmark Keel on servers it starts itself, and print what it measured.

    A benchmark, not a test: the one target that sets its exit code is the long
    job's history; the overhead targets (throughput >= 0.9x, single-job latency
    <= 1.1x, history bytes <= 1.5x of each baseline) are reported as met or missed.
    It starts a Temporal dev server per --server mode, Redis (unless REDIS_URL is
    set) and the LLM simulator (zero latency) on 127.0.0.1, and stops them all
    at the end, on Ctrl-C too. Tables go to stdout, progress to stderr.

    overhead: Keel jobs vs bare Temporal workflows of the same 7-activity shape,
    on the SDK's default (sandboxed) worker and unsandboxed, like `keel worker`,
    with CPU per job of this process, the server and the simulator, and the
    throughput ratio of every round (its spread is the run's noise).
    long: one job of --iterations rounds with --output-kib tool outputs; PASS
    when no run's history exceeds 2 MB and the iteration limit was reached.
    scale: Keel jobs on 1, 2 and 3 `keel worker` processes (--fleet).
    cli: wall time of whole `keel` processes (--cli-runs each): --help, and
    status and list through `keel api` (KEEL_API_URL) and straight to Temporal;
    targets: --help <= 200 ms, status and list through the API <= 300 ms.
    api: the HTTP gateway at --api-clients concurrent clients: POST /v1/jobs
    until the job ID returns, and GET /v1/jobs/{id}; targets: submit p95
    <= 50 ms, status p95 <= 30 ms.
    stream: jobs with 300 ms model calls and a streamed answer, followed through
    GET /v1/jobs/{id}/events: time from submit to the first progress event, the
    first answer token and the end.
    priority: 1,000 batch jobs flood one worker while 40 interactive jobs
    arrive; each mode's first-task and first-activity wait (target: interactive
    p95 < 1 s), on one shared queue and on each mode's own; then tenant A's
    500 jobs against tenant B's 50, equal weights and B at 3.

    Reproduce: keel bench --server memory --jobs 50 --concurrency 8 --iterations 30
    or, full size, one section: keel bench --only overhead --json bench.json
    Exit code: 0, or 1 on an error or a long-job FAIL, 130 when interrupted.
    """
    from keel.workers.bench.config import BenchConfig
    from keel.workers.bench.run import run

    config = BenchConfig(
        servers=["sqlite", "memory"] if server is ServerMode.both else [server.value],
        sections=[s for s in SECTIONS if s in _csv(only, SECTIONS)],
        jobs=jobs,
        concurrency=concurrency,
        rounds=rounds,
        warmup=warmup,
        sequential=sequential,
        history_sample=history_sample,
        iterations=iterations,
        output_kib=output_kib,
        fleet=_fleet(fleet),
        cli_runs=cli_runs,
        api_clients=api_clients,
        api_requests=api_requests,
        transfer_rps=transfer_rps,
        json_path=json_path,
    )
    raise typer.Exit(run(config))
