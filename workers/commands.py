"""The ``keel`` commands that start processes: worker, sim-llm, codec-server, dev, demo.

They live with the workers because they run them; ``keel.workers.cli`` mounts them beside the
job commands. At import this module loads typer, rich's console and the standard library only;
each command imports the machinery it starts when it runs.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from rich.console import Console

    # imported where used: the dev stack is not needed by most commands
    from keel.workers.devstack import DevStack


@functools.cache
def _console() -> Console:
    """The commands' console on stderr, built on first use.

    Rich costs about 30 ms to import, which ``keel status`` and ``keel --help`` need not pay.
    """
    from rich.console import Console

    return Console(stderr=True, soft_wrap=True)


def __getattr__(name: str) -> object:
    if name == "console":  # the module's console, for callers (and tests) that capture it
        return _console()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


DEMO_GOAL = (
    "What is 17 * (23 + 4)? Use the calculator, use search_docs to find how Keel budgets a "
    "job, and record what you found with write_note."
)


def worker(
    task_queue: Annotated[
        list[str] | None,
        typer.Option(help="Task queue to poll (repeat; default: keel-interactive, keel-batch)."),
    ] = None,
    max_concurrent_activities: Annotated[int | None, typer.Option(min=1)] = None,
    max_concurrent_workflow_tasks: Annotated[int | None, typer.Option(min=1)] = None,
    resource_tuner: Annotated[
        bool, typer.Option(help="Size slots by CPU and memory (Temporal's resource tuner).")
    ] = False,
    identity: Annotated[str | None, typer.Option(help="Worker identity shown in Temporal.")] = None,
    metrics_port: Annotated[
        int | None, typer.Option(help="Serve Prometheus metrics on this port.")
    ] = None,
    graceful_shutdown_seconds: Annotated[
        float | None, typer.Option(help="On SIGTERM, time running activities get to finish.")
    ] = None,
    build_id: Annotated[
        str | None, typer.Option(help="Build ID; with --deployment-name enables versioning.")
    ] = None,
    deployment_name: Annotated[str | None, typer.Option(help="Worker Deployment name.")] = None,
    sandbox: Annotated[
        bool | None,
        typer.Option(
            "--sandbox/--no-sandbox",
            help="Run workflows in Temporal's sandbox (default off; KEEL_WORKFLOW_SANDBOX).",
        ),
    ] = None,
) -> None:
    """Run a worker until SIGTERM or Ctrl-C; start as many as you like, anywhere."""
    from keel.workers.logs import configure_logging
    from keel.workers.main import RedisUnavailable, run_event_loop, run_worker
    from keel.workers.settings import WorkerSettings

    configure_logging()
    given = {
        "task_queues": ",".join(task_queue) if task_queue else None,
        "max_concurrent_activities": max_concurrent_activities,
        "max_concurrent_workflow_tasks": max_concurrent_workflow_tasks,
        "resource_tuner": resource_tuner or None,
        "identity": identity,
        "metrics_port": metrics_port,
        "graceful_shutdown_seconds": graceful_shutdown_seconds,
        "build_id": build_id,
        "deployment_name": deployment_name,
        "workflow_sandbox": sandbox,
    }
    overrides = {k: v for k, v in given.items() if v is not None}
    try:
        settings = WorkerSettings(**overrides)  # type: ignore[arg-type]
    except ValueError as err:
        _console().print(f"[red]error:[/red] {err}")
        raise typer.Exit(2) from None
    from keel.client.errors import ConnectionFailed

    try:
        run_event_loop(run_worker(settings), use_uvloop=settings.uvloop)
    except ConnectionFailed as err:
        _console().print(f"[red]error:[/red] {err.message}")
        raise typer.Exit(1) from None
    except RedisUnavailable as err:
        _console().print(f"[red]error:[/red] {err}")
        raise typer.Exit(1) from None


def sim_llm(
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8089,
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    latency_ms: Annotated[float, typer.Option(min=0)] = 0.0,
    latency_jitter_ms: Annotated[float, typer.Option(min=0)] = 0.0,
    token_delay_ms: Annotated[
        float, typer.Option(min=0, help="Delay before each piece of a streamed reply.")
    ] = 0.0,
    fault_rate: Annotated[float, typer.Option(min=0, max=1)] = 0.0,
    fault_kinds: Annotated[
        str, typer.Option(help="Comma list: 500,503,429,timeout,malformed")
    ] = "503",
    fail_first_verify: Annotated[
        bool, typer.Option(help="Fail verification on iteration 0.")
    ] = False,
    seed: Annotated[int, typer.Option()] = 0,
    router_accuracy: Annotated[
        float, typer.Option(min=0, max=1, help="Chance a router call names the right tier.")
    ] = 0.8,
    difficulty_weights: Annotated[
        str,
        typer.Option(help="Comma list: chances of goal difficulty 1,2,3... (empty: all 1)."),
    ] = "",
) -> None:
    """Serve the OpenAI-compatible LLM simulator (chat completions, embeddings, models)."""
    from keel.workers.logs import configure_logging
    from keel.workers.sim import SimConfig, serve

    configure_logging()
    config = SimConfig(
        latency_ms=latency_ms,
        latency_jitter_ms=latency_jitter_ms,
        token_delay_ms=token_delay_ms,
        fault_rate=fault_rate,
        fault_kinds=[k.strip() for k in fault_kinds.split(",") if k.strip()],  # type: ignore[misc]
        fail_first_verify=fail_first_verify,
        seed=seed,
        router_accuracy=router_accuracy,
        difficulty_weights=[float(w) for w in difficulty_weights.split(",") if w.strip()] or None,
    )
    serve(config, host=host, port=port)


def codec_server(
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8234,
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    cors_origin: Annotated[
        list[str] | None,
        typer.Option(help="Origin of a Temporal Web UI that may call it (repeat)."),
    ] = None,
    max_body_bytes: Annotated[
        int, typer.Option(min=1, help="Largest request body read (bytes).")
    ] = 8 * 1024 * 1024,
) -> None:
    """Serve Keel's payload codec for the Temporal Web UI and ``temporal --codec-endpoint``.

    Keys come from KEEL_ENCRYPTION_KEYS or KEEL_ENCRYPTION_KEYS_FILE, as for the workers; with
    keys, callers must send ``Authorization: Bearer $KEEL_CODEC_TOKEN``.
    """
    from keel.activities.converter import codec_from_env
    from keel.client.codec_server import TOKEN_ENV, UI_ORIGINS, create_app
    from keel.workers.logs import configure_logging
    from keel.workers.serving import serve_app

    configure_logging()
    origins = cors_origin or list(UI_ORIGINS)
    try:
        app = create_app(
            origins,
            codec=codec_from_env(),
            token=os.environ.get(TOKEN_ENV) or None,
            max_body_bytes=max_body_bytes,
        )
    except ValueError as err:
        _console().print(f"[red]keel codec-server: {err}[/red]")
        raise typer.Exit(2) from None
    _console().print(f"Codec server on http://{host}:{port} for {', '.join(origins)}")
    serve_app(app, host, port)


API_QUEUE_ENV = "KEEL_API_TASK_QUEUE"
"""Set by ``keel api --task-queue`` for its processes: the queue every job is pinned to."""


def api_app() -> Any:
    """The HTTP API app of one ``keel api`` process (uvicorn's factory under ``--workers``)."""
    from keel.client.api import create_app
    from keel.workers.logs import configure_logging

    configure_logging()
    return create_app(task_queue=os.environ.get(API_QUEUE_ENV) or None)


def api(
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8235,
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    workers: Annotated[
        int,
        typer.Option(
            min=1,
            max=64,
            help="API processes sharing the port (rate limits stay exact across them).",
        ),
    ] = 1,
    task_queue: Annotated[
        str | None,
        typer.Option(help="Pin every job to this queue; by default each job's mode picks."),
    ] = None,
) -> None:
    """Serve Keel's HTTP API (API keys per tenant: keel keys create)."""
    if task_queue:
        os.environ[API_QUEUE_ENV] = task_queue
    plural = f" ({workers} processes)" if workers > 1 else ""
    _console().print(f"Keel API on http://{host}:{port}{plural}")
    if workers == 1:
        from keel.workers.serving import serve_app

        serve_app(api_app(), host, port, lifespan=True)
        return
    _serve_api_processes(host, port, workers)


def _serve_api_processes(host: str, port: int, workers: int) -> None:
    """Run ``workers`` API processes on one port (uvicorn's supervisor) until signalled.

    Each process keeps its own Temporal and Redis clients; rate limits and quotas live in
    Redis, so they hold exactly across them. Their Prometheus metrics are shared through a
    fresh directory (prometheus_client's multiprocess mode), so any process's ``/metrics``
    reports the sum; a ``PROMETHEUS_MULTIPROC_DIR`` set by the caller is used as it is, and
    the caller then empties it between runs.
    """
    import tempfile

    import uvicorn

    from keel.client.api.metrics import MULTIPROC_ENV

    with contextlib.ExitStack() as stack:
        if not os.environ.get(MULTIPROC_ENV):
            metrics_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="keel-api-"))
            os.environ[MULTIPROC_ENV] = metrics_dir
        uvicorn.run(
            "keel.workers.commands:api_app",
            factory=True,
            host=host,
            port=port,
            workers=workers,
            lifespan="on",
            http="httptools",  # C parser: a third less CPU per request than h11
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=2,
        )


def _stack(
    state_dir: Path,
    temporal_port: int,
    ui_port: int,
    redis_port: int,
    sim_port: int,
    codec_port: int,
    api_port: int,
) -> DevStack:
    from keel.workers.devstack import DevStack

    return DevStack(
        state_dir=state_dir,
        temporal_port=temporal_port,
        ui_port=ui_port,
        redis_port=redis_port,
        sim_port=sim_port,
        codec_port=codec_port,
        api_port=api_port,
        redis_url=os.environ.get("REDIS_URL"),
        use_simulator=not os.environ.get("OPENAI_API_KEY"),
        notify=lambda line: _console().print(line, style="yellow", markup=False),
    )


StateDir = Annotated[Path, typer.Option(help="Where Temporal's SQLite file and Redis's AOF live.")]
Port = Annotated[int, typer.Option(min=1, max=65535)]


def dev(
    state_dir: StateDir = Path(".keel"),
    temporal_port: Port = 7233,
    ui_port: Port = 8233,
    redis_port: Port = 6379,
    sim_port: Port = 8089,
    codec_port: Port = 8234,
    api_port: Port = 8235,
) -> None:
    """Run the embedded stack (Temporal, Redis, simulator, codec, API, worker) until Ctrl-C."""
    ports = (temporal_port, ui_port, redis_port, sim_port, codec_port, api_port)
    stack = _stack(state_dir, *ports)
    stopping = False

    def _stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    _start(stack)
    while not stopping:
        if (dead := stack.check()) is not None:
            _console().print(f"[red]{dead} exited; stopping[/red] (logs in {state_dir / 'logs'})")
            break
        time.sleep(0.5)
    _console().print("stopping…")
    stack.stop()


def demo(
    state_dir: StateDir = Path(".keel"),
    temporal_port: Port = 7233,
    ui_port: Port = 8233,
    redis_port: Port = 6379,
    sim_port: Port = 8089,
    codec_port: Port = 8234,
    api_port: Port = 8235,
    stay: Annotated[
        bool | None,
        typer.Option(help="Keep the stack up after the job for the UI (default: on a terminal)."),
    ] = None,
) -> None:
    """Start the embedded stack, run Keel's main job end to end, and show it live."""
    from keel.client.cli.commands import watch
    from keel.workers.supervisor import port_open

    ports = (temporal_port, ui_port, redis_port, sim_port, codec_port, api_port)
    stack = _stack(state_dir, *ports)
    reuse = port_open(temporal_port)
    if reuse:
        _console().print(f"Using the Temporal server already on port {temporal_port}.")
    else:
        with _console().status("Starting Temporal, Redis, the LLM simulator and a worker…"):
            _start(stack)
    os.environ.update(stack.env())
    try:
        job_id = _submit_demo()
        _console().print(f"Job [bold]{job_id}[/bold]")
        _console().print(f"Inspect it: {stack.ui_url}/namespaces/default/workflows/{job_id}")
        watch(job_id)
        if stay if stay is not None else (sys.stdin.isatty() and not reuse):
            _console().print("The stack stays up for the UI; Ctrl-C stops it.")
            with contextlib.suppress(KeyboardInterrupt):
                while stack.check() is None:
                    time.sleep(0.5)
    finally:
        if not reuse:
            stack.stop()


def _submit_demo() -> str:
    """Submit the demo job through ``AgentJobs``, as any caller would."""
    from keel.client._validation import validate_request
    from keel.client.cli._common import jobs
    from keel.client.cli._common import run as run_command

    request = validate_request(
        {
            "goal": DEMO_GOAL,
            "tools": ["calculator", "search_docs", "write_note"],
            "docs_dir": "corpus:keel-docs",  # keel dev's shared corpus: Keel's own docs
        }
    )

    async def start() -> str:
        return await (await jobs()).start(request)

    return run_command(start)


def _start(stack: DevStack) -> None:
    """Start the stack and print where its parts listen, or exit 1 with why it could not."""
    try:
        stack.start()
    except (RuntimeError, FileNotFoundError) as err:
        _console().print(f"[red]error:[/red] {err}")
        raise typer.Exit(1) from None
    _print_stack(stack)


def _print_stack(stack: DevStack) -> None:
    from keel.workers.logs import loggable_url

    env = stack.env()
    _console().print(f"[bold]Temporal[/bold]  grpc {stack.temporal_address}   UI {stack.ui_url}")
    _console().print(f"[bold]Redis[/bold]     {loggable_url(env['REDIS_URL'])}")
    llm = env.get("OPENAI_BASE_URL") or os.environ.get("OPENAI_BASE_URL", "OpenAI")
    _console().print(f"[bold]LLM[/bold]       {llm}")
    _console().print(f"[bold]Codec[/bold]     {stack.codec_url} (the UI decodes payloads with it)")
    _console().print(
        f"[bold]API[/bold]       {stack.api_url} (keel status and keel list read through it)"
    )
    if stack.api_key:
        saved = stack.state_dir / "dev-api-key"
        _console().print(
            f"[bold]API key[/bold]   {stack.api_key} (development, operator; in {saved})"
        )
        _console().print(
            f"  curl -H 'Authorization: Bearer {stack.api_key}' {stack.api_url}/v1/jobs",
            markup=False,
        )
    # A REDIS_URL of the caller's own is already in their environment and may hold a password.
    exports = {k: v for k, v in env.items() if k != "REDIS_URL" or stack.redis_url is None}
    _console().print(
        "In another shell: " + "; ".join(f"export {k}={v}" for k, v in exports.items())
    )


COMMANDS: list[tuple[str, Any]] = [
    ("worker", worker),
    ("sim-llm", sim_llm),
    ("codec-server", codec_server),
    ("api", api),
    ("dev", dev),
    ("demo", demo),
]
"""The process commands as (name, function), mounted by ``keel.workers.cli``."""
