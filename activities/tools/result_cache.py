"""The tool-result cache: a read-only tool's output, served again for the same call.

Owns what a tool result is keyed by and what an entry holds; the storage, the tenant scoping,
the TTL ceiling, the counters and the degrading to misses are the cache module's
(``activities/cache.py``, ``CacheKind.TOOL``). A key's parts are:

- the tool's name and ``version`` (``activities/catalog.py``): bumping the version retires
  every result of the old behaviour;
- the canonical arguments: the validated arguments model dumped to JSON with sorted keys, so
  key order does not matter and an omitted default equals the same value given explicitly;
- the tool's scope, for a tool whose output depends on more than its arguments
  (``CacheScoped``: ``http_get`` adds its tenant's allow-list and its body cap);
- the tenant, which the cache module puts in the key's text and hash alike.

Only tools declared read-only with a positive ``cache_ttl_seconds`` are cached: write tools
never reach this module, and a tool's errors are never stored, so a failure is always retried
for real. An entry holds the full output text, not the preview: the gateway packages a hit
as it packages a fresh output, so a large output gets a blob ref of the job it is served to.

Not workflow code: Redis I/O through ``KeelCache``, called only from the gateway activity.
A hit is the activity's result like a miss, so workflow history records both the same way
and replay never reads the cache.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel

from keel.activities.cache import CacheKind, KeelCache
from keel.activities.catalog import ToolInfo
from keel.activities.tools.base import CacheScoped, ToolContext, ToolImpl

__all__ = ["ToolResultCache", "canonical_args"]


def canonical_args(args: BaseModel) -> str:
    """The arguments as a cache key sees them.

    Args:
        args: The validated arguments model; its defaults are filled in by validation.

    Returns:
        Compact JSON with sorted keys (nested mappings included).
    """
    return json.dumps(
        args.model_dump(mode="json"), sort_keys=True, ensure_ascii=False, separators=(",", ":")
    )


class ToolResultCache:
    """Keys, lookups and stores of read-only tools' results."""

    def __init__(self, cache: KeelCache | None) -> None:
        """Bind to Keel's caches.

        Args:
            cache: The worker's caches; None: no tool result is ever cached.
        """
        self._cache = cache

    async def key_for(
        self, info: ToolInfo, impl: ToolImpl, args: BaseModel, ctx: ToolContext, *, allowed: bool
    ) -> str | None:
        """The cache key of a call, or None when the call is not to be cached.

        Args:
            info: The tool's declaration: only read-only tools with a TTL are cached.
            impl: The tool; its ``cache_scope`` runs first when it has one.
            args: The validated arguments.
            ctx: Who the call runs for (its tenant scopes the key).
            allowed: False when the job opted out of caches: no lookup and no store.

        Returns:
            The key, or None for a write tool, an uncached tool, an opted-out job or a worker
            whose tool cache is off.

        Raises:
            ApplicationError: Whatever ``cache_scope`` raises when the tool would refuse the
                call (``http_get``: a URL off the allow-list).
        """
        if not (allowed and info.cacheable) or self._cache is None:
            return None
        if not self._cache.enabled(CacheKind.TOOL):
            return None
        parts: dict[str, Any] = {
            "tool": info.name,
            "version": info.version,
            "args": canonical_args(args),
        }
        if isinstance(impl, CacheScoped):
            parts["scope"] = dict(await impl.cache_scope(args, ctx))
        return self._cache.key(CacheKind.TOOL, ctx.tenant, parts)

    async def get(self, key: str) -> str | None:
        """The cached output under ``key``; None on a miss, an outage or an unreadable entry."""
        if self._cache is None:
            return None
        entry = await self._cache.get(CacheKind.TOOL, key)
        output = None if entry is None else entry.get("output")
        return output if isinstance(output, str) else None

    async def put(self, key: str, output: str, ttl_seconds: float) -> bool:
        """Store a successful output for ``ttl_seconds`` (at most the worker's tool TTL).

        Returns:
            True when stored; False when too large for the cache or Redis failed (logged and
            counted by the cache module, never raised: the call already succeeded).
        """
        if self._cache is None:
            return False
        return await self._cache.put(CacheKind.TOOL, key, {"output": output}, ttl_seconds)
