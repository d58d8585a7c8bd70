"""Connect to Temporal the way every Keel process does: environment config plus pydantic payloads.

``temporalio.envconfig`` reads ``TEMPORAL_ADDRESS``, ``TEMPORAL_NAMESPACE``,
``TEMPORAL_API_KEY``, ``TEMPORAL_TLS*`` and the ``temporal`` CLI's config profiles, so a Keel
client, the ``temporal`` CLI and the workers agree on where the server is. The pydantic data
converter is not optional: the workflow's payloads are pydantic models, and a client with the
default converter would read them back as plain dicts.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import timedelta

from temporalio.client import Client, Plugin
from temporalio.envconfig import ClientConfig
from temporalio.runtime import Runtime

from keel.client.errors import ConnectionFailed
from keel.client.plugin import KeelClientPlugin

__all__ = ["DEFAULT_ADDRESS", "connect"]

DEFAULT_ADDRESS = "localhost:7233"
"""Where ``keel dev`` (``temporal server start-dev``) listens when nothing else is configured."""

CONNECT_TIMEOUT = timedelta(seconds=10)
"""Give up on an address that swallows packets instead of hanging a CLI command."""

_log = logging.getLogger(__name__)


async def connect(
    *,
    address: str | None = None,
    namespace: str | None = None,
    runtime: Runtime | None = None,
    plugins: Sequence[Plugin] = (),
) -> Client:
    """Connect a Temporal client configured for Keel.

    Args:
        address: ``host:port`` that overrides ``TEMPORAL_ADDRESS`` and the config profile.
        namespace: Namespace that overrides ``TEMPORAL_NAMESPACE`` and the config profile.
        runtime: SDK runtime to use (workers pass one that exports Prometheus metrics).
        plugins: Plugins for the client; a ``KeelClientPlugin`` (Keel's converter and, when
            configured, tracing) is added unless a Keel plugin is given (``KeelPlugin``).

    Returns:
        A connected client using Keel's data converter.

    Raises:
        ConnectionFailed: If the server cannot be reached; the message names the address.
    """
    config = ClientConfig.load_client_connect_config()
    config.setdefault("target_host", DEFAULT_ADDRESS)
    if address:
        config["target_host"] = address
    if namespace:
        config["namespace"] = namespace
    target = config["target_host"]
    # Log only what locates the server; the API key and TLS material stay out of every log.
    _log.debug(
        "connecting to Temporal",
        extra={
            "target_host": target,
            "namespace": config.get("namespace", "default"),
            "api_key_set": "api_key" in config,
            "tls": bool(config.get("tls")),
        },
    )
    try:
        if not any(p.name().startswith("keel.") for p in plugins):
            plugins = [KeelClientPlugin(), *plugins]
        return await Client.connect(
            **config,
            plugins=plugins,
            connect_timeout=CONNECT_TIMEOUT,
            runtime=runtime,
        )
    except RuntimeError as err:
        # The SDK's core raises a bare RuntimeError("Failed client connect: ...") here.
        detail = str(err).removeprefix("Failed client connect: ")
        raise ConnectionFailed(target, _short(detail)) from err


def _short(detail: str, limit: int = 160) -> str:
    """Keep a transport error on one readable line."""
    for marker in ("Connection refused", "dns error", "timed out", "deadline has elapsed"):
        if marker.lower() in detail.lower():
            return marker.lower()
    line = " ".join(detail.split())
    return line if len(line) <= limit else line[: limit - 1] + "…"
