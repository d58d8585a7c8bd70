"""The HTTP API's app: routes, the one Temporal client it shares, and errors as JSON.

Every route is a thin call on ``AgentJobs``; responses are the client's models as JSON, and
every ``AgentJobError`` becomes a JSON error with a stable ``code`` and the HTTP status that
means it (never a 500 for a caller's mistake).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import Depends, FastAPI, Query, Request
from fastapi.responses import JSONResponse

from keel.client._summary import JobSummary
from keel.client.errors import (
    AgentJobError,
    ConnectionFailed,
    InvalidJobRequest,
    JobNotFound,
    JobTimeout,
)
from keel.client.jobs import AgentJobs
from keel.workflows.types import JobStatus

__all__ = ["ERROR_STATUS", "create_app"]

ERROR_STATUS: dict[type[AgentJobError], tuple[int, str]] = {
    JobNotFound: (404, "job_not_found"),
    InvalidJobRequest: (400, "invalid_request"),
    ConnectionFailed: (503, "temporal_unavailable"),
    JobTimeout: (504, "timeout"),
}
"""HTTP status and stable error code per client error; any other ``AgentJobError`` is 502."""

MAX_LIST = 500
"""Most jobs one list request returns."""


def _jobs(request: Request) -> AgentJobs:
    jobs: AgentJobs = request.app.state.jobs
    return jobs


Jobs = Annotated[AgentJobs, Depends(_jobs)]


def create_app(jobs: AgentJobs | None = None) -> FastAPI:
    """The API's ASGI app.

    Args:
        jobs: The façade to serve; by default one is connected from the environment
            (``keel.client.connect``) when the app starts, and shared by every request.
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if jobs is None:
            from keel.client.connect import connect

            app.state.jobs = AgentJobs(await connect())
        yield

    app = FastAPI(title="Keel", version="1", lifespan=lifespan)
    if jobs is not None:
        app.state.jobs = jobs

    @app.exception_handler(AgentJobError)
    async def on_job_error(_request: Request, exc: AgentJobError) -> JSONResponse:
        status, code = next(
            (v for k, v in ERROR_STATUS.items() if isinstance(exc, k)), (502, "job_error")
        )
        body: dict[str, object] = {"code": code, "message": exc.message}
        if isinstance(exc, InvalidJobRequest):
            body["field"] = exc.field
        return JSONResponse({"error": body}, status_code=status)

    @app.get("/v1/jobs/{job_id}", response_model=JobStatus)
    async def get_job(job_id: str, jobs: Jobs) -> JobStatus:
        """A job's state, budget use, pending question and recent events."""
        return await jobs.status(job_id)

    @app.get("/v1/jobs", response_model=list[JobSummary])
    async def list_jobs(
        jobs: Jobs,
        tenant: str | None = None,
        state: str | None = None,
        limit: Annotated[int, Query(ge=1, le=MAX_LIST)] = 50,
    ) -> list[JobSummary]:
        """Recent jobs from Temporal visibility, newest first."""
        return await jobs.list_jobs(tenant=tenant, state=state, limit=limit)

    @app.get("/healthz")
    async def healthz() -> dict[str, bool]:
        return {"ok": True}

    return app
