"""The tools a worker offers (``ToolRegistry``) and the resources they share (one HTTP client).

Not workflow code: the registry owns an ``httpx.AsyncClient``, created on first use.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from keel.activities.catalog import BUILTIN_TOOLS, ToolInfo
from keel.activities.retrieval import Retriever
from keel.activities.store import KeelStore
from keel.activities.tools.base import Previewable, ToolImpl
from keel.activities.tools.calculator import calculator
from keel.activities.tools.http_get import HttpGet
from keel.activities.tools.http_post import HttpPost
from keel.activities.tools.notes import WriteNote
from keel.activities.tools.search_docs import SearchDocs

__all__ = ["ToolRegistry"]


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
            ValueError: If a tool of that name is already registered, or the tool is
                destructive and cannot preview a write (``Previewable``).
        """
        if info.name in self._tools:
            raise ValueError(f"tool {info.name!r} is already registered")
        if info.destructive and not isinstance(impl, Previewable):
            raise ValueError(f"tool {info.name!r} is destructive, so it must implement preview")
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
            A client without retries of its own (Temporal owns retries), that follows no
            redirect and takes no proxy from the environment: http_get connects to the address
            it checked itself (issue 13).
        """
        if self._http is None:
            self._http = httpx.AsyncClient(
                timeout=self._http_timeout, follow_redirects=False, trust_env=False
            )
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
        http_allowed_by_tenant: Mapping[str, list[str]] | None = None,
    ) -> ToolRegistry:
        """A registry with the built-in tools.

        Args:
            store: Where write_note writes.
            retriever: What search_docs searches with.
            http_allowed_hosts: What http_get may fetch and http_post may post to:
                ``host:port``, ``host:*`` or ``host`` (the scheme's default port); see
                ``activities/tools/http_get.py``. A job reaches http_post only when its own
                ``tools`` name it, and each request waits for a person's approval.
            http_max_bytes: Most body bytes http_get reads; the rest is cut off.
            http_timeout: Seconds for each HTTP operation, and for a whole http_get call.
            http_allowed_by_tenant: Extra http_get entries per tenant, for its calls only.

        Returns:
            The registry; call ``aclose`` on shutdown.

        Raises:
            ValueError: If an http_get allow-list entry is malformed.
        """
        registry = cls(http_timeout=http_timeout)
        http = HttpGet(
            registry.http_client,
            http_allowed_hosts,
            http_max_bytes,
            http_timeout,
            allowed_by_tenant=http_allowed_by_tenant,
        )
        post = HttpPost(
            registry.http_client,
            http_allowed_hosts,
            http_max_bytes,
            http_timeout,
            allowed_by_tenant=http_allowed_by_tenant,
        )
        tools: dict[str, ToolImpl] = {
            "calculator": calculator,
            "http_get": http,
            "http_post": post,
            "write_note": WriteNote(store),
            "search_docs": SearchDocs(retriever),
        }
        for name, impl in tools.items():
            registry.register(BUILTIN_TOOLS[name], impl)
        return registry
