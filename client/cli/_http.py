"""The job commands' fast path: reads through Keel's HTTP API when ``KEEL_API_URL`` is set.

``keel status`` and ``keel list`` answer through the API (``keel api``, which ``keel dev``
starts) instead of connecting to Temporal themselves: the API process keeps one warm Temporal
client, so the command loads neither the Temporal SDK nor its protobufs, which cost every
direct command about a quarter of a second before it does anything. Uses the standard
library's HTTP client for the same reason. Errors come back as the client's own errors, so
the commands print and exit exactly as on the direct path.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from keel.client.cli._common import API_KEY_ENV, API_URL_ENV
from keel.client.errors import AgentJobError, InvalidJobRequest, JobNotFound

__all__ = ["ApiUnavailable", "api_error", "auth_headers", "get_json"]

TIMEOUT_SECONDS = 15.0
"""A read waits this long for the API (which itself bounds its Temporal query at 10 s)."""


class ApiUnavailable(AgentJobError):
    """Keel's HTTP API at ``KEEL_API_URL`` could not be reached."""

    def __init__(self, url: str, detail: str) -> None:
        super().__init__(
            f"cannot reach Keel's API at {url} ({detail}); start `keel dev`, "
            f"or unset {API_URL_ENV} to talk to Temporal directly"
        )


def auth_headers() -> dict[str, str]:
    """The ``Authorization`` header for the key in ``KEEL_API_KEY``, if one is set."""
    key = os.environ.get(API_KEY_ENV, "").strip()
    return {"Authorization": f"Bearer {key}"} if key else {}


def get_json(base: str, path: str, params: dict[str, Any] | None = None) -> Any:
    """GET ``base + path`` and return the decoded JSON body.

    Raises:
        JobNotFound: On a 404 for a job.
        InvalidJobRequest: On a 400 or 422 (the field the API named).
        ApiUnavailable: If the API does not answer.
        AgentJobError: On any other error status, with the API's message.
    """
    query = {k: v for k, v in (params or {}).items() if v is not None}
    url = base + path + (f"?{urllib.parse.urlencode(query)}" if query else "")
    headers = {"Accept": "application/json"} | auth_headers()
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_SECONDS) as response:
            return json.load(response)
    except urllib.error.HTTPError as err:
        raise _api_error(err, path) from None
    except (urllib.error.URLError, TimeoutError, ConnectionError) as err:
        reason = getattr(err, "reason", err)
        raise ApiUnavailable(base, str(reason)) from None


def _api_error(err: urllib.error.HTTPError, path: str) -> AgentJobError:
    return api_error(err.code, err.read(), path)


def api_error(status: int, body: bytes, path: str) -> AgentJobError:
    """The client error an API error response stands for (the API's code and message).

    Args:
        status: The HTTP status.
        body: The response body (the API's JSON error, or anything else).
        path: The request path; a job's ID is its last segment (or the one before it).
    """
    try:
        error = json.loads(body).get("error", {})
    except (ValueError, AttributeError):
        error = {}
    message = str(error.get("message") or f"HTTP {status} from {path}")
    if status == 404 and error.get("code") == "job_not_found":
        segments = path.strip("/").split("/")
        job = segments[2] if len(segments) > 2 and segments[:2] == ["v1", "jobs"] else path
        return JobNotFound(urllib.parse.unquote(job))
    if status == 401:
        return AgentJobError(f"Keel's API refused the key in {API_KEY_ENV}: {message}")
    if status in (400, 422):
        field = str(error.get("field") or "request")
        return InvalidJobRequest(field, message.removeprefix(f"{field}: "))
    return AgentJobError(message)
