"""Which callback URLs a tenant's jobs may name: ``host:port`` entries per tenant and shared.

From ``KEEL_WEBHOOK_HOSTS``, JSON ``{"acme": ["hooks.acme.com:443"], "*": ["ops.example:443"]}``
(``*`` is every tenant). The API and tenant-scoped clients check a job's ``callback_url`` at
submit; the delivery activity checks it again. Deterministic, I/O-free and light to import.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from urllib.parse import urlsplit

__all__ = ["SECRET_KEY_PREFIX", "SHARED", "WebhookHosts"]

SECRET_KEY_PREFIX = "keel:webhook-secret:"
"""Redis key of a tenant's webhook signing secret (``whsec_`` + base64 of 32 random bytes)."""

SHARED = "*"
"""The scope whose hosts every tenant may use."""


class WebhookHosts:
    """Per-tenant (and shared) ``host:port`` entries a callback URL must match."""

    def __init__(self, by_scope: Mapping[str, list[str]] | None = None) -> None:
        self._by_scope = {k: {e.lower() for e in v} for k, v in (by_scope or {}).items()}

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> WebhookHosts:
        """From ``KEEL_WEBHOOK_HOSTS`` (nothing allowed when unset).

        Raises:
            ValueError: If it is not a JSON object of scopes to lists of ``host:port``.
        """
        text = (os.environ if environ is None else environ).get("KEEL_WEBHOOK_HOSTS", "")
        if not text.strip():
            return cls()
        data = json.loads(text)
        if not isinstance(data, dict) or not all(isinstance(v, list) for v in data.values()):
            raise ValueError("KEEL_WEBHOOK_HOSTS must map scopes to lists of host:port")
        return cls(data)

    @property
    def configured(self) -> bool:
        """Whether any host is allowed at all."""
        return any(self._by_scope.values())

    def allows(self, tenant: str, url: str) -> bool:
        """Whether ``url``'s host and port are on ``tenant``'s list or the shared one."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            return False
        port = parts.port or (443 if parts.scheme == "https" else 80)
        entry = f"{parts.hostname.lower()}:{port}"
        return entry in self._by_scope.get(tenant, set()) | self._by_scope.get(SHARED, set())
