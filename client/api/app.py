"""The HTTP API's app: authentication, routes over ``AgentJobs``, and errors as JSON.

Every request carries an API key (``Authorization: Bearer keel_...``); the key decides the
tenant and user, and every route runs on an ``AgentJobs`` scoped to that tenant (operators: all
tenants), so another tenant's job is a 404 like a job that does not exist. Every
``AgentJobError`` becomes a JSON error with a stable ``code`` and the HTTP status that means it,
never a 500 for a caller's mistake. Request bodies are size-capped.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Annotated

import redis.asyncio as aioredis
from fastapi import Depends, FastAPI, Header, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from temporalio.client import Client

from keel.activities.usage import DayUsage, QuotaExceeded, UsageLedger, today
from keel.client._summary import JobSummary
from keel.client._validation import validate_request_key
from keel.client.api.keys import ApiKeys, Principal
from keel.client.api.limits import RateLimiter, daily_quotas
from keel.client.api.models import AnswerIn, JobAccepted, JobCreate, job_links
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
from keel.workflows.types import HumanInput, JobResult, JobStatus, job_id_for

__all__ = ["ERROR_STATUS", "MAX_BODY_BYTES", "create_app"]

ERROR_STATUS: dict[type[AgentJobError], tuple[int, str]] = {
    JobNotFound: (404, "job_not_found"),
    InvalidJobRequest: (400, "invalid_request"),
    InputRejected: (409, "input_rejected"),
    ConnectionFailed: (503, "temporal_unavailable"),
    JobTimeout: (504, "timeout"),
}
"""HTTP status and stable error code per client error; any other ``AgentJobError`` is 502."""

MAX_LIST = 500
"""Most jobs one list request returns."""
MAX_BODY_BYTES = 64 * 1024
"""Largest request body: a goal is at most 8,000 characters; nothing needs more."""
MAX_WAIT_SECONDS = 60.0
"""Longest ``wait`` a request may hold a connection for."""


def fairness_weights() -> dict[str, float]:
    """Tenants' fairness weights from ``KEEL_FAIRNESS_WEIGHTS`` (JSON ``{"acme": 2.0}``).

    Raises:
        ValueError: If the variable is not a JSON object of positive, finite numbers.
    """
    text = os.environ.get("KEEL_FAIRNESS_WEIGHTS", "").strip()
    if not text:
        return {}
    weights = json.loads(text)
    if not isinstance(weights, dict) or not all(
        isinstance(v, int | float) and 0 < v < math.inf for v in weights.values()
    ):
        raise ValueError("KEEL_FAIRNESS_WEIGHTS must be a JSON object of positive numbers")
    return {str(k): float(v) for k, v in weights.items()}


def _error(status: int, code: str, message: str, **extra: object) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message, **extra}}, status)


async def _principal(
    request: Request, authorization: Annotated[str | None, Header()] = None
) -> Principal:
    scheme, _, key = (authorization or "").partition(" ")
    keys: ApiKeys = request.app.state.keys
    principal = await keys.lookup(key.strip()) if scheme.lower() == "bearer" else None
    if principal is None:
        raise _Unauthorized
    limiter: RateLimiter = request.app.state.limiter
    if refused := await limiter.admit(principal.key_id, principal.tenant):
        raise _RateLimited(*refused)
    return principal


class _Unauthorized(Exception):
    """No valid API key on the request."""


class _RateLimited(Exception):
    """The key's or the tenant's request rate is used up; ``args``: (limit name, seconds)."""


Caller = Annotated[Principal, Depends(_principal)]


def _jobs(request: Request, caller: Caller) -> AgentJobs:
    scope = None if caller.role == "operator" else caller.tenant
    state = request.app.state
    return AgentJobs(
        state.client, task_queue=state.task_queue, tenant=scope, fairness_weights=state.weights
    )


Jobs = Annotated[AgentJobs, Depends(_jobs)]


def create_app(
    client: Client | None = None, keys: ApiKeys | None = None, task_queue: str | None = None
) -> FastAPI:
    """The API's ASGI app.

    Args:
        client: The Temporal client every request shares; by default one is connected from
            the environment (``keel.client.connect``) when the app starts.
        keys: Where API keys live; by default Redis at ``REDIS_URL``.
        task_queue: Pin every job to this queue (tests); by default each job's mode picks.
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        redis = None
        if client is None:
            from keel.client.connect import connect

            app.state.client = await connect()
        if keys is None:
            url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
            redis = aioredis.Redis.from_url(url, socket_timeout=5)
            app.state.keys = ApiKeys(redis)
        app.state.limiter = RateLimiter(app.state.keys.redis)
        app.state.usage = UsageLedger(app.state.keys.redis)
        yield
        if redis is not None:
            await redis.aclose()

    app = FastAPI(title="Keel", version="1", lifespan=lifespan)
    app.state.client, app.state.keys, app.state.task_queue = client, keys, task_queue
    app.state.limiter = RateLimiter(keys.redis) if keys is not None else None
    app.state.usage = UsageLedger(keys.redis) if keys is not None else None
    app.state.weights = fairness_weights()
    _install_errors(app)
    _install_routes(app)
    return app


def _install_errors(app: FastAPI) -> None:
    @app.middleware("http")
    async def cap_body(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
            return _error(413, "body_too_large", f"request bodies are at most {MAX_BODY_BYTES} B")
        return await call_next(request)

    @app.exception_handler(_Unauthorized)
    async def on_unauthorized(_request: Request, _exc: _Unauthorized) -> JSONResponse:
        response = _error(401, "unauthorized", "a valid API key is required (Bearer keel_...)")
        response.headers["WWW-Authenticate"] = "Bearer"
        return response

    @app.exception_handler(_RateLimited)
    async def on_rate_limited(_request: Request, exc: _RateLimited) -> JSONResponse:
        limit, seconds = exc.args
        response = _error(429, "rate_limited", f"the {limit} request limit is used up", limit=limit)
        response.headers["Retry-After"] = str(max(1, math.ceil(seconds)))
        return response

    @app.exception_handler(QuotaExceeded)
    async def on_quota(_request: Request, exc: QuotaExceeded) -> JSONResponse:
        quota, limit = exc.args
        response = _error(
            429, "quota_exceeded", f"the tenant's {quota} quota ({limit}) is used up today",
            quota=quota,
        )  # fmt: skip
        response.headers["Retry-After"] = str(_seconds_to_utc_midnight())
        return response

    @app.exception_handler(RequestValidationError)
    async def on_invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        field = ".".join(str(p) for p in first.get("loc", ())[1:]) or "request"
        return _error(422, "invalid_request", str(first.get("msg", "invalid")), field=field)

    @app.exception_handler(AgentJobError)
    async def on_job_error(_request: Request, exc: AgentJobError) -> JSONResponse:
        status, code = next(
            (v for k, v in ERROR_STATUS.items() if isinstance(exc, k)), (502, "job_error")
        )
        extra = {"field": exc.field} if isinstance(exc, InvalidJobRequest) else {}
        return _error(status, code, exc.message, **extra)


def _install_routes(app: FastAPI) -> None:  # noqa: C901 - one short function per route
    @app.post("/v1/jobs", status_code=202, response_model=JobAccepted)
    async def create_job(
        body: JobCreate,
        jobs: Jobs,
        caller: Caller,
        response: Response,
        idempotency_key: Annotated[str | None, Header()] = None,
        wait: Annotated[float, Query(ge=0, le=MAX_WAIT_SECONDS)] = 0,
    ) -> JobAccepted:
        """Start a job (idempotent on ``Idempotency-Key``); with ``wait``, answer inline."""
        request = body.to_request(caller.tenant, caller.user or caller.key_id)
        key = validate_request_key(idempotency_key or uuid.uuid4().hex)
        # Counted against the tenant's daily quotas before it starts, once per job ID.
        ledger: UsageLedger = app.state.usage
        quotas = await daily_quotas(ledger.redis, caller.tenant)
        await ledger.admit_job(
            caller.tenant,
            job_id_for(caller.tenant, key),
            jobs_per_day=quotas.jobs_per_day,
            usd_per_day=quotas.usd_per_day,
        )
        job_id = await jobs.start(request, request_key=key)
        accepted = JobAccepted(job_id=job_id, links=job_links(job_id))
        if wait > 0:
            try:
                accepted.result = await _result(jobs, job_id, wait)
                response.status_code = 200
            except JobTimeout:
                pass
        return accepted

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
        """Recent jobs from Temporal visibility, newest first (a member's own tenant only)."""
        return await jobs.list_jobs(tenant=tenant, state=state, limit=limit)

    @app.get("/v1/jobs/{job_id}/result", response_model=JobResult)
    async def get_result(
        job_id: str, jobs: Jobs, wait: Annotated[float, Query(ge=0, le=MAX_WAIT_SECONDS)] = 0
    ) -> JobResult:
        """How the job ended, failed jobs included; 409 while it runs (after ``wait``)."""
        try:
            return await _result(jobs, job_id, wait)
        except JobTimeout:
            raise _StillRunning(job_id) from None

    @app.exception_handler(_StillRunning)
    async def on_running(_request: Request, exc: _StillRunning) -> JSONResponse:
        return _error(409, "job_running", f"job {exc.args[0]} has not ended yet")

    @app.post("/v1/jobs/{job_id}/answer")
    async def answer(job_id: str, body: AnswerIn, jobs: Jobs) -> dict[str, str]:
        """Answer the job's pending question; acknowledged once the job recorded it."""
        return {"ack": await jobs.send_input(job_id, HumanInput(text=body.text))}

    @app.post("/v1/jobs/{job_id}/cancel", status_code=202)
    async def cancel(job_id: str, jobs: Jobs) -> dict[str, str]:
        """Ask the job to stop; it ends ``cancelled`` with its partial result."""
        await jobs.cancel(job_id)
        return {"job_id": job_id, "status": "cancellation requested"}

    @app.get("/v1/usage", response_model=list[DayUsage])
    async def usage(
        caller: Caller,
        tenant: str | None = None,
        days: Annotated[int, Query(ge=1, le=31)] = 7,
    ) -> list[DayUsage]:
        """The tenant's cost, tokens, model calls and jobs per UTC day, today first."""
        if tenant is not None and tenant != caller.tenant and caller.role != "operator":
            # Another tenant's usage is not there for a member: empty days, nothing read.
            first = today()
            return [DayUsage(day=first - timedelta(days=back)) for back in range(days)]
        ledger: UsageLedger = app.state.usage
        return await ledger.days(tenant or caller.tenant, days)

    @app.get("/healthz")
    async def healthz() -> dict[str, bool]:
        return {"ok": True}


def _seconds_to_utc_midnight() -> int:
    now = datetime.now(UTC)
    midnight = (now + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    return max(1, int((midnight - now).total_seconds()))


class _StillRunning(Exception):
    """The job has not ended within the request's wait."""


async def _result(jobs: AgentJobs, job_id: str, wait: float) -> JobResult:
    """The job's result, failed jobs' included; ``JobTimeout`` if it runs past ``wait``."""
    try:
        return await jobs.result(job_id, timeout=max(wait, 0.001))
    except JobFailed as failed:
        if failed.result is None:
            raise
        return failed.result
