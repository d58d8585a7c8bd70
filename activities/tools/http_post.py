"""The ``http_post`` tool: POST a JSON body to an allow-listed host, once per op_key downstream.

A destructive tool that requires approval (``activities/catalog.py``): the act phase only
previews the request (``preview``: the URL, the key and the body, nothing sent); the commit,
after the answer is verified and a person approved it, sends it.

The receiver is someone else's system, so Keel's own record (the gateway's, per op_key) cannot
stop a repeat there when a worker dies after sending and before recording. Every request
therefore carries an ``Idempotency-Key`` header derived from the op_key (Stripe's convention):
the same on every retry of one commit, different for every other write, and never generated.

The rest is ``http_get``'s (``activities/tools/http_get.py``): the same allow-list entries,
the address rule, the pinned connection, the one deadline, and the body read up to a byte cap
while it is decoded. Redirects are not followed: re-sending a write to another host is not
something a receiver's 3xx may decide. Failures are classified as ``http_get``'s are (5xx, 408,
409 and 429 retryable, honouring ``Retry-After``; other 4xx non-retryable). Not workflow code:
network I/O.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from datetime import timedelta

import httpx
from temporalio.exceptions import ApplicationError

from keel.activities.catalog import HttpPostArgs
from keel.activities.errors import (
    TOOL_FAILED,
    TOOL_PERMISSION,
    TOOL_TRANSIENT,
    classify_http_status,
    parse_retry_after,
)
from keel.activities.tools.base import PREVIEW_MAX_CHARS, ToolContext, tool_failed
from keel.activities.tools.http_get import (
    _ACCEPT_ENCODING,
    AllowEntry,
    HttpGet,
    _ip,
    _matching,
    _read_capped,
)

__all__ = ["IDEMPOTENCY_HEADER", "HttpPost", "idempotency_key"]

IDEMPOTENCY_HEADER = "Idempotency-Key"
_KEY_PREFIX = "keel-"
_ERROR_BODY_BYTES = 500


def idempotency_key(op_key: str) -> str:
    """The ``Idempotency-Key`` a write sends: a digest of its op_key, stable across retries.

    A digest rather than the op_key itself, so the receiver does not learn the job's ID (the
    tenant and the caller's request key).

    Args:
        op_key: The write's durable identity (``job_id:iteration:step``).

    Returns:
        ``keel-`` and 40 hex digits.
    """
    return _KEY_PREFIX + hashlib.sha256(op_key.encode()).hexdigest()[:40]


def _body_bytes(body: dict[str, object]) -> bytes:
    """The JSON body, serialised the same way on every attempt."""
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False, sort_keys=True).encode()


class HttpPost(HttpGet):
    """POST JSON to an allowed host and port with an Idempotency-Key; read a bounded reply.

    Built like ``HttpGet`` (the same client, allow-lists, byte cap and deadline); see there.
    """

    async def preview(self, args: HttpPostArgs, ctx: ToolContext) -> str:
        """Describe the request the commit would send; send nothing.

        The URL is checked against the tenant's allow-list now (not the address rule, which
        needs DNS and is applied when the request is sent), so an off-list host fails the step
        at once instead of after the answer is verified.

        Args:
            args: The URL and the JSON body.
            ctx: Whose allow-list applies, and the op_key the key is derived from.

        Returns:
            ``would POST <n> bytes of JSON to <url> (Idempotency-Key <key>): <body start>``.

        Raises:
            ApplicationError: ``TOOL_PERMISSION`` (non-retryable) for a URL off the allow-list.
        """
        _matching(httpx.URL(args.url), self._entries(ctx.tenant))
        body = _body_bytes(args.body).decode()
        head = (
            f"would POST {len(body.encode())} bytes of JSON to {args.url} "
            f"({IDEMPOTENCY_HEADER} {idempotency_key(ctx.op_key)}): "
        )
        return (head + body)[:PREVIEW_MAX_CHARS]

    async def __call__(self, args: HttpPostArgs, ctx: ToolContext) -> str:  # type: ignore[override]
        """Send the request (the commit).

        Args:
            args: The URL and the JSON body.
            ctx: Whose allow-list applies, and the op_key the Idempotency-Key is derived from.

        Returns:
            ``HTTP <status>`` and the reply's body, cut at ``max_bytes`` with a note saying so.

        Raises:
            ApplicationError: ``TOOL_PERMISSION`` (non-retryable) for a host off the allow-list
                or a non-public address it does not name, ``TOOL_TRANSIENT`` for timeouts,
                transport errors, 408, 409, 429 and 5xx (with ``Retry-After`` as the next
                delay), ``TOOL_FAILED`` for other 4xx, redirects and unknown hosts.
        """
        entries = self._entries(ctx.tenant)
        try:
            # One deadline for the whole call, as http_get has (see there).
            async with asyncio.timeout(self._timeout):
                return await self._post(httpx.URL(args.url), args.body, ctx.op_key, entries)
        except (TimeoutError, httpx.TimeoutException, httpx.TransportError) as e:
            raise ApplicationError(
                f"POST {args.url} failed: {type(e).__name__}: {e}", type=TOOL_TRANSIENT
            ) from None

    async def _post(
        self, url: httpx.URL, body: dict[str, object], op_key: str, entries: list[AllowEntry]
    ) -> str:
        address = await self._admit(url, entries)
        client = self._http_client()
        host = url.raw_host.decode("ascii")
        request = client.build_request(
            "POST",
            url.copy_with(host=address),
            content=_body_bytes(body),
            headers={
                "Host": url.netloc.decode("ascii"),
                "Content-Type": "application/json",
                "Accept-Encoding": _ACCEPT_ENCODING,
                IDEMPOTENCY_HEADER: idempotency_key(op_key),
            },
            extensions={} if _ip(host) is not None else {"sni_hostname": host},
        )
        resp = await client.send(request, stream=True)
        try:
            return await self._reply(url, resp)
        finally:
            await resp.aclose()

    async def _reply(self, url: httpx.URL, resp: httpx.Response) -> str:
        if resp.is_redirect:
            raise tool_failed(f"POST {url}: HTTP {resp.status_code} redirect not followed")
        if not resp.is_success:
            try:
                error_body, _ = await _read_capped(resp, _ERROR_BODY_BYTES)
            except ApplicationError:
                error_body = b""  # An undecodable error page must not hide its status.
            raise _classified(resp, error_body.decode("utf-8", errors="replace"))
        data, truncated = await _read_capped(resp, self._max_bytes)
        text = data.decode(resp.encoding or "utf-8", errors="replace")
        note = f"\n[truncated at {self._max_bytes} bytes]" if truncated else ""
        return f"HTTP {resp.status_code}\n{text}{note}"


def _classified(resp: httpx.Response, body: str) -> ApplicationError:
    """The error for a failed reply; a retryable 5xx honours ``Retry-After`` as 429 does."""
    retry_after = resp.headers.get("retry-after")
    err = classify_http_status(
        resp.status_code,
        body,
        retry_after=retry_after,
        transient_type=TOOL_TRANSIENT,
        rate_limited_type=TOOL_TRANSIENT,
        rejected_type=TOOL_FAILED,
        auth_type=TOOL_PERMISSION,
    )
    delay = parse_retry_after(retry_after)
    if not err.non_retryable and err.next_retry_delay is None and delay is not None:
        # A 503 with Retry-After says when the receiver expects to be back; Temporal's backoff
        # would otherwise retry sooner and spend attempts on a receiver known to be down.
        return ApplicationError(
            err.message, type=err.type, next_retry_delay=timedelta(seconds=delay)
        )
    return err
