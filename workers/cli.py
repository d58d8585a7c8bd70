"""The ``keel`` command's composition root: the one place its app is built.

It mounts the job commands that callers use (``keel.client.cli.COMMANDS``: submit, status,
watch, result, answer, cancel, list, fleet), the commands that start processes
(``keel.workers.commands.COMMANDS``: worker, sim-llm, codec-server, dev, demo) and the
benchmark. Every command module imports only typer, rich's console and the standard library at
module level, so ``keel --help`` and ``keel status`` pay only for what they run.
"""

from __future__ import annotations

import os
import sys

import typer

from keel.client.cli import COMMANDS as JOB_COMMANDS
from keel.client.cli.keys import keys_app
from keel.client.cli.limits import limits_app
from keel.workers.bench import bench_app
from keel.workers.commands import COMMANDS as PROCESS_COMMANDS

__all__ = ["app", "build_app", "main"]


def build_app() -> typer.Typer:
    """The ``keel`` app: job commands first, then process commands, then the benchmark."""
    built = typer.Typer(
        no_args_is_help=True,
        pretty_exceptions_enable=False,
        # Plain help, formatted by click: rich's help panels cost every `keel --help` ~50 ms of
        # imports (markdown, tracebacks); commands still use rich for what they print.
        rich_markup_mode=None,
        help="Keel: durable AI-agent jobs on Temporal.",
    )
    for name, command in [*JOB_COMMANDS, *PROCESS_COMMANDS]:
        built.command(name)(command)
    # A group: `keel bench [options]` runs the classic sections, `keel bench cost` economics.
    built.add_typer(bench_app, name="bench")
    built.add_typer(keys_app, name="keys")
    built.add_typer(limits_app, name="limits")
    return built


app = build_app()


def _configure_tracing() -> None:
    """Export spans over OTLP when the standard ``OTEL_*`` variables ask for it."""
    from keel.client.telemetry import tracing_configured

    if tracing_configured():
        from keel.workers.tracing import configure_tracing

        worker = len(sys.argv) > 1 and sys.argv[1] == "worker"
        configure_tracing("keel-worker" if worker else "keel-cli")


def main() -> None:
    """Console-script entry point.

    Exits with ``os._exit`` once the command has finished and flushed its output: letting the
    interpreter finalise while the Temporal SDK's native runtime threads are still alive can
    abort the process (SIGABRT) after the command already succeeded or failed cleanly. Spans
    a command recorded are flushed first.
    """
    _configure_tracing()
    code = 0
    try:
        app()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    _flush_spans()
    sys.stdout.flush()
    sys.stderr.flush()
    if "logging" in sys.modules:  # commands that log imported it; --help never does
        sys.modules["logging"].shutdown()
    os._exit(code)


def _flush_spans() -> None:
    if "opentelemetry.sdk.trace" not in sys.modules:
        return
    from opentelemetry import trace

    provider = trace.get_tracer_provider()
    shutdown = getattr(provider, "shutdown", None)
    if shutdown is not None:
        shutdown()


if __name__ == "__main__":
    main()
