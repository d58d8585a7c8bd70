"""The errors the Keel client raises; callers never have to catch a Temporal exception.

The façade (``client.jobs.AgentJobs``) maps Temporal's ``RPCError``,
``WorkflowFailureError`` and ``WorkflowUpdateFailedError`` onto this tree, by status code
and by the failure's ``ApplicationError.type``:

* AgentJobError
  x JobNotFound - no job has this ID.
  x JobFailed - the job ended FAILED (``cause_type`` such as "LLMAuthFailed").
  x InputRejected - the job refused an answer (no question pending, or it has ended).
  x InvalidJobRequest - a request is malformed; ``field`` names the culprit.
  x JobTimeout - waiting for a job's result took longer than the caller allowed.
  x ConnectionFailed - the Temporal server cannot be reached.

Budget exhaustion and cancellation are outcomes (``JobResult.outcome``), not errors.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pydantic import ValidationError

    from keel.workflows.types import JobResult

__all__ = [
    "AgentJobError",
    "ConnectionFailed",
    "InputRejected",
    "InvalidJobRequest",
    "JobFailed",
    "JobNotFound",
    "JobTimeout",
]


class AgentJobError(Exception):
    """Base class of every error the Keel client raises."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
        """Human-readable, one line."""


class JobNotFound(AgentJobError):
    """No job (workflow execution) exists with this ID in the namespace."""

    def __init__(self, job_id: str) -> None:
        super().__init__(f"job {job_id} not found")
        self.job_id = job_id
        """The ID that was looked up."""


class JobFailed(AgentJobError):
    """The job ended in failure instead of returning a ``JobResult``.

    ``cause_type`` is the ``ApplicationError.type`` the workflow failed with (for example
    ``"LLMAuthFailed"`` or ``"BadModelOutput"``), or ``"Cancelled"``, ``"Terminated"`` or
    ``"TimedOut"`` when Temporal ended the execution before the workflow could report an
    outcome itself.
    """

    def __init__(
        self, job_id: str, cause_type: str, message: str, result: JobResult | None = None
    ) -> None:
        super().__init__(f"job {job_id} failed ({cause_type}): {message}")
        self.job_id = job_id
        """The failed job."""
        self.cause_type = cause_type
        """Machine-readable reason; compare against ``activities.errors`` constants."""
        self.reason = message
        """The failure's own message, without the job ID prefix."""
        self.result = result
        """The job's own ``JobResult`` (outcome ``failed``, error, usage, partial answer) when
        the workflow attached it to its failure; None when Temporal ended the job."""


class InputRejected(AgentJobError):
    """The job refused human input: no question is pending, or the job has already ended."""

    def __init__(self, job_id: str, reason: str) -> None:
        super().__init__(f"job {job_id} rejected the input: {reason}")
        self.job_id = job_id
        """The job the input was sent to."""
        self.reason = reason
        """Why the workflow's update validator (or the server) refused it."""


class InvalidJobRequest(AgentJobError):
    """A request was malformed and nothing was started.

    ``field`` is a dotted path into the request (``"budget.max_steps"``, ``"tools"``), so the
    caller can point at the exact input that is wrong.
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        """Dotted path of the offending field; ``"request"`` when the whole request is wrong."""
        self.reason = message
        """What is wrong with it."""

    @classmethod
    def from_validation_error(cls, err: ValidationError) -> InvalidJobRequest:
        """Build from a pydantic ``ValidationError``, naming its first failing field.

        Args:
            err: The error raised while validating a request model.

        Returns:
            An ``InvalidJobRequest`` whose ``field`` is the dotted location of the first error
            (list indices as ``tools[0]``) and whose message notes how many more there are.
        """
        errors = err.errors(include_url=False)
        if not errors:
            return cls("request", str(err))
        first = errors[0]
        # Errors raised by our own validators arrive as "Value error, <text>"; keep the text.
        message = str(first["msg"]).removeprefix("Value error, ")
        if len(errors) > 1:
            message += f" (and {len(errors) - 1} more error{'s' if len(errors) > 2 else ''})"
        return cls(dotted_path(first["loc"]), message)


class JobTimeout(AgentJobError):
    """The job did not finish within the time the caller was willing to wait.

    The job itself keeps running; only the wait ended.
    """

    def __init__(self, job_id: str, timeout: float) -> None:
        super().__init__(f"job {job_id} did not finish within {timeout:g}s; it is still running")
        self.job_id = job_id
        """The job that is still running."""
        self.timeout = timeout
        """Seconds waited."""


class ConnectionFailed(AgentJobError):
    """The Temporal server at ``address`` could not be reached."""

    def __init__(self, address: str, detail: str = "") -> None:
        hint = "start a local server with `keel dev`, or set TEMPORAL_ADDRESS"
        suffix = f" ({detail})" if detail else ""
        super().__init__(f"cannot reach Temporal at {address}{suffix}; {hint}")
        self.address = address
        """The ``host:port`` that was tried."""


def dotted_path(loc: tuple[int | str, ...]) -> str:
    """Render a pydantic error location as ``budget.max_steps`` or ``tools[0]``.

    Args:
        loc: The ``loc`` tuple of one pydantic error.

    Returns:
        The dotted path, or ``"request"`` for an error on the whole model.
    """
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else str(part)
    return path or "request"
