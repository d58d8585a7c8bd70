"""The ``http_get`` tool: GET a URL on an allowed host and return the start of its body.

Every redirect hop's host is checked before it is contacted, the body is read up to a byte cap,
and one deadline bounds the whole call. Not workflow code: network I/O.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from urllib.parse import urlsplit

import httpx
from temporalio.exceptions import ApplicationError

from keel.activities.catalog import HttpGetArgs
from keel.activities.errors import (
    TOOL_FAILED,
    TOOL_PERMISSION,
    TOOL_TRANSIENT,
    classify_http_status,
)
from keel.activities.tools.base import ToolContext, tool_failed

__all__ = ["HttpGet"]

_MAX_REDIRECTS = 5


class HttpGet:
    """GET a URL on an allowed host; stream at most ``max_bytes`` of the body."""

    def __init__(
        self,
        http_client: Callable[[], httpx.AsyncClient],
        allowed_hosts: list[str],
        max_bytes: int,
        timeout: float,
    ) -> None:
        """Bind the tool to its client and limits.

        Args:
            http_client: Returns the worker's shared client (``ToolRegistry.http_client``).
            allowed_hosts: Hostnames that may be fetched; ports are ignored.
            max_bytes: Most body bytes read; the rest is cut off and noted.
            timeout: Seconds for the whole call, redirects and body included.
        """
        self._http_client = http_client
        self._allowed = {h.strip().lower().rstrip(".") for h in allowed_hosts if h.strip()}
        self._max_bytes = max_bytes
        self._timeout = timeout

    def _check_host(self, url: str | httpx.URL) -> None:
        host = (urlsplit(str(url)).hostname or "").lower().rstrip(".")
        if host not in self._allowed:
            raise ApplicationError(
                f"host {host!r} is not on the http_get allow-list",
                type=TOOL_PERMISSION,
                non_retryable=True,
            )

    async def __call__(self, args: HttpGetArgs, ctx: ToolContext) -> str:
        """Fetch ``args.url``.

        Args:
            args: The URL.
            ctx: Who the call runs for (unused: a read has no key).

        Returns:
            ``HTTP <status>`` and the body, cut at ``max_bytes`` with a note saying so.

        Raises:
            ApplicationError: ``TOOL_PERMISSION`` for a host off the allow-list (on any hop),
                ``TOOL_TRANSIENT`` for timeouts, transport errors, 429 and 5xx, ``TOOL_FAILED``
                for other 4xx and redirect loops.
        """
        self._check_host(args.url)
        try:
            # One deadline for the whole call: httpx's timeout is per operation, so a server
            # dripping bytes could otherwise outlast the activity's start_to_close_timeout.
            async with asyncio.timeout(self._timeout):
                return await self._fetch(args.url)
        except (TimeoutError, httpx.TimeoutException, httpx.TransportError) as e:
            raise ApplicationError(
                f"GET {args.url} failed: {type(e).__name__}: {e}", type=TOOL_TRANSIENT
            ) from None

    async def _fetch(self, url: str) -> str:
        client = self._http_client()
        request = client.build_request("GET", url)
        # Redirects are followed by hand so every hop's host is checked *before* it is contacted.
        for _ in range(_MAX_REDIRECTS + 1):
            self._check_host(request.url)
            resp = await client.send(request, stream=True)
            try:
                if resp.is_redirect and resp.next_request is not None:
                    request = resp.next_request
                    continue
                return await self._read(resp)
            finally:
                await resp.aclose()
        raise tool_failed(f"GET {url}: more than {_MAX_REDIRECTS} redirects")

    async def _read(self, resp: httpx.Response) -> str:
        if not resp.is_success:
            body, _ = await _read_capped(resp, 500)
            raise classify_http_status(
                resp.status_code,
                body.decode("utf-8", errors="replace"),
                retry_after=resp.headers.get("retry-after"),
                transient_type=TOOL_TRANSIENT,
                rate_limited_type=TOOL_TRANSIENT,
                rejected_type=TOOL_FAILED,
                auth_type=TOOL_PERMISSION,
            )
        data, truncated = await _read_capped(resp, self._max_bytes)
        text = data.decode(resp.encoding or "utf-8", errors="replace")
        note = f"\n[truncated at {self._max_bytes} bytes]" if truncated else ""
        return f"HTTP {resp.status_code}\n{text}{note}"


async def _read_capped(resp: httpx.Response, limit: int) -> tuple[bytes, bool]:
    """Read at most ``limit`` body bytes; return them and whether the body was longer."""
    buf = bytearray()
    async for chunk in resp.aiter_bytes():
        buf.extend(chunk)
        if len(buf) > limit:
            return bytes(buf[:limit]), True
    return bytes(buf), False
