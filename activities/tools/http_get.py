"""The ``http_get`` tool: GET a URL whose host and port are allow-listed, from a checked address.

The rules (issue 13: a prompt-injected plan must not reach the worker's own network):

- The allow-list names a host *and* a port: ``host:port``; ``host:*`` for any port, written
  out; a bare ``host`` for the scheme's default port (80 or 443). IPv6 goes in brackets
  (``[::1]:8080``). A tenant's own entries are added for that tenant's calls only.
- Every hop's host is resolved (``getaddrinfo`` in the loop's executor), and an address that is
  not public (loopback, private, link-local such as the cloud metadata 169.254.169.254,
  unspecified, multicast, or any of these embedded in IPv6) is refused unless the entry that
  admits the URL names that exact port or the IP itself: ``intranet:8080`` or ``10.0.0.5:*``,
  never ``intranet`` or ``intranet:*``.
- The request goes to the address that was checked, with the name kept in the Host header and
  TLS server name, so DNS cannot answer differently between the check and the connection
  (rebinding). The client does not use proxies from the environment for the same reason.
- Redirects are followed by hand, each hop checked like the first before it is contacted.

The body is read up to a byte cap and one deadline bounds the whole call. The cap applies to the
decoded body while it is decoded: a gzip or deflate body is inflated here a bounded piece at a
time, never by httpx (whose decoders expand a whole network read at once, so 48 KB of gzip
could become 50 MB before any cap applied); other content-codings are refused.

The tool is read-only, so the gateway may serve a cached result: ``cache_scope`` applies the
allow-list to the URL before any lookup, and keys results by the tenant's whole list and the
byte cap. Not workflow code: network I/O.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
import zlib
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import httpx
from temporalio.exceptions import ApplicationError

from keel.activities.catalog import HttpGetArgs
from keel.activities.errors import (
    TOOL_FAILED,
    TOOL_PERMISSION,
    TOOL_TRANSIENT,
    bounded,
    classify_http_status,
)
from keel.activities.tools.base import ToolContext, tool_failed

__all__ = ["DEFAULT_PORTS", "AllowEntry", "HttpGet", "parse_allow_list", "resolve_host"]

_MAX_REDIRECTS = 5
DEFAULT_PORTS = {"http": 80, "https": 443}
"""The schemes http_get speaks and the port a bare allow-list host stands for."""
_HOST = re.compile(r"[a-z0-9_.-]+")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Awaitable[list[str]]]
"""``(host, port) -> addresses``; ``resolve_host`` unless a test fakes DNS."""
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_ACCEPT_ENCODING = "gzip, deflate"
"""The content-codings ``_Inflate`` undoes; sent explicitly so a later httpx extra (brotli,
zstandard) cannot make the client ask for one this module would have to refuse."""


@dataclass(frozen=True)
class AllowEntry:
    """One allow-list entry: a host (a lowercase name or a normalised IP) and its port."""

    host: str
    port: int | Literal["*"] | None
    """An exact port, ``"*"`` for any port, or None for the scheme's default port."""

    def admits(self, host: str, port: int, scheme: str) -> bool:
        """Whether a URL with this host, effective port and scheme is on this entry."""
        if host != self.host:
            return False
        if self.port == "*":
            return True
        return port == (DEFAULT_PORTS[scheme] if self.port is None else self.port)

    @property
    def names_address(self) -> bool:
        """True when the entry may reach a non-public address: an exact port, or an IP."""
        return isinstance(self.port, int) or _ip(self.host) is not None


def parse_allow_list(entries: Iterable[str]) -> list[AllowEntry]:
    """Parse allow-list entries (``host:port``, ``host:*``, ``host``, ``[v6]:port``).

    Args:
        entries: The entries; blank ones are skipped.

    Returns:
        The parsed entries.

    Raises:
        ValueError: If an entry is malformed, naming the entry.
    """
    return [_parse_entry(e.strip()) for e in entries if e.strip()]


def _parse_entry(entry: str) -> AllowEntry:
    if entry.startswith("["):
        end = entry.find("]")
        host_text, rest = entry[: end + 1], entry[end + 1 :]
        if end < 0 or (rest and not rest.startswith(":")):
            raise ValueError(f"allow-list entry {entry!r}: expected [IPv6] or [IPv6]:port")
        port_text = rest[1:] if rest else None
    elif entry.count(":") > 1:
        raise ValueError(f"allow-list entry {entry!r}: write IPv6 in brackets, as [::1]:8080")
    else:
        host_text, colon, after = entry.partition(":")
        port_text = after if colon else None
    try:
        host = _host_of(httpx.URL(f"http://{host_text}/"))
    except httpx.InvalidURL:
        host = ""
    if not host:
        raise ValueError(f"allow-list entry {entry!r}: not a host name or IP address")
    if port_text is None or port_text == "*":
        return AllowEntry(host, "*" if port_text else None)
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"allow-list entry {entry!r}: the port must be 1-65535 or *")
    return AllowEntry(host, int(port_text))


def _host_of(url: httpx.URL) -> str:
    """A URL's host as entries are compared: lowercase ASCII, no trailing dot, IPs normalised.

    Returns:
        The host, or ``""`` when the URL has no usable host.
    """
    host = url.raw_host.decode("ascii").lower().rstrip(".")
    ip = _ip(host)
    if ip is not None:
        return str(ip)
    return host if _HOST.fullmatch(host) else ""


def _ip(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _public(address: IPAddress) -> bool:
    """True for a public unicast address, including what an IPv6 address embeds."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour
        if embedded is None and address.teredo is not None:
            embedded = address.teredo[1]
        if embedded is None and address in _NAT64:
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if embedded is not None and not _public(embedded):
            return False
    return address.is_global and not address.is_multicast


async def resolve_host(host: str, port: int) -> list[str]:
    """The addresses ``host`` resolves to, looked up off the event loop.

    Raises:
        socket.gaierror: When the name does not resolve.
    """
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


def _refused(message: str) -> ApplicationError:
    return ApplicationError(bounded(message), type=TOOL_PERMISSION, non_retryable=True)


class HttpGet:
    """GET a URL on an allowed host and port; stream at most ``max_bytes`` of the body."""

    def __init__(
        self,
        http_client: Callable[[], httpx.AsyncClient],
        allowed_hosts: Iterable[str],
        max_bytes: int,
        timeout: float,
        *,
        allowed_by_tenant: Mapping[str, Iterable[str]] | None = None,
        resolve: Resolver = resolve_host,
    ) -> None:
        """Bind the tool to its client, allow-lists and limits.

        Args:
            http_client: Returns the worker's shared client (``ToolRegistry.http_client``).
            allowed_hosts: Entries every tenant may fetch (see the module docstring).
            max_bytes: Most body bytes read; the rest is cut off and noted.
            timeout: Seconds for the whole call, resolution, redirects and body included.
            allowed_by_tenant: Extra entries per tenant, added to ``allowed_hosts`` for calls
                of that tenant only.
            resolve: How host names become addresses.

        Raises:
            ValueError: If an allow-list entry is malformed.
        """
        self._http_client = http_client
        self._allowed = parse_allow_list(allowed_hosts)
        self._by_tenant = {t: parse_allow_list(e) for t, e in (allowed_by_tenant or {}).items()}
        self._resolve = resolve
        self._max_bytes = max_bytes
        self._timeout = timeout

    async def __call__(self, args: HttpGetArgs, ctx: ToolContext) -> str:
        """Fetch ``args.url``.

        Args:
            args: The URL.
            ctx: Who the call runs for: its tenant's allow-list entries apply.

        Returns:
            ``HTTP <status>`` and the body, cut at ``max_bytes`` with a note saying so.

        Raises:
            ApplicationError: ``TOOL_PERMISSION`` (non-retryable) for a host and port off the
                allow-list or a non-public address it does not name (on any hop),
                ``TOOL_TRANSIENT`` for timeouts, transport errors, 429 and 5xx, ``TOOL_FAILED``
                for other 4xx, unknown hosts and redirect loops.
        """
        entries = self._entries(ctx.tenant)
        try:
            # One deadline for the whole call: httpx's timeout is per operation, so a server
            # dripping bytes could otherwise outlast the activity's start_to_close_timeout.
            async with asyncio.timeout(self._timeout):
                return await self._fetch(httpx.URL(args.url), entries)
        except (TimeoutError, httpx.TimeoutException, httpx.TransportError) as e:
            raise ApplicationError(
                f"GET {args.url} failed: {type(e).__name__}: {e}", type=TOOL_TRANSIENT
            ) from None

    async def cache_scope(self, args: HttpGetArgs, ctx: ToolContext) -> dict[str, Any]:
        """Refuse an off-list URL before a cache lookup; key results by what shapes them.

        The first hop's host and port are checked against the tenant's allow-list exactly as
        a fetch checks them, so a host removed from the list is refused even when a result is
        cached. Every entry the tenant has is part of the key too: a redirect's later hops
        were checked against the list the result was fetched under, so any change to the list
        makes earlier results unreachable. The address rule needs DNS and guards the
        connection a hit never makes, so it is not applied here.

        Args:
            args: The URL.
            ctx: Whose allow-list applies.

        Returns:
            The tenant's allow-list entries and the body cap (a different cap cuts the body
            elsewhere).

        Raises:
            ApplicationError: ``TOOL_PERMISSION`` (non-retryable) for a URL off the allow-list.
        """
        entries = self._entries(ctx.tenant)
        _matching(httpx.URL(args.url), entries)
        return {
            "allow": sorted([e.host, str(e.port)] for e in entries),
            "max_bytes": self._max_bytes,
        }

    def _entries(self, tenant: str) -> list[AllowEntry]:
        """The allow-list a call of ``tenant`` is checked against."""
        return [*self._allowed, *self._by_tenant.get(tenant, ())]

    async def _fetch(self, url: httpx.URL, entries: list[AllowEntry]) -> str:
        client = self._http_client()
        # Redirects are followed by hand so every hop is checked *before* it is contacted.
        for _ in range(_MAX_REDIRECTS + 1):
            address = await self._admit(url, entries)
            resp = await client.send(_pinned(client, url, address), stream=True)
            try:
                location = resp.headers.get("location")
                if resp.is_redirect and location:
                    url = url.join(location)
                    continue
                return await self._read(resp)
            finally:
                await resp.aclose()
        raise tool_failed(f"GET {url}: more than {_MAX_REDIRECTS} redirects")

    async def _admit(self, url: httpx.URL, entries: list[AllowEntry]) -> str:
        """Apply the allow-list and the address rule to one hop; return the address to use."""
        host, port, matching = _matching(url, entries)
        addresses = await self._addresses(host, port)
        if not any(e.names_address for e in matching) and not all(map(_public, addresses)):
            # The address is not repeated: it would tell the model about the private network.
            raise _refused(
                f"{host} resolves to a loopback, private or link-local address, which only an "
                f"allow-list entry naming the exact port ({host}:{port}) or the IP may reach"
            )
        return str(addresses[0])

    async def _addresses(self, host: str, port: int) -> list[IPAddress]:
        literal = _ip(host)
        if literal is not None:
            return [literal]
        try:
            found = [ipaddress.ip_address(a) for a in await self._resolve(host, port)]
        except socket.gaierror as e:
            if e.errno == socket.EAI_AGAIN:
                raise ApplicationError(f"cannot resolve {host} now", type=TOOL_TRANSIENT) from None
            raise tool_failed(f"cannot resolve {host}: {e.strerror}") from None
        if not found:
            raise tool_failed(f"{host} resolves to no address")
        return found

    async def _read(self, resp: httpx.Response) -> str:
        if not resp.is_success:
            try:
                body, _ = await _read_capped(resp, 500)
            except ApplicationError:
                body = b""  # An undecodable error page must not hide the status it came with.
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


def _matching(url: httpx.URL, entries: list[AllowEntry]) -> tuple[str, int, list[AllowEntry]]:
    """The URL's host and effective port, and the entries that admit them.

    Raises:
        ApplicationError: ``TOOL_PERMISSION`` (non-retryable) when no entry admits the URL.
    """
    host = _host_of(url)
    if url.scheme not in DEFAULT_PORTS or not host:
        raise _refused(f"http_get fetches http and https URLs with a host, not {url}")
    port = url.port or DEFAULT_PORTS[url.scheme]
    matching = [e for e in entries if e.admits(host, port, url.scheme)]
    if not matching:
        raise _refused(f"{host}:{port} is not on the http_get allow-list")
    return host, port, matching


def _pinned(client: httpx.AsyncClient, url: httpx.URL, address: str) -> httpx.Request:
    """A GET of ``url`` sent to ``address``: the Host header and TLS name keep the URL's host."""
    host = url.raw_host.decode("ascii")
    tls_name = {} if _ip(host) is not None else {"sni_hostname": host}
    return client.build_request(
        "GET",
        url.copy_with(host=address),
        headers={"Host": url.netloc.decode("ascii"), "Accept-Encoding": _ACCEPT_ENCODING},
        extensions=tls_name,
    )


async def _read_capped(resp: httpx.Response, limit: int) -> tuple[bytes, bool]:
    """Read at most ``limit`` decoded body bytes; return them and whether the body was longer.

    The raw bytes are decoded here so the cap holds *while* decoding: at most one network read
    and ``limit + 1`` decoded bytes are held at any time, however far the body would expand.

    Raises:
        ApplicationError: ``TOOL_FAILED`` (non-retryable) for a content-coding other than gzip
            or deflate, or a compressed body that is not valid.
    """
    inflate = _Inflate.for_coding(resp.headers.get("content-encoding", ""))
    buf = bytearray()
    async for raw in resp.aiter_raw():
        room = limit + 1 - len(buf)
        buf.extend(raw[:room] if inflate is None else inflate.feed(raw, room))
        if len(buf) > limit:
            return bytes(buf[:limit]), True
    return bytes(buf), False


class _Inflate:
    """Undoes a gzip or deflate content-coding, never producing more than the caller has room for.

    zlib's ``max_length`` bounds each step's output; input it has not yet used waits in
    ``unconsumed_tail`` and is only inflated while there is room for what it expands to.
    """

    def __init__(self, coding: str) -> None:
        self._coding = coding
        # 16 + MAX_WBITS: a gzip header and trailer; MAX_WBITS: a zlib stream (deflate).
        self._zlib = zlib.decompressobj(16 + zlib.MAX_WBITS if "gzip" in coding else zlib.MAX_WBITS)
        self._started = False

    @classmethod
    def for_coding(cls, header: str) -> _Inflate | None:
        """The inflater for a Content-Encoding header; None for an identity (plain) body.

        Raises:
            ApplicationError: ``TOOL_FAILED`` for any other coding, or more than one.
        """
        codings = [c.strip().lower() for c in header.split(",") if c.strip()]
        codings = [c for c in codings if c != "identity"]
        if not codings:
            return None
        if len(codings) == 1 and codings[0] in ("gzip", "x-gzip", "deflate"):
            return cls(codings[0])
        raise tool_failed(f"http_get reads gzip or deflate bodies, not {', '.join(codings)}")

    def feed(self, data: bytes, room: int) -> bytes:
        """Inflate ``data`` into at most ``room`` bytes (``room`` >= 1).

        Returns:
            The decoded bytes; exactly ``room`` of them means there may be more, and the caller
            stops reading (it asks for one byte more than its cap to tell).

        Raises:
            ApplicationError: ``TOOL_FAILED`` when the body is not valid for its coding.
        """
        out = bytearray()
        pending = data
        while pending and not self._zlib.eof and len(out) < room:
            try:
                out.extend(self._zlib.decompress(pending, room - len(out)))
            except zlib.error:
                if self._coding == "deflate" and not self._started:
                    # Some servers send a raw deflate stream without the zlib wrapper that
                    # RFC 9110 asks for; httpx accepts those too.
                    self._zlib = zlib.decompressobj(-zlib.MAX_WBITS)
                    self._started = True
                    continue
                raise tool_failed(f"the body is not valid {self._coding} data") from None
            self._started = True
            pending = self._zlib.unconsumed_tail
        return bytes(out)
