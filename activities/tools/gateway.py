"""The tool gateway: the ``execute_tool`` activity every tool call of a job goes through.

Owns the job's allow-list, argument validation against ``activities/catalog.py``, destructive
tools' dry runs (a preview, changing nothing; issue 16), exactly-once recording of
side-effecting calls per op_key, serving read-only tools' results from the
tool-result cache (``result_cache.py``), and moving large outputs to a Redis blob so only a
preview enters workflow history. Not workflow code: it runs tools and reads and writes Redis.
"""

from __future__ import annotations

from urllib.parse import urlsplit

import structlog
from pydantic import BaseModel, ValidationError
from temporalio import activity
from temporalio.exceptions import ApplicationError

from keel.activities._heartbeat import heartbeating
from keel.activities.breakers import Breakers, BreakerSettings, CircuitOpen, outcome_of
from keel.activities.cache import KeelCache
from keel.activities.catalog import ToolInfo
from keel.activities.errors import (
    CIRCUIT_OPEN,
    TOOL_INPUT_INVALID,
    TOOL_NOT_ALLOWED,
    TOOL_NOT_FOUND,
)
from keel.activities.gateway_limits import GatewayLimits
from keel.activities.store import KeelStore
from keel.activities.tools.base import (
    PREVIEW_MAX_CHARS,
    Previewable,
    ToolContext,
    ToolImpl,
    tool_failed,
)
from keel.activities.tools.registry import ToolRegistry
from keel.activities.tools.result_cache import ToolResultCache
from keel.activities.types import PREVIEW_CHARS, ToolCall, ToolResult

__all__ = ["ToolActivities"]

_log = structlog.get_logger(__name__)


class ToolActivities:
    """The tool gateway activity, bound to a registry and the store."""

    def __init__(
        self,
        registry: ToolRegistry,
        store: KeelStore,
        limits: GatewayLimits | None = None,
        cache: KeelCache | None = None,
        breakers: Breakers | None = None,
    ) -> None:
        self._registry = registry
        self._breakers = breakers or Breakers(None, BreakerSettings(enabled=False))
        """The tools' circuit breakers, fleet-wide (issue 16); by default none trips."""
        self._store = store
        self._limits = limits or GatewayLimits(None)
        """The tool gateway's fleet-wide in-flight limits (issue 13); None: not limited."""
        self._results = ToolResultCache(cache)
        """Read-only tools' results (issue 14); a None cache: every call runs its tool."""

    @activity.defn(name="execute_tool")
    async def execute_tool(self, call: ToolCall) -> ToolResult:
        """Run one tool call through the gateway.

        Args:
            call: The tool, its arguments, the job's allow-list and the call's op_key.

        Returns:
            The output (or its preview and a blob ref of this job); ``cached=True`` when a
            read-only tool's result came from the tool-result cache; for a side-effecting call
            that already completed, the recorded result with ``replayed=True``.

        Raises:
            ApplicationError: ``TOOL_NOT_ALLOWED``, ``TOOL_NOT_FOUND`` or ``TOOL_INPUT_INVALID``
                (non-retryable) before the tool runs, a refusal of the tool's own checks that
                precede a cache lookup (``http_get``'s allow-list), or whatever the tool raised.
        """
        job_id = _job_id(call.job_id)
        op_key = call.op_key or f"{job_id}:{call.step_key}"
        with structlog.contextvars.bound_contextvars(
            job_id=job_id, tenant=call.tenant, tool=call.tool, op_key=op_key
        ):
            info, impl, args = self._admit(call)
            if call.dry_run and info.destructive:
                # The act phase's dry run (issue 16): nothing changes, so there is no record,
                # cache, breaker or lease; the commit is this call again without ``dry_run``.
                ctx = ToolContext(job_id, call.tenant, op_key, call.docs_dir, call.cache)
                return await _preview(info, impl, args, ctx)
            if info.side_effecting:
                recorded = await self._store.get_record(call.tenant, op_key)
                if recorded is not None:
                    _log.info("tool.replayed")
                    return recorded.model_copy(update={"replayed": True})
            ctx = ToolContext(job_id, call.tenant, op_key, call.docs_dir, call.cache)
            key = await self._results.key_for(info, impl, args, ctx, allowed=call.cache)
            if key is not None and (hit := await self._results.get(key)) is not None:
                # Packaged like a fresh output, so a large one gets a blob ref of this job.
                result = await self._package(ctx, hit, cached=True)
                _log.info("tool.cache_hit", size=result.size or len(result.content))
                return result
            # The tool's breaker (issue 16), fleet-wide: open, the call fails fast and the
            # plan proceeds without the tool; only the provider's retryable failures count.
            try:
                admission = await self._breakers.admit(_breaker_name(call))
            except CircuitOpen as open_:
                raise ApplicationError(
                    str(open_), open_.name, type=CIRCUIT_OPEN, non_retryable=True
                ) from None
            failure: BaseException | None = None
            try:
                # The tool's in-flight limit first: waiting for it heartbeats and never raises.
                async with self._limits.tool(call.tool), heartbeating():
                    output = await impl(args, ctx)
            except BaseException as err:
                failure = err
                raise
            finally:
                await self._breakers.record(admission, outcome_of(failure))
            result = await self._package(ctx, output)
            if key is not None:
                result.cached = False  # looked up and missed: the job counts it
            if info.side_effecting:
                await self._store.put_record(call.tenant, op_key, result)
            if key is not None:
                # Only a successful output gets here: a tool's error is never cached.
                await self._results.put(key, output, info.cache_ttl_seconds)
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

    async def _package(
        self, ctx: ToolContext, output: str, *, cached: bool | None = None
    ) -> ToolResult:
        """Keep small outputs inline; move large ones to a blob and keep a preview."""
        attempt = activity.info().attempt
        if len(output) <= PREVIEW_CHARS:
            # Inline: the content is the whole output, so its length is the size.
            return ToolResult(content=output, attempt=attempt, cached=cached)
        # Workflow history has a 2 MB payload limit, so only a preview and the ref go there.
        ref = await self._store.put_blob(ctx.tenant, ctx.op_key, output)
        return ToolResult(
            content=output[:PREVIEW_CHARS],
            ref=ref,
            size=len(output),
            attempt=attempt,
            cached=cached,
        )


async def _preview(info: ToolInfo, impl: ToolImpl, args: BaseModel, ctx: ToolContext) -> ToolResult:
    """Run a destructive tool's preview: what its commit would do, with nothing changed."""
    if not isinstance(impl, Previewable):
        # The registry refuses such a tool; a hand-built gateway could still hold one.
        raise tool_failed(f"tool {info.name!r} is destructive but cannot preview a write")
    text = await impl.preview(args, ctx)
    _log.info("tool.previewed", approval=info.requires_approval)
    return ToolResult(
        content=text[:PREVIEW_MAX_CHARS],
        attempt=activity.info().attempt,
        preview=True,
        requires_approval=info.requires_approval,
    )


def _summarize(error: ValidationError) -> str:
    """Field names and messages of a validation error, without the (possibly large) inputs."""
    parts = [
        f"{'.'.join(str(p) for p in err['loc']) or '(args)'}: {err['msg']}"
        for err in error.errors(include_url=False, include_input=False)
    ]
    return "; ".join(parts)[:500]


def _job_id(given: str) -> str:
    """The job a call belongs to: as given, or the calling workflow's ID (the job ID)."""
    return given or activity.info().workflow_id or ""


def _breaker_name(call: ToolCall) -> str:
    """The breaker of a call: its tool, and for a tool that reaches a URL, the URL's host.

    A host that fails trips only its own breaker, so a tenant whose allow-listed host is down
    (or who calls a path that fails on purpose) cannot cut ``http_get`` off for everyone else.
    """
    url = call.args.get("url")
    if isinstance(url, str):
        host = urlsplit(url).netloc.rsplit("@", 1)[-1].lower()
        if host:
            return f"tool:{call.tool}:{host}"
    return f"tool:{call.tool}"
