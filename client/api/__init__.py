"""Keel's HTTP API: a thin FastAPI layer over ``AgentJobs`` (``keel api``).

Today it serves reads (a job's status, the job list) for the ``keel`` command's fast path and
binds to loopback only; authentication, tenancy and the write endpoints arrive with the gateway
(issue 13), which is also when it may listen beyond this host.
"""

from keel.client.api.app import create_app

__all__ = ["create_app"]
