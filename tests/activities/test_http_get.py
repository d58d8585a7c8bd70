"""``http_get`` caps a compressed body while decoding it (issue 16).

A local HTTP server answers with bodies sent ``Content-Encoding: gzip`` or ``deflate``: a gzip
bomb (64 MiB that compress to about 64 KiB), small valid bodies, a coding the tool does not
speak and a broken stream. The tool is called as the gateway calls it, through a real
``httpx`` client.
"""

from __future__ import annotations

import gzip
import threading
import tracemalloc
import zlib
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from temporalio.exceptions import ApplicationError

from keel.activities import errors
from keel.activities.catalog import HttpGetArgs
from keel.activities.tools import ToolContext, ToolRegistry
from keel.activities.tools.http_get import HttpGet

MAX_BYTES = 50_000
BOMB = gzip.compress(b"a" * (64 << 20), compresslevel=9)
"""64 MiB of one letter, about 64 KiB on the wire."""
TEXT = "Keel reads compressed pages. " * 40
DEFLATED = zlib.compress(TEXT.encode())
RAW_DEFLATED = zlib.compress(TEXT.encode(), wbits=-zlib.MAX_WBITS)

ROUTES: dict[str, tuple[int, str, bytes]] = {
    "/bomb": (200, "gzip", BOMB),
    "/gzip": (200, "gzip", gzip.compress(TEXT.encode())),
    "/deflate": (200, "deflate", DEFLATED),
    "/raw-deflate": (200, "deflate", RAW_DEFLATED),
    "/identity": (200, "identity", TEXT.encode()),
    "/brotli": (200, "br", b"\x8b\x03\x80hello\x03"),
    "/broken": (200, "gzip", b"\x1f\x8b not gzip at all"),
    "/503-bomb": (503, "gzip", BOMB),
}


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server API)
        self.server.accept_encoding.append(self.headers["Accept-Encoding"])  # type: ignore[attr-defined]
        status, coding, body = ROUTES[self.path]
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Encoding", coding)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def server() -> Iterator[ThreadingHTTPServer]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.accept_encoding = []  # type: ignore[attr-defined]
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
async def fetch(server: ThreadingHTTPServer) -> AsyncIterator[HttpGet]:
    registry = ToolRegistry()
    yield HttpGet(registry.http_client, [f"127.0.0.1:{server.server_port}"], MAX_BYTES, 10.0)
    await registry.aclose()


async def get(tool: HttpGet, server: ThreadingHTTPServer, path: str) -> str:
    url = f"http://127.0.0.1:{server.server_port}{path}"
    return await tool(HttpGetArgs(url=url), ToolContext("agent-job-1", "t-http", "op", None))


async def test_a_gzip_bomb_is_cut_at_the_cap_without_inflating_it(
    fetch: HttpGet, server: ThreadingHTTPServer
) -> None:
    await get(fetch, server, "/gzip")  # the client and its connection exist before measuring
    tracemalloc.start()
    try:
        text = await get(fetch, server, "/bomb")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert text == f"HTTP 200\n{'a' * MAX_BYTES}\n[truncated at {MAX_BYTES} bytes]"
    # One network read, the decoded cap and the text built from it, not 64 MiB (nor the
    # 1,000-fold expansion of a single 64 KiB read, as when httpx decoded the body).
    assert peak < 4 << 20, f"peak {peak / 2**20:.1f} MiB"


@pytest.mark.parametrize("path", ["/gzip", "/deflate", "/raw-deflate", "/identity"])
async def test_compressed_bodies_within_the_cap_read_whole(
    fetch: HttpGet, server: ThreadingHTTPServer, path: str
) -> None:
    assert await get(fetch, server, path) == f"HTTP 200\n{TEXT}"


async def test_the_tool_asks_only_for_codings_it_decodes(
    fetch: HttpGet, server: ThreadingHTTPServer
) -> None:
    await get(fetch, server, "/gzip")
    assert server.accept_encoding[-1] == "gzip, deflate"  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("path", "says"),
    [("/brotli", "gzip or deflate bodies, not br"), ("/broken", "not valid gzip")],
)
async def test_other_codings_and_broken_streams_fail_without_retries(
    fetch: HttpGet, server: ThreadingHTTPServer, path: str, says: str
) -> None:
    with pytest.raises(ApplicationError) as raised:
        await get(fetch, server, path)
    assert raised.value.type == errors.TOOL_FAILED and raised.value.non_retryable
    assert says in raised.value.message


async def test_an_error_page_is_capped_too_and_keeps_its_status(
    fetch: HttpGet, server: ThreadingHTTPServer
) -> None:
    with pytest.raises(ApplicationError) as raised:
        await get(fetch, server, "/503-bomb")
    assert raised.value.type == errors.TOOL_TRANSIENT and not raised.value.non_retryable
    # The detail's own limit (errors.bounded): cut to 500 characters, saying it was cut.
    assert raised.value.message == errors.bounded(f"HTTP 503: {'a' * 500}")
    assert len(raised.value.message) == 500 and raised.value.message.endswith("(510 chars)")
