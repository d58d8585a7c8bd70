"""Jobs as Temporal's visibility store lists them: the list query and its rows.

Owns reading search attributes (``KeelState``, ``KeelOutcome``, ``KeelTenant`` ...) back into
job terms, without a query to a worker, so ``keel list`` works when no worker runs. Filters are
checked against closed vocabularies before they go into a query string, so no caller can inject
visibility-query syntax.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import cast, get_args

from temporalio.client import Client, WorkflowExecution
from temporalio.service import RPCError, RPCStatusCode

from keel.client._summary import JobSummary
from keel.client.errors import InvalidJobRequest
from keel.workflows import WORKFLOW_TYPE
from keel.workflows.search_attributes import (
    KEEL_COST_USD,
    KEEL_OUTCOME,
    KEEL_STATE,
    KEEL_TENANT,
    KEEL_TOKENS,
    KEEL_USER,
)
from keel.workflows.types import IDENT_RE, JobState

__all__ = ["JobSummary", "job_state", "list_page", "list_query", "list_summaries"]

_JOB_STATES: frozenset[str] = frozenset(get_args(JobState))


def list_query(
    *, tenant: str | None = None, state: str | None = None, since: datetime | None = None
) -> str:
    """Build the visibility query that selects Keel jobs, optionally by tenant, state and start.

    Both values are checked against closed vocabularies before they are put into the query
    string, so no caller can inject visibility-query syntax.

    Args:
        tenant: Only this tenant's jobs; must be an identifier (``IDENT_RE``).
        state: Only jobs in this ``JobState``.
        since: Only jobs started at or after this time (a naive time is taken as UTC); it
            enters the query as a formatted timestamp, never as the caller's text.

    Returns:
        A query such as ``WorkflowType = 'AgentLoopWorkflow' AND KeelTenant = 'acme'``.

    Raises:
        InvalidJobRequest: With ``field`` ``"tenant"`` or ``"state"`` if a value is malformed.
    """
    clauses = [f"WorkflowType = '{WORKFLOW_TYPE}'"]
    if tenant is not None:
        if not IDENT_RE.match(tenant):
            raise InvalidJobRequest(
                "tenant", "must be 1-64 letters, digits, '.', '_' or '-', starting alphanumeric"
            )
        clauses.append(f"{KEEL_TENANT.name} = '{tenant}'")
    if state is not None:
        if state not in _JOB_STATES:
            raise InvalidJobRequest(
                "state", f"unknown state {state!r}; one of: {', '.join(get_args(JobState))}"
            )
        clauses.append(f"{KEEL_STATE.name} = '{state}'")
    if since is not None:
        moment = since if since.tzinfo is not None else since.replace(tzinfo=UTC)
        try:
            utc = moment.astimezone(UTC)
        except OverflowError:  # the offset moves it past year 1 or 9999
            raise InvalidJobRequest("since", "out of range") from None
        # isoformat pads the year to four digits (strftime's %Y does not on every platform).
        clauses.append(f"StartTime >= '{utc.replace(tzinfo=None).isoformat('T', 'microseconds')}Z'")
    return " AND ".join(clauses)


async def list_summaries(
    client: Client, *, tenant: str | None = None, state: str | None = None, limit: int = 50
) -> list[JobSummary]:
    """List jobs from Temporal visibility, most recent first.

    Args:
        client: A connected Temporal client.
        tenant: Only this tenant's jobs.
        state: Only jobs whose ``KeelState`` is this job state.
        limit: At most this many rows.

    Returns:
        One summary per job.

    Raises:
        InvalidJobRequest: If ``tenant``, ``state`` or ``limit`` is malformed; checked before
            the client is used.
        RPCError: If the server refused the listing (the façade maps it).
    """
    if limit < 1:
        raise InvalidJobRequest("limit", "must be at least 1")
    query = list_query(tenant=tenant, state=state)
    return [_summarise(execution) async for execution in client.list_workflows(query, limit=limit)]


async def list_page(
    client: Client,
    *,
    tenant: str | None = None,
    state: str | None = None,
    since: datetime | None = None,
    limit: int = 50,
    page_token: bytes | None = None,
) -> tuple[list[JobSummary], bytes | None]:
    """One page of jobs from Temporal visibility, most recent first, and the next page's token.

    Args:
        client: A connected Temporal client.
        tenant: Only this tenant's jobs.
        state: Only jobs whose ``KeelState`` is this job state.
        since: Only jobs started at or after this time.
        limit: At most this many rows.
        page_token: Where to continue: the token a previous page of the same listing returned.

    Returns:
        The rows, and the token of the next page (None when the listing is done; a token may
        still lead to an empty last page, as Temporal cannot always tell in advance).

    Raises:
        InvalidJobRequest: If a filter or ``limit`` is malformed, or (``field="cursor"``) the
            server refused ``page_token``.
        RPCError: If the server refused the listing otherwise (the façade maps it).
    """
    if limit < 1:
        raise InvalidJobRequest("limit", "must be at least 1")
    query = list_query(tenant=tenant, state=state, since=since)
    pages = client.list_workflows(query, page_size=limit, next_page_token=page_token)
    try:
        await pages.fetch_next_page()
    except RPCError as err:
        if page_token is not None and err.status == RPCStatusCode.INVALID_ARGUMENT:
            raise InvalidJobRequest("cursor", "not a cursor this listing returned") from None
        raise
    rows = [_summarise(execution) for execution in pages.current_page or ()]
    return rows, pages.next_page_token


def job_state(value: str | None) -> JobState | None:
    """A search-attribute value as a ``JobState``.

    Args:
        value: A ``KeelState`` or ``KeelOutcome`` value.

    Returns:
        The state, or None for a missing value or one this build does not know.
    """
    return cast(JobState, value) if value in _JOB_STATES else None


def _summarise(execution: WorkflowExecution) -> JobSummary:
    attrs = execution.typed_search_attributes
    return JobSummary(
        job_id=execution.id,
        state=job_state(attrs.get(KEEL_STATE)),
        outcome=attrs.get(KEEL_OUTCOME),
        tenant=attrs.get(KEEL_TENANT),
        user=attrs.get(KEEL_USER),
        temporal_status=execution.status.name if execution.status else "UNKNOWN",
        started_at=execution.start_time,
        cost_usd=attrs.get(KEEL_COST_USD),
        tokens=attrs.get(KEEL_TOKENS),
    )
