"""The ``keel bench`` commands: their options, validated into configs, and nothing more.

``bench_app`` is a group: run on its own (``keel bench --only overhead``) its callback, ``bench``,
runs the classic sections; ``keel bench cost`` runs the economics benchmark (issue 14).

The ``keel`` command line imports this module to build its help, so it imports only typer and
the standard library; the machinery (``workers.bench.run``, ``workers.bench.cost_main`` and what
they import) is imported when a command runs.
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

ServerOption = Annotated[
    ServerMode, typer.Option(help="Temporal dev server persistence to run against.")
]
"""``--server``, declared once for the commands that start dev servers (defaults differ)."""

JsonOption = Annotated[
    Path | None, typer.Option("--json", help="Also write every figure and setting here.")
]
"""``--json`` of the subcommands: where every figure and setting is written."""


def _servers(server: ServerMode) -> list[str]:
    """The persistence modes ``--server`` asks for, in the order they run."""
    return ["sqlite", "memory"] if server is ServerMode.both else [server.value]


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
    ctx: typer.Context,
    server: ServerOption = ServerMode.both,
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

    `keel bench cost` (its own options, see its --help) measures Keel's economics instead.
    """
    if ctx.invoked_subcommand is not None:
        return  # a subcommand (cost) runs instead of the sections
    from keel.workers.bench.config import BenchConfig
    from keel.workers.bench.run import run

    config = BenchConfig(
        servers=_servers(server),
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


def cost(
    jobs: Annotated[int, typer.Option(min=1, max=100_000, help="Jobs in the workload.")] = 300,
    tenants: Annotated[
        int, typer.Option(min=1, max=100, help="Tenants taking turns submitting them.")
    ] = 5,
    seed: Annotated[int, typer.Option(help="Seeds the workload and the simulator.")] = 0,
    sim_latency_ms: Annotated[
        float,
        typer.Option(
            min=0,
            help="Delay the simulator adds to every model and embeddings call (400 ms: a fast "
            "hosted model's short reply; real ones take longer).",
        ),
    ] = 400.0,
    concurrency: Annotated[int, typer.Option(min=1, max=1000, help="Jobs in flight at most.")] = 16,
    ablations: Annotated[
        bool,
        typer.Option(
            "--ablations/--no-ablations",
            help="Also run Keel with each lever removed, and with the verifier on the job's tier.",
        ),
    ] = True,
    json_path: JsonOption = None,
) -> None:
    """Measure what Keel's router, escalation, caches and compression save, honestly.

    One seeded workload (--jobs over --tenants, goals drawn per tenant from a pool with
    Zipf-distributed repetition, exact and near repeats, a mix of difficulties, calculator,
    retrieval and long multi-iteration goals) runs against the LLM simulator with its quality
    model, at --sim-latency-ms per call: first always-deep with no cache, no router and no
    compression (the baseline), then on Keel's defaults, then (--ablations) once per lever
    removed and once with the verifier on the deep tier. Every job is graded against the
    simulator's ground truth.

    Prints per run: cost and tokens per job, correct and verified rates, p50/p95 latency, cost
    by tier, cache hits and misses; then PASS or MISS for each target: cost per job <= 0.3x
    the baseline's, correct rate at most 1 point below it, zero cross-tenant cache hits, a
    fully cached job >= 10x faster than its first run; then the saving credited to each lever.
    It starts its own Temporal dev server (in memory), the simulator and Redis (unless
    REDIS_URL is set) on 127.0.0.1 and stops them at the end.

    Reproduce: keel bench cost --json cost.json

    Exit code: 0 once every run ended (targets are reported, not enforced), 1 on an error,
    130 when interrupted.
    """
    from keel.workers.bench.cost_main import CostConfig, run_cost

    config = CostConfig(
        jobs=jobs,
        tenants=tenants,
        seed=seed,
        sim_latency_ms=sim_latency_ms,
        concurrency=concurrency,
        ablations=ablations,
        json_path=json_path,
    )
    raise typer.Exit(run_cost(config))


def sessions(
    turns: Annotated[
        int, typer.Option(min=5, max=90_000, help="Turns of the scripted conversation.")
    ] = 500,
    overhead_runs: Annotated[
        int, typer.Option(min=1, max=10_000, help="Timed standalone jobs and session turns each.")
    ] = 30,
    overhead_latency_ms: Annotated[
        float,
        typer.Option(min=0, help="Delay of every model call in the overhead runs (ms)."),
    ] = 100.0,
    readers: Annotated[
        int, typer.Option(min=1, max=100, help="Status readers of each kind while turns run.")
    ] = 4,
    read_seconds: Annotated[
        float, typer.Option(min=1, max=3600, help="How long the status readers read.")
    ] = 15.0,
    json_path: JsonOption = None,
) -> None:
    """Measure what a session costs per turn, and that a long one keeps its context flat.

    overhead: the same small job (plan, a calculator call, answer, verify) run
    --overhead-runs times as standalone jobs and as turns of one session, alternating, one at
    a time, every model call taking --overhead-latency-ms; submit-to-result p50 and p95 and
    the ratio. context: a scripted conversation of --turns turns on a zero-latency simulator;
    the prompt tokens each turn's job sent (read back from the simulator, counted with the
    model's tokenizer) at turns 5, 50, 500 and the last; target: the last within 1.2x of turn
    5, printed PASS or MISS. history: events and bytes of each run of the session's workflow
    (it continues as new on Temporal's default suggestion). reads: while turns run,
    --readers tasks call the get_session query and as many read a Redis snapshot of the same
    status, for --read-seconds; p50 and p95 of each and which is faster.

    It starts its own Temporal dev server (in memory), two simulators and Redis (unless
    REDIS_URL is set) on 127.0.0.1 and stops them at the end.

    Reproduce: keel bench sessions --json sessions.json

    Exit code: 0 once every section ended (the target is reported, not enforced), 1 on an
    error, 130 when interrupted.
    """
    from keel.workers.bench.sessions_main import SessionsConfig, run_sessions

    config = SessionsConfig(
        turns=turns,
        overhead_runs=overhead_runs,
        overhead_latency_ms=overhead_latency_ms,
        readers=readers,
        read_seconds=read_seconds,
        json_path=json_path,
    )
    raise typer.Exit(run_sessions(config))


def load(
    jobs: Annotated[int, typer.Option(min=1, max=100_000, help="Jobs in each run.")] = 1000,
    ramp_seconds: Annotated[
        float, typer.Option(min=0, help="The jobs start evenly spread over this many seconds.")
    ] = 60.0,
    latency_min: Annotated[
        float, typer.Option(min=0, help="Shortest model call, in seconds (uniform draw).")
    ] = 45.0,
    latency_max: Annotated[
        float, typer.Option(min=0, help="Longest model call, in seconds (uniform draw).")
    ] = 75.0,
    workers: Annotated[
        str, typer.Option(help="Worker process counts: each runs the whole stream.")
    ] = "1,3",
    single_jobs: Annotated[
        int, typer.Option(min=1, max=100, help="Jobs of each kind run alone for one job's time.")
    ] = 3,
    server: ServerOption = ServerMode.sqlite,
    seed: Annotated[int, typer.Option(help="Seeds the simulator's latency draws.")] = 0,
    json_path: JsonOption = None,
) -> None:
    """Hold 1,000 jobs in flight at real model latency, beside a bare Temporal floor.

    Every model call takes --latency-min to --latency-max seconds (the simulator's, and the
    floor's sleeps). --jobs jobs (plan, a calculator call, answer, verify) start as a stream
    over --ramp-seconds, on fresh `keel worker` processes of each --workers size, then the
    same stream of bare Temporal workflows of that shape (plain activities that sleep) on as
    many floor worker processes with the same slot, cache and poller settings. A few jobs of
    each kind first run alone for one job's latency.

    Prints per run: makespan, p50/p95 latency against one job's, jobs/s against the ideal
    (jobs / (ramp + one job's latency)), the most jobs in flight, each worker's peak RSS,
    CPU per job of the workers and of the Temporal server, workflow tasks and history events
    per job, workflow task timeouts, workflow cache evictions and misses, and workflow and
    activity tasks' schedule-to-start. Targets, PASS or MISS: makespan and p95 within 1.1x
    the floor's, worker RSS < 1 GiB, no workflow task timeouts, CPU per job within 1.3x the
    floor's, and one worker holding as many in flight as the floor's within 1.1x.

    It starts Redis (unless REDIS_URL is set), the simulator and, per --server mode, a
    Temporal dev server as `keel dev` does, on 127.0.0.1, and stops them all at the end.

    Reproduce (about 25 minutes): keel bench load --json load.json
    Small: keel bench load --jobs 60 --latency-min 3 --latency-max 5 --ramp-seconds 5 --workers 1

    Exit code: 0 once every run ended (targets are reported, not enforced), 1 on an error,
    130 when interrupted.
    """
    if latency_max < latency_min:
        raise typer.BadParameter("--latency-max must be at least --latency-min")
    from keel.workers.bench.load_main import LoadConfig, run_load

    config = LoadConfig(
        jobs=jobs,
        ramp_seconds=ramp_seconds,
        latency_min=latency_min,
        latency_max=latency_max,
        workers=_fleet(workers),
        single_jobs=single_jobs,
        servers=_servers(server),
        seed=seed,
        json_path=json_path,
    )
    raise typer.Exit(run_load(config))


bench_app = typer.Typer(
    name="bench",
    invoke_without_command=True,
    no_args_is_help=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
"""``keel bench``: the classic sections when run alone, ``keel bench cost`` for economics."""
bench_app.callback(invoke_without_command=True)(bench)
bench_app.command("cost")(cost)
bench_app.command("sessions")(sessions)
bench_app.command("load")(load)
