"""What every tool receives and how it fails: ``ToolContext``, ``ToolImpl`` and error helpers.

Not workflow code, though deterministic: plain data and constructors of ``ApplicationError``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from temporalio.exceptions import ApplicationError

from keel.activities.errors import TOOL_FAILED, TOOL_INPUT_INVALID, bounded

__all__ = [
    "PREVIEW_MAX_CHARS",
    "CacheScoped",
    "Previewable",
    "ToolContext",
    "ToolImpl",
    "invalid_input",
    "tool_failed",
]


@dataclass(frozen=True)
class ToolContext:
    """Who a tool runs for; passed to every tool implementation."""

    job_id: str
    tenant: str
    op_key: str
    """Durable identity of the call; side effects are keyed by it."""
    docs_dir: str | None = None
    """The job's document folder, if it has one."""
    cache: bool = True
    """False when the job opted out of Keel's caches; a tool that reads through a cache of its
    own (``search_docs``: the retrieval cache) passes it on."""


ToolImpl = Callable[[Any, ToolContext], Awaitable[str]]
"""A tool: (validated args model, context) -> output text. Raises ApplicationError to fail."""


@runtime_checkable
class CacheScoped(Protocol):
    """A read-only tool whose output depends on more than its arguments (``http_get``).

    The gateway calls ``cache_scope`` before it looks a result up in the tool-result cache
    (``activities/tools/result_cache.py``); a tool without it is keyed by its name, version
    and arguments alone.
    """

    async def cache_scope(self, args: Any, ctx: ToolContext) -> Mapping[str, Any]:
        """What besides the arguments decides this call's output, as JSON-serialisable parts.

        Args:
            args: The validated arguments.
            ctx: Who the call runs for.

        Returns:
            Parts added to the cache key.

        Raises:
            ApplicationError: When the tool would refuse the call: a cached result must never
                be served to a call the tool itself would refuse now.
        """
        ...


PREVIEW_MAX_CHARS = 600
"""Longest preview a destructive tool returns: it is shown in status and kept in job state."""


@runtime_checkable
class Previewable(Protocol):
    """A destructive tool (``ToolInfo.destructive``): it says what a call would do first.

    The act phase calls ``preview`` (the gateway's dry run); the tool itself, called later
    with the same arguments and op_key, is the commit. A preview changes nothing and may run
    any number of times, so it never needs the idempotency record.
    """

    async def preview(self, args: Any, ctx: ToolContext) -> str:
        """What the commit would do, for a person and the planner to read.

        Args:
            args: The validated arguments.
            ctx: Who the call runs for; ``ctx.op_key`` is the key the commit will carry.

        Returns:
            A description of at most ``PREVIEW_MAX_CHARS`` characters.

        Raises:
            ApplicationError: When the commit would be refused (an off-list host, say), so the
                planner learns it now rather than after the answer is verified.
        """
        ...


def invalid_input(message: str) -> ApplicationError:
    """A non-retryable ``TOOL_INPUT_INVALID``: the arguments cannot work, whatever the retry.

    Args:
        message: What is wrong with the input, for the planner to correct.

    Returns:
        The error to raise.
    """
    return ApplicationError(bounded(message), type=TOOL_INPUT_INVALID, non_retryable=True)


def tool_failed(message: str) -> ApplicationError:
    """A non-retryable ``TOOL_FAILED``: the tool ran and failed for a reason a retry cannot fix.

    Args:
        message: What went wrong, for the planner to read.

    Returns:
        The error to raise.
    """
    return ApplicationError(bounded(message), type=TOOL_FAILED, non_retryable=True)
