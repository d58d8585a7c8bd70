"""What every job command shares: options, the error-to-exit-code mapping, JSON output.

Imports only typer and the standard library at module level: ``keel --help`` loads this module,
and must not pay for the Temporal SDK, pydantic models or rich rendering.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, TypeVar

import typer

if TYPE_CHECKING:
    from keel.client.jobs import AgentJobs

T = TypeVar("T")

EXIT_INVALID = 2
"""Exit code for input the command refused (the same code click uses for usage errors)."""
EXIT_FAILED = 1
"""Exit code for every other error: job failed, not found, server unreachable."""

TASK_QUEUE_ENV = "KEEL_TASK_QUEUE"
"""Environment variable pinning the task queue jobs start on (default: chosen by mode)."""

API_KEY_ENV = "KEEL_API_KEY"
"""The API key the commands send to Keel's HTTP API (``keel keys create``; never logged)."""
API_URL_ENV = "KEEL_API_URL"
"""Base URL of Keel's HTTP API (``http://127.0.0.1:8235``); unset, commands go to Temporal."""

JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")]
JobArg = Annotated[str, typer.Argument(metavar="JOB", help="Job ID (agent-job-...).")]


def fail(message: str, code: int) -> NoReturn:
    """Print one ``error: ...`` line on stderr and exit with ``code``."""
    sys.stderr.write(f"error: {' '.join(message.split())}\n")
    raise typer.Exit(code)


def run(main: Callable[[], Awaitable[T]]) -> T:
    """Run one command's coroutine; errors become one message and an exit code (``guard``)."""
    import asyncio

    async def call() -> T:
        return await main()

    return guard(lambda: asyncio.run(call()))


def guard(main: Callable[[], T]) -> T:
    """Call ``main``; the only place errors become messages and exit codes."""
    from keel.client.errors import AgentJobError, InvalidJobRequest

    try:
        return main()
    except InvalidJobRequest as err:
        failure = (err.message, EXIT_INVALID)
    except AgentJobError as err:
        failure = (err.message, EXIT_FAILED)
    except KeyboardInterrupt:
        failure = ("interrupted", 130)
    except Exception as err:
        # A pydantic ValidationError is the caller's input. pydantic is not imported for it:
        # a command that never loaded pydantic (the API fast path) cannot raise one.
        pydantic = sys.modules.get("pydantic")
        if pydantic is None or not isinstance(err, pydantic.ValidationError):
            raise
        failure = (InvalidJobRequest.from_validation_error(err).message, EXIT_INVALID)
    # Exit outside the except blocks: an exception chained to the exit would keep the command's
    # frames, and with them the Temporal client, alive until interpreter shutdown, where
    # dropping the SDK's native client can abort the process.
    fail(*failure)


def api_url() -> str | None:
    """The API's base URL without a trailing slash, or None when commands go to Temporal."""
    url = os.environ.get(API_URL_ENV, "").strip().rstrip("/")
    return url or None


def emit_json(doc: Any) -> None:
    """Print one JSON document on stdout."""
    typer.echo(json.dumps(doc, ensure_ascii=False))


async def jobs() -> AgentJobs:
    """An ``AgentJobs`` on a client connected from the environment.

    ``KEEL_TASK_QUEUE`` (the variable the worker settings read) pins one queue for every job;
    unset, each job's mode picks keel-interactive or keel-batch.
    """
    from keel.client.connect import connect
    from keel.client.jobs import AgentJobs

    return AgentJobs(await connect(), task_queue=os.environ.get(TASK_QUEUE_ENV) or None)
