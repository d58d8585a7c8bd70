"""The HTTP API's request and response bodies: what callers send and get, not workflow payloads.

``JobCreate`` is what a caller may choose about a job. What the key decides (tenant, user) and
what only operators of the worker may decide (folders on the worker's disk, which workflow to
signal) is not in it: webhooks replace ``notify_workflow`` for API callers, and named corpora
replace ``docs_dir`` (issue 13).
"""

from __future__ import annotations

from typing import Literal
from urllib.parse import quote

from pydantic import BaseModel, ConfigDict, Field

from keel.activities.corpora import CORPUS_PREFIX
from keel.workflows.types import MAX_GOAL_CHARS, Budget, JobRequest, JobResult

__all__ = ["AnswerIn", "JobAccepted", "JobCreate", "job_links"]


class JobCreate(BaseModel):
    """A job as an API caller submits it."""

    model_config = ConfigDict(extra="forbid")

    goal: str = Field(min_length=1, max_length=MAX_GOAL_CHARS)
    """What the agent should achieve."""
    tools: list[str] | None = None
    """Tools the job may use (default: calculator, write_note)."""
    budget: Budget | None = None
    """Limits; any left out take their defaults."""
    ask_timeout_seconds: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    """How long a question waits before the job assumes its default."""
    mode: Literal["interactive", "batch"] = "interactive"
    """``batch`` jobs never run ahead of interactive ones."""
    corpus: str | None = Field(default=None, max_length=64)
    """A corpus the job may search (the tenant's own, or a shared one), by name."""
    callback_url: str | None = Field(default=None, max_length=2048)
    """Webhook for the outcome, on the tenant's allow-list; signed with the tenant's secret
    (Standard Webhooks headers), the same ``webhook-id`` on every retry."""

    def to_request(self, tenant: str, user: str) -> JobRequest:
        """The workflow's request, with the tenant and user the caller's key acts as."""
        fields = self.model_dump(exclude_none=True, exclude={"corpus"})
        if self.corpus is not None:
            fields["docs_dir"] = CORPUS_PREFIX + self.corpus
        return JobRequest.model_validate({**fields, "tenant": tenant, "user": user})


class JobAccepted(BaseModel):
    """A started (or, for a repeated ``Idempotency-Key``, found) job."""

    job_id: str
    links: dict[str, str]
    """Where to read the job, its result and events, and where to answer or cancel it."""
    result: JobResult | None = None
    """The outcome, when the job ended within the request's ``wait``."""


class AnswerIn(BaseModel):
    """An answer to the job's pending question."""

    model_config = ConfigDict(extra="forbid")

    text: str = Field(min_length=1, max_length=4000)


def job_links(job_id: str) -> dict[str, str]:
    """The job's resources, by name."""
    base = f"/v1/jobs/{quote(job_id, safe='')}"
    return {
        "self": base,
        "result": f"{base}/result",
        "answer": f"{base}/answer",
        "cancel": f"{base}/cancel",
    }
