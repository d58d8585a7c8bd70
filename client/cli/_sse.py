"""``keel watch`` through the API: a job's Server-Sent Events, reconnecting where it left off.

A dropped connection (an API restart, a proxy timeout) reconnects with the last event's ID as
``Last-Event-ID``, so the watcher misses nothing and sees nothing twice; it gives up after
RECONNECTS failures in a row. Errors the API answers with become the client's own errors.
"""

from __future__ import annotations

import asyncio
import urllib.parse
from collections.abc import AsyncIterator

import httpx
from pydantic import BaseModel

from keel.activities.answer_tokens import TokenDelta
from keel.client._events import JobStreamEvent
from keel.client.cli._http import ApiUnavailable, api_error, auth_headers
from keel.workflows.types import JobProgress, JobResult

__all__ = ["api_events"]

RECONNECTS = 5
"""Connection failures in a row before the watcher gives up."""
_DATA: dict[str, type[BaseModel]] = {"progress": JobProgress, "token": TokenDelta, "end": JobResult}
"""The model of each event's data; events of other names (a newer API's) are skipped."""
READ_TIMEOUT_SECONDS = 60.0
"""The API pings an idle stream every 15 s; a minute of silence means the connection is gone."""


async def api_events(base: str, job_id: str) -> AsyncIterator[JobStreamEvent]:
    """The job's events from ``base``'s events endpoint, until (and with) its ``end`` event.

    Raises:
        JobNotFound: If the job does not exist or is another tenant's.
        ApiUnavailable: If the API cannot be reached RECONNECTS times in a row.
        AgentJobError: On any other error the API answers with.
    """
    path = f"/v1/jobs/{urllib.parse.quote(job_id, safe='')}/events"
    last_id: str | None = None
    failures = 0
    timeout = httpx.Timeout(10.0, read=READ_TIMEOUT_SECONDS)
    async with httpx.AsyncClient(base_url=base, timeout=timeout) as http:
        while True:
            headers = auth_headers() | ({"Last-Event-ID": last_id} if last_id else {})
            try:
                async with http.stream("GET", path, headers=headers) as response:
                    if response.status_code != 200:
                        raise api_error(response.status_code, await response.aread(), path)
                    async for event in _parse(response.aiter_lines()):
                        last_id, failures = event.id, 0
                        yield event
                        if event.event == "end":
                            return
            except httpx.TransportError as err:
                failures += 1
                if failures > RECONNECTS:
                    raise ApiUnavailable(base, str(err) or type(err).__name__) from None
                await asyncio.sleep(min(0.25 * 2**failures, 5.0))


async def _parse(lines: AsyncIterator[str]) -> AsyncIterator[JobStreamEvent]:
    """Events from SSE lines (comments and keep-alive pings skipped)."""
    fields: dict[str, str] = {}
    async for line in lines:
        if line:
            name, _, value = line.partition(":")
            if name:
                value = value.removeprefix(" ")
                fields[name] = f"{fields[name]}\n{value}" if name in fields else value
            continue
        model = _DATA.get(fields.get("event", ""))
        if model is not None and "data" in fields:
            data = model.model_validate_json(fields["data"])
            yield JobStreamEvent(id=fields.get("id", ""), event=fields["event"], data=data)  # type: ignore[arg-type]
        fields = {}
