"""The tool gateway (the ``execute_tool`` activity) and the built-in tools.

Owns everything between a planned tool call and its effect: the job's allow-list, argument
validation against ``activities/catalog.py``, exactly-once recording of side-effecting calls,
moving large outputs to a Redis blob so only a preview enters workflow history, and the tools
themselves (calculator, http_get, write_note, search_docs). Failures are raised as
``ApplicationError`` with a type from ``activities/errors.py`` and honest retry semantics.
Not workflow code: tools perform network and Redis I/O.
"""

from __future__ import annotations

import ast
import asyncio
import math
import operator
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx
import structlog
from pydantic import BaseModel, ValidationError
from temporalio import activity
from temporalio.exceptions import ApplicationError

from keel.activities._heartbeat import heartbeating
from keel.activities.catalog import (
    BUILTIN_TOOLS,
    CalculatorArgs,
    HttpGetArgs,
    SearchDocsArgs,
    ToolInfo,
    WriteNoteArgs,
)
from keel.activities.errors import (
    TOOL_FAILED,
    TOOL_INPUT_INVALID,
    TOOL_NOT_ALLOWED,
    TOOL_NOT_FOUND,
    TOOL_PERMISSION,
    TOOL_TRANSIENT,
    classify_http_status,
)
from keel.activities.retrieval import Retriever
from keel.activities.store import KeelStore
from keel.activities.types import PREVIEW_CHARS, ToolCall, ToolResult

__all__ = ["ToolActivities", "ToolContext", "ToolImpl", "ToolRegistry", "evaluate_expression"]

_log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class ToolContext:
    """Who a tool runs for; passed to every tool implementation."""

    job_id: str
    tenant: str
    op_key: str
    """Durable identity of the call; side effects are keyed by it."""
    docs_dir: str | None = None
    """The job's document folder, if it has one."""


ToolImpl = Callable[[Any, ToolContext], Awaitable[str]]
"""A tool: (validated args model, context) -> output text. Raises ApplicationError to fail."""


@dataclass(frozen=True)
class _Registered:
    info: ToolInfo
    impl: ToolImpl


class ToolRegistry:
    """The tools a worker offers, and the resources they share (one HTTP client)."""

    def __init__(self, http_timeout: float = 10.0) -> None:
        self._tools: dict[str, _Registered] = {}
        self._http: httpx.AsyncClient | None = None
        self._http_timeout = http_timeout

    def register(self, info: ToolInfo, impl: ToolImpl) -> None:
        """Add a tool.

        Args:
            info: Name, description, args model and whether the tool has side effects.
            impl: The implementation, called with validated args and a ToolContext.

        Raises:
            ValueError: If a tool of that name is already registered.
        """
        if info.name in self._tools:
            raise ValueError(f"tool {info.name!r} is already registered")
        self._tools[info.name] = _Registered(info, impl)

    def get(self, name: str) -> tuple[ToolInfo, ToolImpl] | None:
        """The tool registered under ``name``, or None.

        Args:
            name: Tool name.

        Returns:
            ``(info, impl)``, or None when no such tool is registered.
        """
        entry = self._tools.get(name)
        return None if entry is None else (entry.info, entry.impl)

    def names(self) -> list[str]:
        """Names of the registered tools, sorted.

        Returns:
            The tool names.
        """
        return sorted(self._tools)

    def specs(self, names: Iterable[str] | None = None) -> list[dict[str, Any]]:
        """Prompt descriptions of the given tools (all when None), skipping unregistered names.

        Args:
            names: The job's allowed tools, in the order the prompt should list them.

        Returns:
            One ``{"name", "description", "parameters"}`` dict per registered tool.
        """
        wanted = self.names() if names is None else list(dict.fromkeys(names))
        return [self._tools[n].info.schema() for n in wanted if n in self._tools]

    def http_client(self) -> httpx.AsyncClient:
        """The registry's shared HTTP client, created on first use inside the event loop.

        Returns:
            A client without retries of its own (Temporal owns retries).
        """
        if self._http is None:
            self._http = httpx.AsyncClient(timeout=self._http_timeout, follow_redirects=False)
        return self._http

    async def aclose(self) -> None:
        """Close the shared HTTP client, if it was created."""
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    @classmethod
    def builtin(
        cls,
        store: KeelStore,
        retriever: Retriever,
        http_allowed_hosts: list[str],
        http_max_bytes: int = 256_000,
        http_timeout: float = 10.0,
    ) -> ToolRegistry:
        """A registry with the four built-in tools.

        Args:
            store: Where write_note writes.
            retriever: What search_docs searches with.
            http_allowed_hosts: Hostnames http_get may fetch (ports are ignored).
            http_max_bytes: Most body bytes http_get reads; the rest is cut off.
            http_timeout: Seconds for each HTTP operation, and for a whole http_get call.

        Returns:
            The registry; call ``aclose`` on shutdown.
        """
        registry = cls(http_timeout=http_timeout)
        http = _HttpGet(registry, http_allowed_hosts, http_max_bytes, http_timeout)
        tools: dict[str, ToolImpl] = {
            "calculator": _calculator,
            "http_get": http,
            "write_note": _WriteNote(store),
            "search_docs": _SearchDocs(retriever),
        }
        for name, impl in tools.items():
            registry.register(BUILTIN_TOOLS[name], impl)
        return registry


class ToolActivities:
    """The tool gateway activity, bound to a registry and the store."""

    def __init__(self, registry: ToolRegistry, store: KeelStore) -> None:
        self._registry = registry
        self._store = store

    @activity.defn(name="execute_tool")
    async def execute_tool(self, call: ToolCall) -> ToolResult:
        """Run one tool call through the gateway.

        Args:
            call: The tool, its arguments, the job's allow-list and the call's op_key.

        Returns:
            The output (or its preview and blob ref); for a side-effecting call that already
            completed, the recorded result with ``replayed=True``.

        Raises:
            ApplicationError: ``TOOL_NOT_ALLOWED``, ``TOOL_NOT_FOUND`` or ``TOOL_INPUT_INVALID``
                (non-retryable) before the tool runs, or whatever the tool raised.
        """
        job_id = _job_id(call.job_id)
        op_key = call.op_key or f"{job_id}:{call.step_key}"
        with structlog.contextvars.bound_contextvars(
            job_id=job_id, tenant=call.tenant, tool=call.tool, op_key=op_key
        ):
            info, impl, args = self._admit(call)
            if info.side_effecting:
                recorded = await self._store.get_record(call.tenant, op_key)
                if recorded is not None:
                    _log.info("tool.replayed")
                    return recorded.model_copy(update={"replayed": True})
            ctx = ToolContext(job_id, call.tenant, op_key, call.docs_dir)
            async with heartbeating():
                output = await impl(args, ctx)
            result = await self._package(ctx, output)
            if info.side_effecting:
                await self._store.put_record(call.tenant, op_key, result)
            _log.info("tool.executed", size=result.size or len(result.content), ref=result.ref)
            return result

    def _admit(self, call: ToolCall) -> tuple[ToolInfo, ToolImpl, BaseModel]:
        """Apply the allow-list, look the tool up and validate its arguments."""
        if call.tool not in call.allowed_tools:
            raise ApplicationError(
                f"tool {call.tool!r} is not allowed for this job "
                f"(allowed: {', '.join(call.allowed_tools) or 'none'})",
                type=TOOL_NOT_ALLOWED,
                non_retryable=True,
            )
        found = self._registry.get(call.tool)
        if found is None:
            raise ApplicationError(
                f"no tool named {call.tool!r} on this worker",
                type=TOOL_NOT_FOUND,
                non_retryable=True,
            )
        info, impl = found
        try:
            args = info.args_model.model_validate(call.args)
        except ValidationError as e:
            raise ApplicationError(
                f"invalid arguments for {call.tool}: {_summarize(e)}",
                type=TOOL_INPUT_INVALID,
                non_retryable=True,
            ) from None
        return info, impl, args

    async def _package(self, ctx: ToolContext, output: str) -> ToolResult:
        """Keep small outputs inline; move large ones to a blob and keep a preview."""
        attempt = activity.info().attempt
        if len(output) <= PREVIEW_CHARS:
            # Inline: the content is the whole output, so its length is the size.
            return ToolResult(content=output, attempt=attempt)
        # Workflow history has a 2 MB payload limit, so only a preview and the ref go there.
        ref = await self._store.put_blob(ctx.tenant, ctx.op_key, output)
        return ToolResult(
            content=output[:PREVIEW_CHARS],
            ref=ref,
            size=len(output),
            attempt=attempt,
        )


def _summarize(error: ValidationError) -> str:
    """Field names and messages of a validation error, without the (possibly large) inputs."""
    parts = [
        f"{'.'.join(str(p) for p in err['loc']) or '(args)'}: {err['msg']}"
        for err in error.errors(include_url=False, include_input=False)
    ]
    return "; ".join(parts)[:500]


# --- calculator -------------------------------------------------------------------------------

_BINARY: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY: dict[type[ast.unaryop], Callable[[Any], Any]] = {
    ast.UAdd: operator.pos,
    ast.USub: operator.neg,
}
_CONSTANTS = {"pi": math.pi, "e": math.e}
_MAX_EXPONENT = 1000
_MAX_DIGITS = 1000
"""Results with more decimal digits than this are refused as absurd."""


def _invalid(message: str) -> ApplicationError:
    return ApplicationError(message, type=TOOL_INPUT_INVALID, non_retryable=True)


def _failed(message: str) -> ApplicationError:
    return ApplicationError(message, type=TOOL_FAILED, non_retryable=True)


def _check_size(value: object) -> int | float:
    if isinstance(value, complex):
        raise _failed("the result is a complex number")
    if not isinstance(value, int | float):
        raise _invalid(f"unsupported value {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise _failed("the result is too large")
    if isinstance(value, int) and value.bit_length() > _MAX_DIGITS * 3.33:
        raise _failed("the result is too large")
    return value


def _power(base: Any, exponent: Any) -> Any:
    # Checked before computing: 9**9**9 would otherwise hold the worker's CPU for minutes.
    if abs(exponent) > _MAX_EXPONENT:
        raise _failed(f"exponent {exponent} is too large (limit {_MAX_EXPONENT})")
    if exponent > 0 and abs(base) > 1 and exponent * math.log10(abs(base)) > _MAX_DIGITS:
        raise _failed("the result is too large")
    return base**exponent


def _round(value: Any, ndigits: Any = None) -> Any:
    # round(5, -10**100) never finishes, so the digit count is bounded like an exponent.
    if ndigits is None:
        return round(value)
    if not isinstance(ndigits, int) or abs(ndigits) > 100:
        raise _invalid("round() takes a whole number of digits between -100 and 100")
    return round(value, ndigits)


_FUNCTIONS: dict[str, Callable[..., Any]] = {
    "sqrt": math.sqrt,
    "log": math.log,
    "exp": math.exp,
    "sin": math.sin,
    "cos": math.cos,
    "abs": abs,
    "round": _round,
    "min": min,
    "max": max,
}


def _eval(node: ast.AST) -> int | float:
    if isinstance(node, ast.Expression):
        return _eval(node.body)
    if isinstance(node, ast.Constant):
        if isinstance(node.value, bool) or not isinstance(node.value, int | float):
            raise _invalid(f"unsupported constant {node.value!r}")
        return _check_size(node.value)
    if isinstance(node, ast.Name):
        if node.id not in _CONSTANTS:
            raise _invalid(f"unknown name {node.id!r}")
        return _CONSTANTS[node.id]
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _check_size(_UNARY[type(node.op)](_eval(node.operand)))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow):
            return _check_size(_power(left, right))
        return _check_size(_BINARY[type(node.op)](left, right))
    if isinstance(node, ast.Call):
        if not isinstance(node.func, ast.Name) or node.func.id not in _FUNCTIONS or node.keywords:
            raise _invalid(f"unsupported call {ast.unparse(node.func)!r}")
        values = [_eval(arg) for arg in node.args]
        return _check_size(_FUNCTIONS[node.func.id](*values))
    raise _invalid(f"unsupported syntax {type(node).__name__}")


def evaluate_expression(expression: str) -> int | float:
    """Evaluate arithmetic safely by walking the syntax tree; nothing else is executed.

    Args:
        expression: Numbers, + - * / // % **, parentheses, sqrt, log, exp, sin, cos, abs,
            round, min, max, pi and e.

    Returns:
        The value.

    Raises:
        ApplicationError: ``TOOL_INPUT_INVALID`` for anything but arithmetic, ``TOOL_FAILED``
            for division by zero, math domain errors and absurdly large results.
    """
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except (SyntaxError, ValueError, MemoryError, RecursionError) as e:
        raise _invalid(f"not an arithmetic expression: {e}") from None
    try:
        return _eval(tree)
    except ZeroDivisionError:
        raise _failed("division by zero") from None
    except OverflowError:
        raise _failed("the result is too large") from None
    except ValueError as e:
        raise _failed(f"math error: {e}") from None
    except (TypeError, RecursionError) as e:
        raise _invalid(f"bad expression: {e}") from None


async def _calculator(args: CalculatorArgs, ctx: ToolContext) -> str:
    return str(evaluate_expression(args.expression))


# --- http_get ---------------------------------------------------------------------------------

_MAX_REDIRECTS = 5


class _HttpGet:
    """GET a URL on an allowed host; stream at most ``max_bytes`` of the body."""

    def __init__(
        self, registry: ToolRegistry, allowed_hosts: list[str], max_bytes: int, timeout: float
    ) -> None:
        self._registry = registry
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
        client = self._registry.http_client()
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
        raise _failed(f"GET {url}: more than {_MAX_REDIRECTS} redirects")

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


# --- write_note and search_docs ---------------------------------------------------------------


class _WriteNote:
    """Write a note at most once per op_key; an existing note counts as success."""

    def __init__(self, store: KeelStore) -> None:
        self._store = store

    async def __call__(self, args: WriteNoteArgs, ctx: ToolContext) -> str:
        key, created = await self._store.write_note_once(
            ctx.tenant, ctx.op_key, args.title, args.body, ctx.job_id
        )
        return f"note {key} written" if created else f"note {key} already written"


class _SearchDocs:
    """Search the job's document folder and list the hits, one per line."""

    def __init__(self, retriever: Retriever) -> None:
        self._retriever = retriever

    async def __call__(self, args: SearchDocsArgs, ctx: ToolContext) -> str:
        if not ctx.docs_dir:
            raise _invalid("this job has no docs folder")
        hits = await self._retriever.search(ctx.docs_dir, args.query, args.top_k, args.filters)
        if not hits:
            return "no matching documents"
        return "\n".join(f"{h.path} (score {h.score:.2f}): {h.snippet}" for h in hits)


def _job_id(given: str) -> str:
    """The job a call belongs to: as given, or the calling workflow's ID (the job ID)."""
    return given or activity.info().workflow_id or ""
