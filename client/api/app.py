"""The HTTP API's app: authentication, routes over ``AgentJobs``, and errors as JSON.

Every request carries an API key (``Authorization: Bearer keel_...``); the key decides the
tenant and user, and every route runs on an ``AgentJobs`` scoped to that tenant (operators: all
tenants), so another tenant's job is a 404 like a job that does not exist. Every
``AgentJobError`` becomes a JSON error with a stable ``code`` and the HTTP status that means it,
never a 500 for a caller's mistake. Request bodies are size-capped.

Admission is two Redis round trips (``client.api.limits``): the key's records, then one script
counting the request against its key's and its tenant's rate limits. ``/healthz`` says the process
serves, ``/readyz`` whether Temporal and Redis answer, and ``/metrics`` exports Prometheus
metrics (``client.api.metrics``); none of the three needs a key. The OpenAPI document lists
every error a route can answer with, in one JSON shape (``models.ErrorResponse``).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any
from urllib.parse import parse_qsl, urlencode

import structlog
from fastapi import Depends, FastAPI, Header, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import AwareDatetime, BeforeValidator
from redis.exceptions import RedisError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from temporalio.client import Client

from keel.activities import redis_client
from keel.activities.usage import DayUsage, QuotaExceeded, UsageLedger, today
from keel.client._summary import JobSummary
from keel.client._validation import REQUEST_KEY_RE, validate_request_key
from keel.client.api.concurrency import RETRY_AFTER_SECONDS, ConcurrencyLimited, check_concurrency
from keel.client.api.cursors import ListCursors
from keel.client.api.events import install_event_routes
from keel.client.api.keys import ApiKeys, Principal
from keel.client.api.limits import Admission, RateLimiter
from keel.client.api.metrics import CONTENT_TYPE, ApiMetrics, MetricsMiddleware
from keel.client.api.models import (
    AnswerIn,
    CancelAccepted,
    ErrorResponse,
    InputAck,
    JobAccepted,
    JobCreate,
    Readiness,
    WriteDecisionIn,
    job_links,
)
from keel.client.api.sessions import install_session_routes
from keel.client.errors import (
    AgentJobError,
    ConnectionFailed,
    InputRejected,
    InvalidJobRequest,
    JobNotFound,
    JobTimeout,
)
from keel.client.jobs import AgentJobs
from keel.workflows.types import JobResult, JobState, JobStatus, job_id_for

__all__ = ["ERROR_STATUS", "MAX_BODY_BYTES", "create_app"]

log = structlog.get_logger("keel.api")

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
READY_TIMEOUT_SECONDS = 2.0
"""How long ``/readyz`` waits for each dependency before calling it unreachable."""
STATUS_QUERIES = 16
"""Status queries one API process has in flight at most (``KEEL_API_STATUS_QUERIES``
overrides); the rest wait here, in order. A query is answered by a worker: past what the
workers answer at once, more in flight only lengthen their queue and its tail (measured in
issue 13: at 100 clients, p99 4 s unbounded, 0.5 s at 16)."""
REDIS_CONNECTIONS = 128
"""Redis connections one API process opens at most (each request holds one for one round
trip, so this bounds concurrency at Redis, not at the API)."""


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


def status_queries() -> int:
    """Status queries in flight per process: ``KEEL_API_STATUS_QUERIES``, else the default.

    Raises:
        ValueError: If the variable is not a whole number from 1 to 10,000.
    """
    text = os.environ.get("KEEL_API_STATUS_QUERIES", "").strip()
    value = int(text) if text else STATUS_QUERIES
    if not 1 <= value <= 10_000:
        raise ValueError("KEEL_API_STATUS_QUERIES must be a whole number from 1 to 10000")
    return value


def _error(status: int, code: str, message: str, **extra: object) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message, **extra}}, status)


_bearer = HTTPBearer(auto_error=False, description="An API key: `keel keys create`.")


async def _principal(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    if credentials is None:
        raise _Unauthorized
    limiter: RateLimiter = request.app.state.limiter
    admission = await limiter.check(credentials.credentials.strip())
    if admission.principal is None:
        raise _Unauthorized
    if admission.refused is not None:
        raise _RateLimited(*admission.refused)
    request.state.admission = admission
    return admission.principal


class _Unauthorized(Exception):
    """No valid API key on the request."""


class _RateLimited(Exception):
    """The key's or the tenant's request rate is used up; ``args``: (limit name, seconds)."""


class _BodyTooLarge(Exception):
    """A request body without a ``Content-Length`` grew past ``MAX_BODY_BYTES``."""


class _BodyCap:
    """Refuse request bodies over ``MAX_BODY_BYTES`` before any route reads them.

    A declared ``Content-Length`` over the cap (or not a number) is answered at once; a body
    streamed without one is counted as it is read. A plain ASGI middleware: Starlette's
    ``BaseHTTPMiddleware`` costs a task per request.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if repeated := _repeated_parameter(scope.get("query_string", b"")):
            # Every parameter of this API is one value; given twice, which one was meant?
            message = "given more than once; every query parameter takes one value"
            await _error(422, "invalid_request", message, field=repeated)(scope, receive, send)
            return
        length = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if length is not None:
            if not length.isdigit() or int(length) > MAX_BODY_BYTES:
                await _too_large()(scope, receive, send)
                return
            await self.app(scope, receive, send)
            return
        received = 0

        async def capped() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > MAX_BODY_BYTES:
                raise _BodyTooLarge
            return message

        await self.app(scope, capped, send)


def _repeated_parameter(query: bytes) -> str | None:
    """The first query parameter that appears twice, if any (one cheap pass, no decoding)."""
    if b"&" not in query:
        return None
    seen: set[str] = set()
    for name, _ in parse_qsl(query.decode("latin-1"), keep_blank_values=True):
        if name in seen:
            return name[:64]
        seen.add(name)
    return None


def _too_large() -> JSONResponse:
    return _error(413, "body_too_large", f"request bodies are at most {MAX_BODY_BYTES} B")


Caller = Annotated[Principal, Depends(_principal)]


async def _jobs(request: Request, caller: Caller) -> AgentJobs:
    # Async although it awaits nothing: FastAPI runs a plain ``def`` dependency in a worker
    # thread, which cost every request a thread hop (seen in the profile of issue 13).
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
            # A blocking pool: past its size a request waits for a connection (at most
            # ``pool_timeout`` s) instead of failing with "Too many connections". A cluster's
            # client (a ``redis+cluster://`` URL) has a pool per node and no blocking pool:
            # past its size on a node a request fails (503) instead of waiting.
            redis = redis_client.connect(
                url, max_connections=REDIS_CONNECTIONS, pool_timeout=5, socket_timeout=5
            )
            app.state.keys = ApiKeys(redis)
        app.state.limiter = RateLimiter(app.state.keys.redis)
        app.state.usage = UsageLedger(app.state.keys.redis)
        app.state.cursors = ListCursors(app.state.keys.redis)
        yield
        if redis is not None:
            await redis.aclose()

    app = FastAPI(title="Keel", version="1", lifespan=lifespan)
    app.state.client, app.state.keys, app.state.task_queue = client, keys, task_queue
    app.state.limiter = RateLimiter(keys.redis) if keys is not None else None
    app.state.usage = UsageLedger(keys.redis) if keys is not None else None
    app.state.cursors = ListCursors(keys.redis) if keys is not None else None
    app.state.weights = fairness_weights()
    app.state.metrics = ApiMetrics()
    app.state.status_queries = asyncio.Semaphore(status_queries())
    # Added last, so outermost: every answer is counted, the body cap's 413 included.
    app.add_middleware(_BodyCap)
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)
    _install_errors(app)
    _install_routes(app)
    _install_ops_routes(app)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    install_event_routes(app, Jobs)
    install_session_routes(app, Caller)
    return app


def _install_errors(app: FastAPI) -> None:  # noqa: C901 - one short handler per error
    metrics: ApiMetrics = app.state.metrics

    @app.exception_handler(_BodyTooLarge)
    async def on_too_large(_request: Request, _exc: _BodyTooLarge) -> JSONResponse:
        return _too_large()

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        response = _error(exc.status_code, code, str(exc.detail))
        response.headers.update(exc.headers or {})
        if exc.status_code == 405:
            # Starlette names only the first route's methods; a path may have several routes.
            response.headers["Allow"] = ", ".join(_allowed_methods(app, request.url.path))
        return response

    @app.exception_handler(RedisError)
    async def on_redis(request: Request, exc: RedisError) -> JSONResponse:
        # Keys, limits and quotas live in Redis: without it nothing can be admitted.
        log.warning("api.redis_failed", path=request.url.path, error=type(exc).__name__)
        return _error(503, "redis_unavailable", "Redis, which holds keys and limits, is down")

    @app.exception_handler(_Unauthorized)
    async def on_unauthorized(_request: Request, _exc: _Unauthorized) -> JSONResponse:
        response = _error(401, "unauthorized", "a valid API key is required (Bearer keel_...)")
        response.headers["WWW-Authenticate"] = "Bearer"
        return response

    @app.exception_handler(_RateLimited)
    async def on_rate_limited(_request: Request, exc: _RateLimited) -> JSONResponse:
        limit, seconds = exc.args
        metrics.rate_limited.labels(limit).inc()
        response = _error(429, "rate_limited", f"the {limit} request limit is used up", limit=limit)
        response.headers["Retry-After"] = str(max(1, math.ceil(seconds)))
        return response

    @app.exception_handler(ConcurrencyLimited)
    async def on_concurrency(_request: Request, exc: ConcurrencyLimited) -> JSONResponse:
        response = _error(429, "concurrency_limited", exc.message, limit=exc.limit)
        response.headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
        return response

    @app.exception_handler(QuotaExceeded)
    async def on_quota(_request: Request, exc: QuotaExceeded) -> JSONResponse:
        quota, limit = exc.args
        metrics.quota_refused.labels(quota).inc()
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
    @app.post(
        "/v1/jobs",
        status_code=202,
        response_model=JobAccepted,
        responses={
            200: {"model": JobAccepted, "description": "The job ended within ``wait``."},
        },
    )
    async def create_job(
        body: JobCreate,
        jobs: Jobs,
        caller: Caller,
        response: Response,
        incoming: Request,
        idempotency_key: Annotated[
            str | None,
            Header(
                description="Repeat it to get the same job back instead of a new one.",
                json_schema_extra={"pattern": REQUEST_KEY_RE.pattern},  # else a 400
            ),
        ] = None,
        wait: Annotated[float, Query(ge=0, le=MAX_WAIT_SECONDS)] = 0,
    ) -> JobAccepted:
        """Start a job (idempotent on ``Idempotency-Key``); with ``wait``, answer inline."""
        request = body.to_request(caller.tenant, caller.user or caller.key_id)
        # An empty key is refused, not taken as none: a caller that meant one would lose it.
        key = validate_request_key(uuid.uuid4().hex if idempotency_key is None else idempotency_key)
        # Counted against the tenant's daily quotas before it starts, once per job ID.
        ledger: UsageLedger = app.state.usage
        quotas = _admission(incoming).quotas()  # read at admission (at most a second old)
        await ledger.admit_job(
            caller.tenant,
            job_id_for(caller.tenant, key),
            jobs_per_day=quotas.jobs_per_day,
            usd_per_day=quotas.usd_per_day,
        )
        slot = await check_concurrency(ledger.redis, request, job_id_for(caller.tenant, key))
        job_id = await jobs.start(request, request_key=key, job_slot=slot)
        accepted = JobAccepted(job_id=job_id, links=job_links(job_id))
        if wait > 0:
            try:
                accepted.result = await _result(jobs, job_id, wait)
                response.status_code = 200
            except JobTimeout:
                pass
        return accepted

    @app.get("/v1/jobs/{job_id}", response_model=JobStatus)
    async def get_job(job_id: str, jobs: Jobs) -> Response:
        """A job's state, budget use, pending question and recent events."""
        # Serialized once, here: returned as a model, FastAPI would validate the query's
        # already-validated snapshot against ``JobStatus`` again before encoding it.
        async with app.state.status_queries:  # bounded: see STATUS_QUERIES
            status = await jobs.status(job_id)
        return Response(status.model_dump_json(), media_type="application/json")

    @app.get(
        "/v1/jobs",
        response_model=list[JobSummary],
        responses={200: {"headers": _PAGE_HEADERS}},
    )
    async def list_jobs(
        jobs: Jobs,
        request: Request,
        response: Response,
        tenant: Annotated[str | None, Query(max_length=64)] = None,
        state: Annotated[JobState | None, Query(description="Only jobs in this state.")] = None,
        since: Annotated[
            AwareDatetime | None,
            BeforeValidator(_date_time),
            Query(description="Only jobs started at or after this time (RFC 3339, with offset)."),
        ] = None,
        cursor: Annotated[
            str | None,
            Query(max_length=4096, description="Continue a listing: its last `X-Next-Cursor`."),
        ] = None,
        limit: Annotated[int, Query(ge=1, le=MAX_LIST)] = 50,
    ) -> list[JobSummary]:
        """Recent jobs from Temporal visibility, newest first (a member's own tenant only).

        The body is one page; when more may follow, ``X-Next-Cursor`` holds the cursor for the
        next (send it back as ``cursor`` with the same filters) and ``Link`` its URL.
        """
        cursors: ListCursors = app.state.cursors
        # A cursor is good only for the listing it came from: the same scope and filters.
        listing = f"{jobs.tenant}|{tenant}|{state}|{since and since.isoformat()}"
        rows, token = await jobs.list_page(
            tenant=tenant,
            state=state,
            since=since,
            limit=limit,
            page_token=await cursors.open(listing, cursor),
        )
        if token:
            next_cursor = await cursors.seal(listing, token)
            kept = [(k, v) for k, v in request.query_params.multi_items() if k != "cursor"]
            query = urlencode([*kept, ("cursor", next_cursor)])
            response.headers["X-Next-Cursor"] = next_cursor
            response.headers["Link"] = f'<{request.url.path}?{query}>; rel="next"'
        return rows

    @app.get("/v1/jobs/{job_id}/result", response_model=JobResult, responses=_errors(409))
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

    @app.post("/v1/jobs/{job_id}/answer", response_model=InputAck, responses=_errors(409))
    async def answer(job_id: str, body: AnswerIn, jobs: Jobs) -> InputAck:
        """Answer the job's pending question; acknowledged once the job recorded it."""
        return InputAck(ack=await jobs.send_input(job_id, body.text))

    @app.post(
        "/v1/jobs/{job_id}/writes/{write_id}", response_model=InputAck, responses=_errors(409)
    )
    async def decide_write(
        job_id: str,
        write_id: Annotated[str, Path(max_length=200)],
        body: WriteDecisionIn,
        jobs: Jobs,
    ) -> InputAck:
        """Approve or reject a write awaiting approval (``writes`` in the job's status)."""
        ack = await jobs.decide_write(job_id, write_id, approve=body.approve, reason=body.reason)
        return InputAck(ack=ack)

    @app.post("/v1/jobs/{job_id}/cancel", status_code=202, response_model=CancelAccepted)
    async def cancel(job_id: str, jobs: Jobs) -> CancelAccepted:
        """Ask the job to stop; it ends ``cancelled`` with its partial result."""
        await jobs.cancel(job_id)
        return CancelAccepted(job_id=job_id)

    @app.get("/v1/usage", response_model=list[DayUsage])
    async def usage(
        caller: Caller,
        tenant: Annotated[str | None, Query(max_length=64)] = None,
        days: Annotated[int, Query(ge=1, le=31)] = 7,
    ) -> list[DayUsage]:
        """The tenant's cost, tokens, model calls and jobs per UTC day, today first."""
        if tenant is not None and tenant != caller.tenant and caller.role != "operator":
            # Another tenant's usage is not there for a member: empty days, nothing read.
            first = today()
            return [DayUsage(day=first - timedelta(days=back)) for back in range(days)]
        ledger: UsageLedger = app.state.usage
        return await ledger.days(tenant or caller.tenant, days)


def _install_ops_routes(app: FastAPI) -> None:
    """``/healthz``, ``/readyz`` and ``/metrics``: for probes and scrapers, without a key."""

    @app.get("/healthz")
    async def healthz() -> dict[str, bool]:
        """The process serves requests (liveness); says nothing about Temporal or Redis."""
        return {"ok": True}

    @app.get(
        "/readyz",
        response_model=Readiness,
        responses={503: {"model": ErrorResponse, "description": "Temporal or Redis is down."}},
    )
    async def readyz() -> Any:
        """Temporal and Redis both answer (readiness); 503 naming the ones that do not."""
        temporal, redis = await asyncio.gather(_temporal_ready(app), _redis_ready(app))
        if temporal and redis:
            return Readiness(ok=True, temporal=True, redis=True)
        down = [name for name, up in (("temporal", temporal), ("redis", redis)) if not up]
        return _error(503, "not_ready", f"unreachable: {', '.join(down)}", unavailable=down)

    @app.get(
        "/metrics",
        response_class=PlainTextResponse,
        responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
    )
    async def metrics() -> Response:
        """Prometheus metrics: requests by route and status, latency, refusals."""
        return Response(app.state.metrics.exposition(), media_type=CONTENT_TYPE)


async def _temporal_ready(app: FastAPI) -> bool:
    client: Client | None = app.state.client
    if client is None:
        return False
    try:
        return await client.service_client.check_health(
            timeout=timedelta(seconds=READY_TIMEOUT_SECONDS)
        )
    except Exception:  # noqa: BLE001 - any failure to answer means not ready
        return False


async def _redis_ready(app: FastAPI) -> bool:
    keys: ApiKeys | None = app.state.keys
    if keys is None:
        return False
    try:
        async with asyncio.timeout(READY_TIMEOUT_SECONDS):
            return bool(await keys.redis.ping())
    except (RedisError, OSError, TimeoutError):
        return False


def _allowed_methods(app: FastAPI, path: str) -> list[str]:
    methods: set[str] = set()
    for route in app.routes:
        if isinstance(route, Route) and route.methods and route.path_regex.match(path):
            methods |= route.methods
    return sorted(methods)


def _date_time(value: object) -> object:
    """Refuse anything but an RFC 3339 date-time (pydantic would read ``0.5`` as a time)."""
    if isinstance(value, str) and not _DATE_TIME.match(value):
        raise ValueError("must be an RFC 3339 date-time, e.g. 2025-01-31T09:00:00Z")
    return value


_DATE_TIME = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}")


def _admission(request: Request) -> Admission:
    """What the caller's admission read (set by ``_principal``, which every /v1 route runs)."""
    admission: Admission = request.state.admission
    return admission


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}
"""Stable codes for the errors Starlette raises itself (no route, wrong method, body cap)."""

_PAGE_HEADERS = {
    "X-Next-Cursor": {
        "description": "The cursor of the next page, when more may follow.",
        "schema": {"type": "string"},
    },
    "Link": {
        "description": 'The next page\'s URL, as `<...>; rel="next"`.',
        "schema": {"type": "string"},
    },
}

_ERROR_DESCRIPTIONS = {
    400: "A value is not acceptable (``field`` names it).",
    401: "No valid API key.",
    404: "No such job for this caller (another tenant's job included).",
    409: "The job is not in a state for this (still running, or no question pending).",
    413: "The request body is too large.",
    422: "The request does not match the schema (``field`` names the first problem).",
    429: "A rate limit or daily quota is used up; ``Retry-After`` says when to retry.",
    502: "Temporal refused the call, or no worker answered in time.",
    503: "Temporal or Redis is unreachable.",
    504: "The job did not end in time.",
}
_ERROR_HEADERS: dict[int, dict[str, Any]] = {
    401: {"WWW-Authenticate": {"schema": {"type": "string"}}},
    429: {"Retry-After": {"description": "Seconds.", "schema": {"type": "string"}}},
}
_GATEWAY_ERRORS = (400, 401, 413, 422, 429, 502, 503)
"""What any /v1 route may answer: a value a schema cannot judge (an unknown tool, a cursor
from elsewhere), admission, the body cap, validation, and Temporal or Redis failing."""


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for these error statuses, each with the shared error body."""
    return {
        status: {
            "model": ErrorResponse,
            "description": _ERROR_DESCRIPTIONS[status],
            **({"headers": _ERROR_HEADERS[status]} if status in _ERROR_HEADERS else {}),
        }
        for status in statuses
    }


def _error_doc(status: int, schema: dict[str, Any]) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "description": _ERROR_DESCRIPTIONS[status],
        "content": {"application/json": {"schema": schema}},
    }
    if status in _ERROR_HEADERS:
        doc["headers"] = _ERROR_HEADERS[status]
    return doc


def _openapi(app: FastAPI) -> dict[str, Any]:
    """The OpenAPI document, with every /v1 route's gateway errors in the API's error shape.

    The gateway's own answers (401, 413, 422, 429, and 502 or 503 when Temporal or Redis
    fails; 404 on a job's routes) hold for every /v1 route, routes other modules add included,
    so they are listed here once rather than on each route. FastAPI's default 422 body
    (``HTTPValidationError``) is replaced: validation errors answer in ``ErrorResponse`` too.
    """
    if app.openapi_schema is not None:
        return app.openapi_schema
    schema = get_openapi(
        title=app.title, version=app.version, routes=app.routes, description=app.description
    )
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    error_schema = ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}")
    for name, definition in error_schema.pop("$defs", {}).items():
        components.setdefault(name, definition)
    components.setdefault("ErrorResponse", error_schema)
    for unused in ("HTTPValidationError", "ValidationError"):
        components.pop(unused, None)
    error_ref = {"$ref": "#/components/schemas/ErrorResponse"}
    for path, operations in schema.get("paths", {}).items():
        statuses = [*_GATEWAY_ERRORS, *((404,) if "{job_id}" in path else ())]
        for operation in operations.values():
            responses = operation.setdefault("responses", {})
            if "422" in responses or path.startswith("/v1/"):
                responses["422"] = _error_doc(422, error_ref)
            if path.startswith("/v1/"):
                for status in statuses:
                    responses.setdefault(str(status), _error_doc(status, error_ref))
    app.openapi_schema = schema
    return schema


def _seconds_to_utc_midnight() -> int:
    now = datetime.now(UTC)
    midnight = (now + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    return max(1, int((midnight - now).total_seconds()))


class _StillRunning(Exception):
    """The job has not ended within the request's wait."""


async def _result(jobs: AgentJobs, job_id: str, wait: float) -> JobResult:
    """The job's result, failed jobs' included; ``JobTimeout`` if it runs past ``wait``."""
    return await jobs.final_result(job_id, timeout=max(wait, 0.001))
