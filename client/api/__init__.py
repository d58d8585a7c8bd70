"""Keel's HTTP API: a thin FastAPI layer over ``AgentJobs`` (``keel api``).

Every call carries an API key (``keel keys create``); the key decides the tenant, user and
role, and another tenant's job is a 404. Jobs are submitted, read, answered and cancelled here;
the ``keel`` command reads through it when ``KEEL_API_URL`` is set.
"""

from keel.client.api.app import create_app

__all__ = ["create_app"]
