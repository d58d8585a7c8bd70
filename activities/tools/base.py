"""What every tool receives and how it fails: ``ToolContext``, ``ToolImpl`` and error helpers.

Not workflow code, though deterministic: plain data and constructors of ``ApplicationError``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from temporalio.exceptions import ApplicationError

from keel.activities.errors import TOOL_FAILED, TOOL_INPUT_INVALID

__all__ = ["ToolContext", "ToolImpl", "invalid_input", "tool_failed"]


@dataclass(frozen=True)
class ToolContext:
    """Who a tool runs for; passed to every tool implementation."""

    job_id: str
    tenant: str
    op_key: str
    """Durable identity of the call; side effects are keyed by it."""
    docs_dir: str | None = None
    """The job's document folder, if it has one."""


ToolImpl = Callable[[Any, ToolContext], Awaitable[str]]
"""A tool: (validated args model, context) -> output text. Raises ApplicationError to fail."""


def invalid_input(message: str) -> ApplicationError:
    """A non-retryable ``TOOL_INPUT_INVALID``: the arguments cannot work, whatever the retry.

    Args:
        message: What is wrong with the input, for the planner to correct.

    Returns:
        The error to raise.
    """
    return ApplicationError(message, type=TOOL_INPUT_INVALID, non_retryable=True)


def tool_failed(message: str) -> ApplicationError:
    """A non-retryable ``TOOL_FAILED``: the tool ran and failed for a reason a retry cannot fix.

    Args:
        message: What went wrong, for the planner to read.

    Returns:
        The error to raise.
    """
    return ApplicationError(message, type=TOOL_FAILED, non_retryable=True)
