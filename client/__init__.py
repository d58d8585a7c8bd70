"""The Keel client: the only package callers import to run agent jobs.

Example:
    >>> from keel.client import AgentJobs, JobRequest, connect
    >>> jobs = AgentJobs(await connect())
    >>> job_id = await jobs.start(JobRequest(goal="What is 2**10?"), request_key="order-42")
    >>> result = await jobs.result(job_id)
"""

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
from keel.workflows.types import Budget, HumanInput, JobRequest, JobResult, JobStatus

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
    "connect",
]
