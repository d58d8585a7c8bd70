"""Destructive tools through the gateway (issue 16): dry runs, commits and ``http_post``.

``http_post`` talks to a real local HTTP receiver that records every request it got (headers
and body), run through ``ActivityEnvironment`` with the real gateway, registry and Redis.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import redis.asyncio as aioredis
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from keel.activities import errors
from keel.activities.catalog import BUILTIN_TOOLS, ToolInfo, WriteNoteArgs
from keel.activities.retrieval import Retriever
from keel.activities.store import KeelStore, note_keys
from keel.activities.tools import ToolActivities, ToolContext, ToolRegistry
from keel.activities.tools.http_post import IDEMPOTENCY_HEADER, idempotency_key
from keel.activities.types import ToolCall, ToolResult
from tests.conftest import reply, serving

MAX_BYTES = 2_000


@dataclasses.dataclass
class Received:
    """One request the receiver got."""

    path: str
    key: str | None
    content_type: str | None
    body: Any


class Receiver(ThreadingHTTPServer):
    """A webhook receiver that records what it got and answers by path.

    ``/hook`` accepts; ``/flaky`` answers 503 (Retry-After: 2) to the first request carrying a
    key and accepts the next, as a receiver that failed mid-deploy would; ``/big`` replies with
    more than the tool reads; the rest answer with the status their name says.
    """

    def __init__(self) -> None:
        self.received: list[Received] = []
        self.accepted: Counter[str] = Counter()
        """Keys of requests answered 2xx: each is one logical commit on the receiver's side."""
        self._lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _ReceiverHandler)

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{path}"

    def record(self, got: Received) -> tuple[int, dict[str, str], bytes]:
        with self._lock:
            seen = sum(1 for r in self.received if r.key == got.key and r.path == got.path)
            self.received.append(got)
            status, headers, body = _answer(got.path, seen)
            if 200 <= status < 300 and got.key is not None:
                self.accepted[got.key] += 1
            return status, headers, body


def _answer(path: str, seen: int) -> tuple[int, dict[str, str], bytes]:
    if path == "/flaky" and seen == 0:
        return 503, {"Retry-After": "2"}, b"deploying"
    routes: dict[str, tuple[int, dict[str, str], bytes]] = {
        "/hook": (200, {}, b'{"ok": true}'),
        "/flaky": (200, {}, b'{"ok": true, "after": "retry"}'),
        "/big": (200, {}, b"B" * (MAX_BYTES * 5)),
        "/429": (429, {"Retry-After": "7"}, b"slow down"),
        "/400": (400, {}, b"bad body"),
        "/401": (401, {}, b"who are you"),
        "/307": (307, {"Location": "/hook"}, b""),
    }
    return routes.get(path, (404, {}, b"unknown"))


class _ReceiverHandler(BaseHTTPRequestHandler):
    server: Receiver

    def do_POST(self) -> None:  # noqa: N802 (http.server API)
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        got = Received(
            path=self.path,
            key=self.headers.get(IDEMPOTENCY_HEADER),
            content_type=self.headers.get("Content-Type"),
            body=json.loads(raw) if raw else None,
        )
        reply(self, *self.server.record(got))

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with serving(Receiver()) as server:
        yield server


@pytest.fixture
def store(redis_client: aioredis.Redis) -> KeelStore:
    return KeelStore(redis_client)


@pytest.fixture
async def acts(store: KeelStore, receiver: Receiver) -> AsyncIterator[ToolActivities]:
    allowed = [f"127.0.0.1:{receiver.server_address[1]}"]
    registry = ToolRegistry.builtin(store, Retriever(), allowed, http_max_bytes=MAX_BYTES)
    yield ToolActivities(registry, store)
    await registry.aclose()


def post(url: str, *, op_key: str | None = None, dry_run: bool = False, **kw: Any) -> ToolCall:
    return ToolCall(
        job_id="agent-job-w",
        tenant=kw.pop("tenant", "acme"),
        op_key=op_key or f"agent-job-w:0:{uuid.uuid4().hex[:8]}",
        tool=kw.pop("tool", "http_post"),
        args=kw.pop("args", {"url": url, "body": {"text": "deployed", "n": 3}}),
        allowed_tools=["http_post", "write_note", "calculator"],
        dry_run=dry_run,
    )


async def run(acts: ToolActivities, call: ToolCall, attempt: int = 1) -> ToolResult:
    env = ActivityEnvironment()
    env.info = dataclasses.replace(env.info, attempt=attempt)
    return await env.run(acts.execute_tool, call)


async def fails(acts: ToolActivities, call: ToolCall, attempt: int = 1) -> ApplicationError:
    with pytest.raises(ApplicationError) as info:
        await run(acts, call, attempt)
    return info.value


# --- annotations ------------------------------------------------------------------------------


def test_every_builtin_tool_declares_its_annotations() -> None:
    declared = {name: info.annotations() for name, info in BUILTIN_TOOLS.items()}
    read = {"read_only": True, "destructive": False, "idempotent": True}
    assert declared == {
        "calculator": read | {"requires_approval": False},
        "http_get": read | {"requires_approval": False},
        "search_docs": read | {"requires_approval": False},
        "write_note": {
            "read_only": False,
            "destructive": True,
            "idempotent": True,
            "requires_approval": False,
        },
        "http_post": {
            "read_only": False,
            "destructive": True,
            "idempotent": False,
            "requires_approval": True,
        },
    }
    # The cacheable tools are exactly the read-only ones with a TTL; no write is cacheable.
    assert {n for n, t in BUILTIN_TOOLS.items() if t.cacheable} == {"calculator", "http_get"}
    assert all(not t.cacheable for t in BUILTIN_TOOLS.values() if t.side_effecting)


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"destructive": True}, "destructive but not side-effecting"),
        ({"side_effecting": True, "requires_approval": True}, "requires approval but is not"),
        ({"read_only": True, "destructive": True}, "destructive but not side-effecting"),
    ],
)
def test_tool_info_refuses_inconsistent_annotations(kw: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ToolInfo("t", "A tool.", WriteNoteArgs, **kw)


def test_registry_refuses_a_destructive_tool_without_a_preview() -> None:
    async def write(args: Any, ctx: ToolContext) -> str:
        return "done"

    info = ToolInfo("w", "Writes.", WriteNoteArgs, side_effecting=True, destructive=True)
    with pytest.raises(ValueError, match="must implement preview"):
        ToolRegistry().register(info, write)


# --- dry runs ---------------------------------------------------------------------------------


async def test_write_note_dry_run_previews_and_writes_nothing(
    acts: ToolActivities, redis_client: aioredis.Redis
) -> None:
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    args = {"title": "Release", "body": "Shipped 0.3 " * 100}
    call = post("", tenant=tenant, tool="write_note", args=args, dry_run=True)
    result = await run(acts, call)
    assert result.preview and not result.requires_approval
    assert result.content.startswith('would write note "Release" (1200 characters): Shipped')
    assert len(result.content) <= 600
    assert await redis_client.exists(*note_keys(tenant, call.op_key)) == 0

    committed = await run(acts, call.model_copy(update={"dry_run": False}))
    assert not committed.preview and "written" in committed.content
    assert await redis_client.exists(note_keys(tenant, call.op_key)[0]) == 1


async def test_dry_run_of_a_read_only_tool_runs_it(acts: ToolActivities) -> None:
    call = post("", tool="calculator", args={"expression": "6 * 7"}, dry_run=True)
    result = await run(acts, call)
    assert result.content == "42" and not result.preview


async def test_http_post_preview_sends_nothing_and_names_the_key(
    acts: ToolActivities, receiver: Receiver
) -> None:
    call = post(receiver.url(), dry_run=True)
    result = await run(acts, call)
    assert result.preview and result.requires_approval
    assert receiver.url() in result.content
    assert idempotency_key(call.op_key) in result.content
    assert '"text":"deployed"' in result.content
    assert receiver.received == []


async def test_http_post_preview_refuses_an_off_list_host(
    acts: ToolActivities, receiver: Receiver
) -> None:
    err = await fails(acts, post("http://127.0.0.1:1/hook", dry_run=True))
    assert err.type == errors.TOOL_PERMISSION and err.non_retryable
    err = await fails(acts, post("http://127.0.0.1:1/hook"))
    assert err.type == errors.TOOL_PERMISSION
    assert receiver.received == []


# --- commits ----------------------------------------------------------------------------------


async def test_commit_sends_json_with_the_op_keys_idempotency_key_once(
    acts: ToolActivities, receiver: Receiver
) -> None:
    call = post(receiver.url())
    first = await run(acts, call)
    assert first.content.startswith("HTTP 200\n") and '"ok": true' in first.content
    (got,) = receiver.received
    assert got.key == idempotency_key(call.op_key)
    assert got.key.startswith("keel-") and call.op_key not in got.key
    assert got.content_type == "application/json"
    assert got.body == {"text": "deployed", "n": 3}

    # The same commit again (a re-dispatch after the result was recorded): nothing is sent.
    again = await run(acts, call, attempt=2)
    assert again.replayed and again.content == first.content
    assert len(receiver.received) == 1


async def test_retried_commit_keeps_its_key_and_another_op_gets_another(
    acts: ToolActivities, receiver: Receiver
) -> None:
    call = post(receiver.url("/flaky"))
    err = await fails(acts, call, attempt=1)
    assert err.type == errors.TOOL_TRANSIENT and not err.non_retryable
    assert err.next_retry_delay == timedelta(seconds=2)  # the 503's Retry-After
    result = await run(acts, call, attempt=2)
    assert result.content.startswith("HTTP 200") and result.attempt == 2

    other = post(receiver.url("/flaky"))
    await fails(acts, other)
    keys = [r.key for r in receiver.received]
    assert keys[:2] == [idempotency_key(call.op_key)] * 2
    assert keys[2] == idempotency_key(other.op_key) != keys[0]
    assert receiver.accepted == Counter({keys[0]: 1})


@pytest.mark.parametrize(
    ("path", "error_type", "retryable", "delay"),
    [
        ("/429", errors.TOOL_TRANSIENT, True, 7),
        ("/400", errors.TOOL_FAILED, False, None),
        ("/401", errors.TOOL_PERMISSION, False, None),
        ("/307", errors.TOOL_FAILED, False, None),
    ],
)
async def test_failed_commits_are_classified(
    acts: ToolActivities,
    receiver: Receiver,
    path: str,
    error_type: str,
    retryable: bool,
    delay: int | None,
) -> None:
    err = await fails(acts, post(receiver.url(path)))
    assert err.type == error_type
    assert err.non_retryable is not retryable
    assert err.next_retry_delay == (timedelta(seconds=delay) if delay else None)
    # A redirect is not followed: a write is never re-sent somewhere else.
    assert [r.path for r in receiver.received] == [path]


async def test_reply_is_read_up_to_the_cap(acts: ToolActivities, receiver: Receiver) -> None:
    result = await run(acts, post(receiver.url("/big")))
    # Five times the cap was sent; the tool read the cap and said so (stored by reference).
    expected = f"HTTP 200\n{'B' * MAX_BYTES}\n[truncated at {MAX_BYTES} bytes]"
    assert result.ref is not None and result.size == len(expected)


def test_body_must_be_a_bounded_json_object() -> None:
    from pydantic import ValidationError

    from keel.activities.catalog import HttpPostArgs

    with pytest.raises(ValidationError, match="longer than"):
        HttpPostArgs(url="http://h/x", body={"text": "x" * 20_000})
    with pytest.raises(ValidationError):
        HttpPostArgs.model_validate({"url": "http://h/x", "body": ["not", "an", "object"]})
