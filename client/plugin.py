"""``KeelClientPlugin``: what any client that talks to Keel jobs needs, as one Temporal plugin.

A client that starts, queries or reads Keel jobs must use Keel's data converter (pydantic models
as compact JSON, compressed by ``KeelCodec``, encrypted when keys are configured): with the
SDK's default converter the workflow's payloads come back as plain dicts, or as opaque bytes. When
OpenTelemetry is configured (the standard ``OTEL_*`` variables, see ``tracing_configured``), the
plugin also adds Temporal's tracing interceptor, so the trace a job's submit starts is the one
its workflow and every activity continue.

``keel.workers.KeelPlugin`` extends this plugin with the worker half (workflows, activities,
worker interceptors); ``keel.client.connect`` uses this one.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from temporalio.client import ClientConfig, Plugin
from temporalio.converter import DataConverter
from temporalio.service import ConnectConfig, ServiceClient

from keel.activities.converter import DATA_CONVERTER, converter_from_env, is_keel_converter
from keel.client.telemetry import tracing_configured

__all__ = ["KeelClientPlugin", "keel_converter", "tracing_interceptors", "unique_by_type"]


def keel_converter(existing: DataConverter | None) -> DataConverter:
    """Keel's converter in place of the SDK default; a different custom converter is an error.

    In place of the default, the converter this process's environment configures
    (``converter_from_env``: the encryption key ring and the inflation cap), so every client
    and worker started with the same environment reads and writes the same payloads. A Keel
    converter passed in (``keel_data_converter(keys)``) is kept as it is.

    Raises:
        ValueError: ``existing`` is another converter, or the environment's keys are malformed.
    """
    if existing is None or existing is DataConverter.default:
        return converter_from_env()
    if existing is DATA_CONVERTER or is_keel_converter(existing):
        return existing
    raise ValueError(
        "Keel's payloads need keel.activities.converter.DATA_CONVERTER; this client was given "
        "another data converter. Drop it, or pass one built by "
        "keel.activities.converter.keel_data_converter"
    )


def unique_by_type(items: Sequence[Any]) -> list[Any]:
    """Keep the first interceptor of each type: two Keel plugins must not trace a call twice."""
    seen: set[type] = set()
    kept = []
    for item in items:
        if type(item) in seen:
            continue
        seen.add(type(item))
        kept.append(item)
    return kept


def tracing_interceptors(tracing: bool | None) -> list[Any]:
    """Temporal's OpenTelemetry tracing interceptor when ``tracing`` (default: configured)."""
    if not (tracing_configured() if tracing is None else tracing):
        return []
    # Imported only when asked for: OpenTelemetry costs every CLI command ~50 ms.
    from temporalio.contrib.opentelemetry import TracingInterceptor

    return [TracingInterceptor()]


class KeelClientPlugin(Plugin):
    """Keel's data converter and, when OpenTelemetry is configured, its tracing interceptor.

    A client plugin only (the SDK's ``SimplePlugin`` would load the worker machinery into every
    ``keel status``); ``keel.workers.KeelPlugin`` is the plugin for clients that run workers.

    Example:
        >>> client = await Client.connect("localhost:7233", plugins=[KeelClientPlugin()])
        >>> jobs = AgentJobs(client)
    """

    def __init__(self, *, tracing: bool | None = None) -> None:
        """Build the plugin.

        Args:
            tracing: Add Temporal's OpenTelemetry tracing interceptor; by default only when
                ``tracing_configured()``.
        """
        self._interceptors = tracing_interceptors(tracing)
        self.tracing = bool(self._interceptors)

    def name(self) -> str:
        """See base class."""
        return "keel.KeelClientPlugin"

    def configure_client(self, config: ClientConfig) -> ClientConfig:
        """Keel's converter; the tracing interceptor once, however many Keel plugins meet."""
        config["data_converter"] = keel_converter(config.get("data_converter"))
        config["interceptors"] = unique_by_type(
            [*config.get("interceptors", []), *self._interceptors]
        )
        return config

    async def connect_service_client(
        self,
        config: ConnectConfig,
        next: Callable[[ConnectConfig], Awaitable[ServiceClient]],
    ) -> ServiceClient:
        """See base class; connecting is unchanged."""
        return await next(config)
