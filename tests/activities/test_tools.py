"""The execute_tool gateway and the built-in tools, run through ActivityEnvironment.

Redis is a real redis-server (conftest); HTTP goes to a local http.server on 127.0.0.1.
"""

from __future__ import annotations

import dataclasses
import math
import socket
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from keel.activities import errors
from keel.activities.catalog import BUILTIN_TOOLS, ToolInfo, WriteNoteArgs, tool_schema
from keel.activities.retrieval import Retriever
from keel.activities.store import KeelStore, blob_ref, note_keys
from keel.activities.tools import ToolActivities, ToolContext, ToolRegistry, evaluate_expression
from keel.activities.tools.http_get import AllowEntry, HttpGet, parse_allow_list
from keel.activities.types import NO_HITS, PREVIEW_CHARS, ToolCall, ToolResult, format_hits
from tests.conftest import reply, serving

ALL_TOOLS = ["calculator", "http_get", "write_note", "search_docs", "http_post"]
LARGE_BODY = "L" * (PREVIEW_CHARS * 3)
HUGE_BODY = "H" * 100_000
MAX_BYTES = 50_000


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server API)
        # Recorded before answering: the client may check hits as soon as it has the response.
        self.server.hits.append(self.path)  # type: ignore[attr-defined]
        port = self.server.server_port
        routes: dict[str, tuple[int, dict[str, str], str]] = {
            "/ok": (200, {}, "hello keel"),
            "/host": (200, {}, f"host={self.headers['Host']}"),
            "/large": (200, {}, LARGE_BODY),
            "/huge": (200, {}, HUGE_BODY),
            "/500": (500, {}, "boom"),
            "/404": (404, {}, "no such page"),
            "/401": (401, {}, "who are you"),
            "/429": (429, {"Retry-After": "7"}, "slow down"),
            "/hop": (302, {"Location": "/ok"}, ""),
            "/escape": (302, {"Location": f"http://localhost:{port}/ok"}, ""),
            "/to-inside": (302, {"Location": f"http://inside.test:{port}/ok"}, ""),
            "/to-metadata": (302, {"Location": "http://169.254.169.254/latest/meta-data/"}, ""),
            "/loop": (302, {"Location": "/loop"}, ""),
        }
        status, headers, body = routes.get(self.path, (404, {}, "unknown"))
        headers["Content-Type"] = "text/plain; charset=utf-8"
        reply(self, status, headers, body.encode())

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def http_server() -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.hits = []  # type: ignore[attr-defined]
    with serving(server):
        yield server


@pytest.fixture
def base_url(http_server: ThreadingHTTPServer) -> str:
    return f"http://127.0.0.1:{http_server.server_port}"


@pytest.fixture
def store(redis_client: aioredis.Redis) -> KeelStore:
    return KeelStore(redis_client)


@pytest.fixture
async def registry(
    store: KeelStore, http_server: ThreadingHTTPServer
) -> AsyncIterator[ToolRegistry]:
    allowed = [f"127.0.0.1:{http_server.server_port}"]
    reg = ToolRegistry.builtin(store, Retriever(), allowed, http_max_bytes=MAX_BYTES)
    yield reg
    await reg.aclose()


@pytest.fixture
def acts(registry: ToolRegistry, store: KeelStore) -> ToolActivities:
    return ToolActivities(registry, store)


@pytest.fixture
def tenant() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"


def make_call(tenant: str, tool: str, args: dict[str, Any], **kw: Any) -> ToolCall:
    fields: dict[str, Any] = {
        "job_id": "agent-job-1",
        "tenant": tenant,
        "op_key": f"agent-job-1:0:{uuid.uuid4().hex[:6]}",
        "tool": tool,
        "args": args,
        "allowed_tools": ALL_TOOLS,
    }
    return ToolCall(**(fields | kw))


async def run(acts: ToolActivities, call: ToolCall, attempt: int = 1) -> ToolResult:
    env = ActivityEnvironment()
    env.info = dataclasses.replace(env.info, attempt=attempt)
    return await env.run(acts.execute_tool, call)


async def fails(acts: ToolActivities, call: ToolCall) -> ApplicationError:
    with pytest.raises(ApplicationError) as info:
        await run(acts, call)
    return info.value


# --- catalog and registry ---------------------------------------------------------------------


def test_catalog_schemas_carry_examples() -> None:
    assert set(BUILTIN_TOOLS) == set(ALL_TOOLS)
    assert [n for n, t in BUILTIN_TOOLS.items() if t.side_effecting] == ["write_note", "http_post"]
    schema = tool_schema("write_note")
    assert schema["name"] == "write_note"
    props = schema["parameters"]["properties"]
    assert props["title"]["examples"] == ["Keel note"]
    assert props["body"]["examples"] == ["Body of the note."]
    assert tool_schema("calculator")["parameters"]["properties"]["expression"]["examples"] == [
        "2 * (3 + 4)"
    ]
    assert schema["parameters"]["additionalProperties"] is False


def test_registry_specs_follow_the_allow_list(registry: ToolRegistry) -> None:
    assert registry.names() == sorted(ALL_TOOLS)
    specs = registry.specs(["write_note", "nope", "calculator"])
    assert [s["name"] for s in specs] == ["write_note", "calculator"]
    assert specs[0] == tool_schema("write_note")
    with pytest.raises(ValueError, match="already registered"):
        registry.register(BUILTIN_TOOLS["calculator"], registry.get("calculator")[1])  # type: ignore[index]


# --- gateway ----------------------------------------------------------------------------------


async def test_tool_outside_allow_list_is_refused(
    acts: ToolActivities, store: KeelStore, tenant: str
) -> None:
    call = make_call(
        tenant, "write_note", {"title": "t", "body": "b"}, allowed_tools=["calculator"]
    )
    err = await fails(acts, call)
    assert err.type == errors.TOOL_NOT_ALLOWED and err.non_retryable
    assert await store.list_notes(tenant) == []


async def test_unknown_tool(acts: ToolActivities, tenant: str) -> None:
    err = await fails(acts, make_call(tenant, "shell", {}, allowed_tools=["shell"]))
    assert err.type == errors.TOOL_NOT_FOUND and err.non_retryable


async def test_bad_args_name_the_field(acts: ToolActivities, tenant: str) -> None:
    err = await fails(acts, make_call(tenant, "write_note", {"title": "", "colour": "red"}))
    assert err.type == errors.TOOL_INPUT_INVALID and err.non_retryable
    for field in ("title", "body", "colour"):
        assert field in err.message
    err = await fails(acts, make_call(tenant, "http_get", {"url": "ftp://127.0.0.1/"}))
    assert err.type == errors.TOOL_INPUT_INVALID and "url" in err.message


async def test_attempt_comes_from_activity_info(acts: ToolActivities, tenant: str) -> None:
    result = await run(acts, make_call(tenant, "calculator", {"expression": "1+1"}), attempt=3)
    assert result == ToolResult(content="2", attempt=3)


# --- calculator -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("2 * (3 + 4)", "14"),
        ("7 // 2 + 7 % 2", "4"),
        ("-2 ** 2", "-4"),
        ("1 / 4", "0.25"),
        ("sqrt(16) + abs(-3)", "7.0"),
        ("round(pi, 3)", "3.142"),
        ("max(1, 5, 3) - min(4, 2)", "3"),
        ("log(e)", "1.0"),
        ("exp(0) + sin(0) + cos(0)", "2.0"),
        ("2 ** 10", "1024"),
    ],
)
async def test_calculator(
    acts: ToolActivities, tenant: str, expression: str, expected: str
) -> None:
    result = await run(acts, make_call(tenant, "calculator", {"expression": expression}))
    assert result.content == expected


@pytest.mark.parametrize(
    ("expression", "error_type"),
    [
        ("__import__('os')", errors.TOOL_INPUT_INVALID),
        ("os.system('true')", errors.TOOL_INPUT_INVALID),
        ("(1).__class__", errors.TOOL_INPUT_INVALID),
        ("x + 1", errors.TOOL_INPUT_INVALID),
        ("'a' * 3", errors.TOOL_INPUT_INVALID),
        ("[1, 2]", errors.TOOL_INPUT_INVALID),
        ("lambda: 1", errors.TOOL_INPUT_INVALID),
        ("2 +", errors.TOOL_INPUT_INVALID),
        ("round(5, -10 ** 100)", errors.TOOL_INPUT_INVALID),
        ("2 ** 100000", errors.TOOL_FAILED),
        ("9 ** 9 ** 9", errors.TOOL_FAILED),
        ("10 ** 999 * 10 ** 999", errors.TOOL_FAILED),
        ("exp(1000)", errors.TOOL_FAILED),
        ("1 / 0", errors.TOOL_FAILED),
        ("5 % 0", errors.TOOL_FAILED),
        ("sqrt(-1)", errors.TOOL_FAILED),
        ("(-8) ** (1 / 3)", errors.TOOL_FAILED),
    ],
)
async def test_calculator_refusals(
    acts: ToolActivities, tenant: str, expression: str, error_type: str
) -> None:
    err = await fails(acts, make_call(tenant, "calculator", {"expression": expression}))
    assert err.type == error_type
    assert err.non_retryable


# --- http_get ---------------------------------------------------------------------------------


async def test_http_get_allowed_host(acts: ToolActivities, tenant: str, base_url: str) -> None:
    result = await run(acts, make_call(tenant, "http_get", {"url": f"{base_url}/ok"}))
    assert result.content == "HTTP 200\nhello keel"
    assert result.ref is None and result.replayed is False


async def test_http_get_disallowed_host(
    acts: ToolActivities, tenant: str, http_server: ThreadingHTTPServer
) -> None:
    url = f"http://localhost:{http_server.server_port}/ok"
    err = await fails(acts, make_call(tenant, "http_get", {"url": url}))
    assert err.type == errors.TOOL_PERMISSION and err.non_retryable


async def test_http_get_checks_redirect_hosts_before_following(
    acts: ToolActivities, tenant: str, base_url: str, http_server: ThreadingHTTPServer
) -> None:
    result = await run(acts, make_call(tenant, "http_get", {"url": f"{base_url}/hop"}))
    assert result.content == "HTTP 200\nhello keel"
    http_server.hits.clear()  # type: ignore[attr-defined]
    err = await fails(acts, make_call(tenant, "http_get", {"url": f"{base_url}/escape"}))
    assert err.type == errors.TOOL_PERMISSION
    assert http_server.hits == ["/escape"]  # type: ignore[attr-defined]
    err = await fails(acts, make_call(tenant, "http_get", {"url": f"{base_url}/loop"}))
    assert err.type == errors.TOOL_FAILED and err.non_retryable


async def test_http_get_truncates_at_max_bytes(
    acts: ToolActivities, store: KeelStore, tenant: str, base_url: str
) -> None:
    result = await run(acts, make_call(tenant, "http_get", {"url": f"{base_url}/huge"}))
    assert result.ref is not None
    full = await store.get_blob(result.ref, job_id="agent-job-1")
    assert full == f"HTTP 200\n{'H' * MAX_BYTES}\n[truncated at {MAX_BYTES} bytes]"
    assert result.size == len(full)


@pytest.mark.parametrize(
    ("path", "error_type", "non_retryable", "delay"),
    [
        ("/500", errors.TOOL_TRANSIENT, False, None),
        ("/429", errors.TOOL_TRANSIENT, False, timedelta(seconds=7)),
        ("/404", errors.TOOL_FAILED, True, None),
        ("/401", errors.TOOL_PERMISSION, True, None),
    ],
)
async def test_http_get_status_mapping(
    acts: ToolActivities,
    tenant: str,
    base_url: str,
    path: str,
    error_type: str,
    non_retryable: bool,
    delay: timedelta | None,
) -> None:
    err = await fails(acts, make_call(tenant, "http_get", {"url": f"{base_url}{path}"}))
    assert err.type == error_type
    assert err.non_retryable is non_retryable
    assert err.next_retry_delay == delay
    assert path.lstrip("/") in err.message


async def test_http_get_connection_refused_is_transient(http_acts: HttpActs, tenant: str) -> None:
    port = closed_port()
    acts = http_acts([f"127.0.0.1:{port}"])
    err = await fails(acts, make_call(tenant, "http_get", {"url": f"http://127.0.0.1:{port}/"}))
    assert err.type == errors.TOOL_TRANSIENT and not err.non_retryable


# --- http_get: host and port, addresses, tenants (issue 13) -----------------------------------

HttpActs = Callable[..., ToolActivities]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class FakeDNS:
    """DNS at its seam: names map to addresses; every lookup is recorded."""

    def __init__(self, answers: dict[str, list[str]]) -> None:
        self.answers = answers
        self.asked: list[tuple[str, int]] = []

    async def __call__(self, host: str, port: int) -> list[str]:
        self.asked.append((host, port))
        if host not in self.answers:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return self.answers[host]


@pytest.fixture
async def http_acts(store: KeelStore) -> AsyncIterator[HttpActs]:
    """Gateways whose only tool is an http_get with the given allow-lists and DNS."""
    registries: list[ToolRegistry] = []

    def build(
        allowed: list[str],
        *,
        by_tenant: dict[str, list[str]] | None = None,
        dns: FakeDNS | None = None,
    ) -> ToolActivities:
        registry = ToolRegistry()
        registries.append(registry)
        extra: dict[str, Any] = {"resolve": dns} if dns is not None else {}
        tool = HttpGet(
            registry.http_client, allowed, MAX_BYTES, 5.0, allowed_by_tenant=by_tenant, **extra
        )
        registry.register(BUILTIN_TOOLS["http_get"], tool)
        return ToolActivities(registry, store)

    yield build
    for registry in registries:
        await registry.aclose()


def get(tenant: str, url: str) -> ToolCall:
    return make_call(tenant, "http_get", {"url": url}, allowed_tools=["http_get"])


def test_allow_list_entries_name_host_and_port() -> None:
    assert parse_allow_list(["Docs.Example.COM.:8080", " api.acme.com ", "127.0.0.1:*", ""]) == [
        AllowEntry("docs.example.com", 8080),
        AllowEntry("api.acme.com", None),
        AllowEntry("127.0.0.1", "*"),
    ]
    assert parse_allow_list(["[::1]:9000", "[FC00::0001]"]) == [
        AllowEntry("::1", 9000),
        AllowEntry("fc00::1", None),
    ]
    for bad in ["h:0", "h:65536", "h:http", "h:", "::1:80", "*.acme.com", "[::1", "a b:80"]:
        with pytest.raises(ValueError, match="allow-list entry"):
            parse_allow_list([bad])


async def test_http_get_refuses_a_listed_host_on_another_port(
    acts: ToolActivities, tenant: str, http_server: ThreadingHTTPServer
) -> None:
    """127.0.0.1 is listed with the test server's port only: the Temporal UI's, say, is not."""
    http_server.hits.clear()  # type: ignore[attr-defined]
    url = f"http://127.0.0.1:{closed_port()}/api/v1/namespaces"
    err = await fails(acts, make_call(tenant, "http_get", {"url": url}))
    # Refused before connecting: a connection attempt would have failed as TOOL_TRANSIENT.
    assert err.type == errors.TOOL_PERMISSION and err.non_retryable
    assert "not on the http_get allow-list" in err.message
    for bare in ("http://127.0.0.1/", "https://127.0.0.1/"):  # "127.0.0.1:port" is not any port
        err = await fails(acts, make_call(tenant, "http_get", {"url": bare}))
        assert err.type == errors.TOOL_PERMISSION


async def test_http_get_refuses_cloud_metadata(http_acts: HttpActs, tenant: str) -> None:
    dns = FakeDNS({"metadata.test": ["169.254.169.254"], "md6.test": ["fe80::a9fe:a9fe"]})
    acts = http_acts(["metadata.test:*", "metadata.test", "md6.test:*"], dns=dns)
    for url in (
        "http://169.254.169.254/latest/meta-data/",  # not listed at all
        "http://metadata.test/latest/meta-data/",  # listed, but resolves to link-local
        "http://metadata.test:8080/computeMetadata/v1/",
        "http://md6.test/",
    ):
        err = await fails(acts, get(tenant, url))
        assert err.type == errors.TOOL_PERMISSION and err.non_retryable, url
        if "169.254" not in url:
            assert "169.254" not in err.message  # the planner is not told a name's address
    assert [host for host, _ in dns.asked] == ["metadata.test", "metadata.test", "md6.test"]


async def test_http_get_refuses_a_name_that_resolves_to_a_private_address(
    http_acts: HttpActs, tenant: str, http_server: ThreadingHTTPServer
) -> None:
    port = http_server.server_port
    private = {
        "ten.test": ["10.1.2.3"],
        "rfc1918.test": ["93.184.216.34", "192.168.1.10"],  # one private answer is enough
        "ula.test": ["fc00::5"],
        "mapped.test": ["::ffff:127.0.0.1"],
        "sixtofour.test": ["2002:7f00:1::"],  # 6to4 wrapping of 127.0.0.1
        "zero.test": ["0.0.0.0"],
    }
    dns = FakeDNS(private)
    acts = http_acts([f"{name}:*" for name in private], dns=dns)
    for name in private:
        err = await fails(acts, get(tenant, f"http://{name}:{port}/ok"))
        assert err.type == errors.TOOL_PERMISSION and err.non_retryable, name
        assert "loopback, private or link-local" in err.message
    # The real resolver: localhost is loopback, so "localhost:*" does not reach the server.
    http_server.hits.clear()  # type: ignore[attr-defined]
    err = await fails(http_acts(["localhost:*"]), get(tenant, f"http://localhost:{port}/ok"))
    assert err.type == errors.TOOL_PERMISSION
    assert http_server.hits == []  # type: ignore[attr-defined]


async def test_http_get_serves_an_allow_listed_host_port_from_the_checked_address(
    http_acts: HttpActs, tenant: str, http_server: ThreadingHTTPServer
) -> None:
    """docs.test resolves only in FakeDNS: the answer proves the request went to that address,
    resolved once, so DNS cannot answer differently at connect time (rebinding)."""
    port = http_server.server_port
    dns = FakeDNS({"docs.test": ["127.0.0.1"]})
    acts = http_acts([f"docs.test:{port}"], dns=dns)  # an exact port may reach loopback
    result = await run(acts, get(tenant, f"http://docs.test:{port}/host"))
    assert result.content == f"HTTP 200\nhost=docs.test:{port}"
    assert dns.asked == [("docs.test", port)]


async def test_http_get_rechecks_every_redirect(
    http_acts: HttpActs, tenant: str, http_server: ThreadingHTTPServer
) -> None:
    port = http_server.server_port
    dns = FakeDNS({"inside.test": ["127.0.0.1"]})
    acts = http_acts([f"127.0.0.1:{port}", "inside.test:*"], dns=dns)
    http_server.hits.clear()  # type: ignore[attr-defined]
    # inside.test is listed for any port, which does not name the loopback address it has.
    err = await fails(acts, get(tenant, f"http://127.0.0.1:{port}/to-inside"))
    assert err.type == errors.TOOL_PERMISSION and "loopback" in err.message, err.message
    assert http_server.hits == ["/to-inside"]  # type: ignore[attr-defined]
    assert dns.asked == [("inside.test", port)]
    # A redirect to the cloud metadata address is refused before it is contacted.
    err = await fails(acts, get(tenant, f"http://127.0.0.1:{port}/to-metadata"))
    assert err.type == errors.TOOL_PERMISSION and "169.254.169.254:80" in err.message


async def test_http_get_tenant_entries_apply_to_that_tenant_only(
    http_acts: HttpActs, http_server: ThreadingHTTPServer
) -> None:
    url = f"http://127.0.0.1:{http_server.server_port}/ok"
    acme, other = f"acme-{uuid.uuid4().hex[:6]}", f"other-{uuid.uuid4().hex[:6]}"
    acts = http_acts([], by_tenant={acme: [f"127.0.0.1:{http_server.server_port}"]})
    assert (await run(acts, get(acme, url))).content == "HTTP 200\nhello keel"
    err = await fails(acts, get(other, url))
    assert err.type == errors.TOOL_PERMISSION and err.non_retryable


# --- large output -----------------------------------------------------------------------------


async def test_large_output_goes_to_a_blob(
    acts: ToolActivities, store: KeelStore, tenant: str, base_url: str
) -> None:
    call = make_call(tenant, "http_get", {"url": f"{base_url}/large"})
    result = await run(acts, call)
    full = f"HTTP 200\n{LARGE_BODY}"
    assert result.ref == blob_ref(tenant, call.op_key)
    assert result.content == full[:PREVIEW_CHARS]
    assert result.size == len(full)
    assert await store.get_blob(result.ref, job_id="agent-job-1") == full


async def test_custom_tool_output_at_the_limit_stays_inline(store: KeelStore, tenant: str) -> None:
    async def echo(args: WriteNoteArgs, ctx: ToolContext) -> str:
        return args.body

    registry = ToolRegistry()
    registry.register(ToolInfo("echo", "Echo the body.", WriteNoteArgs), echo)
    acts = ToolActivities(registry, store)
    body = "x" * PREVIEW_CHARS
    call = make_call(tenant, "echo", {"title": "t", "body": body}, allowed_tools=["echo"])
    result = await run(acts, call)
    assert (result.content, result.ref, result.size) == (body, None, 0)  # inline: whole output


# --- write_note -------------------------------------------------------------------------------


async def test_write_note_twice_with_one_op_key_writes_once(
    acts: ToolActivities, store: KeelStore, tenant: str
) -> None:
    call = make_call(tenant, "write_note", {"title": "Keel note", "body": "Body."})
    first = await run(acts, call)
    second = await run(acts, call, attempt=2)
    note_key = note_keys(tenant, call.op_key)[0]
    assert first.content == f"note {note_key} written"
    assert first.replayed is False
    assert second == first.model_copy(update={"replayed": True})
    notes = await store.list_notes(tenant)
    assert [(n["title"], n["body"], n["job_id"]) for n in notes] == [
        ("Keel note", "Body.", "agent-job-1")
    ]


async def test_step_key_forms_the_op_key_from_the_calling_workflow(
    acts: ToolActivities, store: KeelStore, tenant: str
) -> None:
    # What a workflow sends: no job ID, no op_key; the job is the calling workflow.
    call = make_call(
        tenant, "write_note", {"title": "t", "body": "b"}, job_id="", op_key="", step_key="3:s2"
    )
    env = ActivityEnvironment()
    env.info = dataclasses.replace(env.info, workflow_id="agent-job-wf")
    first = await env.run(acts.execute_tool, call)
    second = await env.run(acts.execute_tool, call)
    assert first.content == f"note {note_keys(tenant, 'agent-job-wf:3:s2')[0]} written"
    assert second.replayed is True
    assert [n["job_id"] for n in await store.list_notes(tenant)] == ["agent-job-wf"]


def test_a_tool_call_needs_a_key() -> None:
    with pytest.raises(ValidationError, match="op_key or step_key"):
        ToolCall(tenant="t", tool="calculator", allowed_tools=["calculator"])


async def test_write_note_with_different_op_keys_writes_twice(
    acts: ToolActivities, store: KeelStore, tenant: str
) -> None:
    for title in ("one", "two"):
        await run(acts, make_call(tenant, "write_note", {"title": title, "body": "b"}))
    assert [n["title"] for n in await store.list_notes(tenant)] == ["one", "two"]


async def test_write_note_after_lost_record_is_still_once(
    acts: ToolActivities, store: KeelStore, redis_client: aioredis.Redis, tenant: str
) -> None:
    # The worker crashed after the note was written but before the record was stored.
    call = make_call(tenant, "write_note", {"title": "t", "body": "b"})
    await run(acts, call)
    await redis_client.delete(f"keel:idem:{tenant}:{call.op_key}")
    again = await run(acts, call, attempt=2)
    assert again.content.endswith("already written")
    assert len(await store.list_notes(tenant)) == 1


# --- search_docs ------------------------------------------------------------------------------


async def test_search_docs_formats_hits(acts: ToolActivities, tenant: str, tmp_path: Path) -> None:
    (tmp_path / "retries.md").write_text("Temporal retries activities with backoff.")
    (tmp_path / "budget.txt").write_text("Budgets cap the cost of a job.")
    call = make_call(
        tenant, "search_docs", {"query": "retries backoff", "top_k": 3}, docs_dir=str(tmp_path)
    )
    result = await run(acts, call)
    line, *rest = result.content.splitlines()
    assert line.startswith("retries.md (score ")
    assert line.endswith("): Temporal retries activities with backoff.")
    assert rest == []
    call = make_call(tenant, "search_docs", {"query": "zebra"}, docs_dir=str(tmp_path))
    assert (await run(acts, call)).content == "no matching documents"


async def test_search_docs_and_retrieval_steps_format_hits_alike(
    acts: ToolActivities, tenant: str, tmp_path: Path
) -> None:
    """One formatter: what search_docs returns is what a workflow's retrieval step observes."""
    (tmp_path / "a.md").write_text("Budgets cap tokens. Budgets cap dollars.")
    (tmp_path / "b.md").write_text("Tokens are counted before every call.")
    hits = await Retriever().search(str(tmp_path), "budgets tokens", 5)
    call = make_call(tenant, "search_docs", {"query": "budgets tokens"}, docs_dir=str(tmp_path))
    assert (await run(acts, call)).content == format_hits(hits)
    assert len(format_hits(hits).splitlines()) == len(hits) == 2
    assert format_hits([]) == NO_HITS


async def test_search_docs_needs_a_docs_folder(
    acts: ToolActivities, tenant: str, tmp_path: Path
) -> None:
    err = await fails(acts, make_call(tenant, "search_docs", {"query": "x"}))
    assert err.type == errors.TOOL_INPUT_INVALID
    assert "no docs folder" in err.message
    call = make_call(tenant, "search_docs", {"query": "x"}, docs_dir=str(tmp_path / "missing"))
    err = await fails(acts, call)
    assert err.type == errors.DOCS_NOT_FOUND and err.non_retryable


ATOMS = st.one_of(
    st.integers(-(10**6), 10**6).map(str),
    st.floats(-1e6, 1e6, allow_nan=False).map(repr),
    st.sampled_from(["pi", "e", "9", "10 ** 999", "x", "''", "__import__"]),
)


def _combine(parts: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    binary = st.tuples(parts, st.sampled_from(["+", "-", "*", "/", "//", "%", "**"]), parts)
    call = st.tuples(
        st.sampled_from(["sqrt", "log", "exp", "sin", "abs", "round", "max", "eval"]),
        st.lists(parts, min_size=1, max_size=3),
    )
    return st.one_of(
        binary.map(lambda t: f"{t[0]} {t[1]} {t[2]}"),
        parts.map(lambda p: f"-({p})"),
        call.map(lambda t: f"{t[0]}({', '.join(t[1])})"),
    )


@pytest.mark.property
@settings(deadline=500)  # a slow case is a finding: the evaluator must bound its own work
@given(st.recursive(ATOMS, _combine, max_leaves=12) | st.text(max_size=40))
def test_the_calculator_answers_any_text_with_a_number_or_a_typed_refusal(text: str) -> None:
    """A model writes the expression: whatever it writes, no other exception gets out."""
    try:
        value = evaluate_expression(text)
    except ApplicationError as err:
        assert err.type in (errors.TOOL_INPUT_INVALID, errors.TOOL_FAILED), err
        assert err.non_retryable
        return
    assert isinstance(value, int | float) and not isinstance(value, bool)
    assert not isinstance(value, float) or math.isfinite(value)
