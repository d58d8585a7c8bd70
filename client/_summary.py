"""``JobSummary``: one job as visibility lists it; a model only, so it loads without the SDK.

The ``keel list`` command reads these from the HTTP API as well as from Temporal directly, and
the HTTP path must not import the Temporal client to parse them.
"""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel

from keel.workflows.types import JobState

__all__ = ["JobSummary"]


class JobSummary(BaseModel):
    """One row of ``AgentJobs.list_jobs``, read from visibility (search attributes), not a query."""

    job_id: str
    """Workflow ID of the job."""
    state: JobState | None = None
    """Last ``KeelState`` the workflow upserted; ``None`` before visibility caught up."""
    outcome: str | None = None
    """``KeelOutcome`` once the job has ended."""
    tenant: str | None = None
    """``KeelTenant`` set at start."""
    user: str | None = None
    """``KeelUser`` set at start."""
    temporal_status: str
    """Temporal's execution status name, such as ``RUNNING`` or ``COMPLETED``."""
    started_at: datetime
    """When the job's current run started."""
    cost_usd: float | None = None
    """``KeelCostUsd``: dollars spent so far."""
    tokens: int | None = None
    """``KeelTokens``: prompt plus completion tokens so far."""
