"""What every ``keel bench`` subcommand (``cost``, ``sessions``) does around its measurement.

Tables go to stdout, progress and notices to stderr, every figure and setting to ``--json``.
Whatever happens (an error, Ctrl-C, SIGTERM), every process the benchmark started is stopped
before it exits (the measurement starts them under a ``stack.supervisor``); the temporary
directory is removed after a clean run and kept, with its path printed, after a failed one.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import shutil
import signal
import sys
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

from keel.workers.logs import configure_logging

__all__ = ["run_subcommand"]

Measure = Callable[[Path, Console], Awaitable[dict[str, Any]]]
"""Starts its servers under the state directory, measures, and returns the report's figures."""


def run_subcommand(
    name: str,
    settings: dict[str, Any],
    measure: Measure,
    print_tables: Callable[[Console, dict[str, Any]], None],
    json_path: Path | None,
    *,
    width: int = 120,
) -> int:
    """Run one benchmark subcommand to its end and report it.

    Args:
        name: The subcommand (``cost``), for the state directory's name.
        settings: Everything the run was asked for, written to the JSON first.
        measure: The measurement; SIGTERM cancels it like Ctrl-C.
        print_tables: Draws a complete report's tables on stdout.
        json_path: Where every figure and setting goes, if anywhere.
        width: Columns the tables are drawn in when stdout is not a terminal.

    Returns:
        The exit code: 0 once the measurement ended (targets are reported, not enforced), 1 on
        an error, 130 when interrupted.
    """
    out = Console() if sys.stdout.isatty() else Console(width=width)
    err = Console(stderr=True)
    configure_logging("WARNING")
    report: dict[str, Any] = {"settings": settings, "complete": False}
    state_dir = Path(tempfile.mkdtemp(prefix=f"keel-bench-{name}-"))
    code = 1
    started = time.perf_counter()
    try:
        report |= asyncio.run(_cancellable(measure(state_dir, err)))
        report["complete"] = True
        code = 0
    except (KeyboardInterrupt, asyncio.CancelledError):
        err.print("[yellow]interrupted[/yellow]: everything the benchmark started is stopped")
        code = 130
    except Exception as error:  # noqa: BLE001 - reported with where the logs are
        err.print(f"[red]error:[/red] {type(error).__name__}: {error}")
    finally:
        report["wall_s"] = time.perf_counter() - started
        if report["complete"]:
            print_tables(out, report)
        if json_path is not None:
            json_path.write_text(json.dumps(report, indent=2, default=str) + "\n")
            err.print(f"figures written to {json_path}")
        if code == 0:
            shutil.rmtree(state_dir, ignore_errors=True)
        else:
            err.print(f"logs and server files kept in {state_dir}")
    return code


def environment() -> dict[str, Any]:
    """Where a measurement ran, for its JSON settings: machine, versions, Redis, start time."""
    return {
        "redis": "REDIS_URL" if os.environ.get("REDIS_URL") else "started",
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "temporalio": version("temporalio"),
        "platform": platform.platform(),
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def progress_bar(err: Console, *, spinner: bool = False) -> Progress:
    """The progress display of a long measurement, on stderr and only on a terminal."""
    columns = [
        *([SpinnerColumn()] if spinner else []),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    ]
    return Progress(
        *columns,
        console=err,
        transient=True,
        disable=not err.is_terminal,
        redirect_stdout=False,
        redirect_stderr=False,
    )


async def _cancellable(measurement: Awaitable[dict[str, Any]]) -> dict[str, Any]:
    """Run ``measurement`` with SIGTERM cancelling it, as Ctrl-C does."""
    main = asyncio.current_task()
    if main is not None:
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main.cancel)
    return await measurement
