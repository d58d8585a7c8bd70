"""The Keel client: the only package callers import to run agent jobs.

Example:
    >>> from keel.client import AgentJobs, JobRequest, connect
    >>> jobs = AgentJobs(await connect())
    >>> job_id = await jobs.start(JobRequest(goal="What is 2**10?"), request_key="order-42")
    >>> result = await jobs.result(job_id)
"""

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from keel.client._listing import JobSummary
    from keel.client.connect import connect
    from keel.client.errors import (
        AgentJobError,
        ConnectionFailed,
        InputRejected,
        InvalidJobRequest,
        JobFailed,
        JobNotFound,
        JobTimeout,
    )
    from keel.client.jobs import AgentJobs
    from keel.client.plugin import KeelClientPlugin
    from keel.workflows.types import Budget, HumanInput, JobRequest, JobResult, JobStatus

# Exports load on first use (PEP 562): ``keel.client.cli`` is a subpackage, and ``keel --help``
# must not pay for the Temporal client and the job models that these names bring in.
_EXPORTS = {
    "AgentJobError": "keel.client.errors",
    "AgentJobs": "keel.client.jobs",
    "Budget": "keel.workflows.types",
    "ConnectionFailed": "keel.client.errors",
    "HumanInput": "keel.workflows.types",
    "InputRejected": "keel.client.errors",
    "InvalidJobRequest": "keel.client.errors",
    "JobFailed": "keel.client.errors",
    "JobNotFound": "keel.client.errors",
    "JobRequest": "keel.workflows.types",
    "JobResult": "keel.workflows.types",
    "JobStatus": "keel.workflows.types",
    "JobSummary": "keel.client._listing",
    "JobTimeout": "keel.client.errors",
    "KeelClientPlugin": "keel.client.plugin",
    "connect": "keel.client.connect",
}


def __getattr__(name: str) -> object:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'keel.client' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "AgentJobError",
    "AgentJobs",
    "Budget",
    "ConnectionFailed",
    "HumanInput",
    "InputRejected",
    "InvalidJobRequest",
    "JobFailed",
    "JobNotFound",
    "JobRequest",
    "JobResult",
    "JobStatus",
    "JobSummary",
    "JobTimeout",
    "KeelClientPlugin",
    "connect",
]
