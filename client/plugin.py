"""``KeelClientPlugin``: what any client that talks to Keel jobs needs, as one Temporal plugin.

A client that starts, queries or reads Keel jobs must use Keel's data converter (pydantic models
as compact JSON, compressed by ``CompressionCodec``): with the SDK's default converter the
workflow's payloads come back as plain dicts, or as compressed bytes. When OpenTelemetry is
configured (the standard ``OTEL_*`` variables, see ``tracing_configured``), the plugin also adds
Temporal's tracing interceptor, so the trace a job's submit starts is the one its workflow and
every activity continue.

``keel.workers.KeelPlugin`` extends this plugin with the worker half (workflows, activities,
worker interceptors); ``keel.client.connect`` uses this one.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from temporalio.client import ClientConfig
from temporalio.client import Interceptor as ClientInterceptor
from temporalio.converter import DataConverter
from temporalio.plugin import SimplePlugin
from temporalio.worker import Interceptor as WorkerInterceptor

from keel.activities.converter import DATA_CONVERTER

__all__ = ["KeelClientPlugin", "tracing_configured"]

OTEL_ENDPOINT_VARS = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
"""Either names where spans go, which is what "OpenTelemetry is configured" means here."""


def tracing_configured(environ: Mapping[str, str] | None = None) -> bool:
    """Whether the standard OpenTelemetry variables ask for traces to be exported.

    True when an OTLP endpoint is set or ``OTEL_TRACES_EXPORTER`` names an exporter, unless
    ``OTEL_SDK_DISABLED`` is true or ``OTEL_TRACES_EXPORTER`` is ``none``.
    """
    env = os.environ if environ is None else environ
    if env.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return False
    exporter = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter == "none":
        return False
    return bool(exporter) or any(env.get(name) for name in OTEL_ENDPOINT_VARS)


def _keel_converter(existing: DataConverter | None) -> DataConverter:
    """Keel's converter in place of the SDK default; a different custom converter is an error."""
    if existing is None or existing is DataConverter.default or existing is DATA_CONVERTER:
        return DATA_CONVERTER
    raise ValueError(
        "Keel's payloads need keel.activities.converter.DATA_CONVERTER; this client was given "
        "another data converter. Drop it, or build yours from DATA_CONVERTER with "
        "dataclasses.replace(DATA_CONVERTER, payload_codec=...) and pass that instead"
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


class KeelClientPlugin(SimplePlugin):
    """Keel's data converter and, when OpenTelemetry is configured, its tracing interceptor.

    Example:
        >>> client = await Client.connect("localhost:7233", plugins=[KeelClientPlugin()])
        >>> jobs = AgentJobs(client)
    """

    def __init__(
        self,
        *,
        tracing: bool | None = None,
        worker_interceptors: Sequence[WorkerInterceptor] = (),
        **worker_parts: Any,
    ) -> None:
        """Build the plugin.

        Args:
            tracing: Add Temporal's OpenTelemetry tracing interceptor; by default only when
                ``tracing_configured()``.
            worker_interceptors: Worker-only interceptors (used by ``KeelPlugin``).
            **worker_parts: ``SimplePlugin`` worker parameters (used by ``KeelPlugin``).
        """
        interceptors: list[ClientInterceptor | WorkerInterceptor] = list(worker_interceptors)
        if tracing_configured() if tracing is None else tracing:
            # Imported only when asked for: OpenTelemetry costs every CLI command ~50 ms.
            from temporalio.contrib.opentelemetry import TracingInterceptor

            interceptors.append(TracingInterceptor())
        self.tracing = any(type(i).__name__ == "TracingInterceptor" for i in interceptors)
        super().__init__(
            "keel.KeelPlugin",
            data_converter=_keel_converter,
            interceptors=interceptors,
            **worker_parts,
        )

    def configure_client(self, config: ClientConfig) -> ClientConfig:
        """See base class; interceptors of one type are kept once."""
        config = super().configure_client(config)
        if "interceptors" in config:
            config["interceptors"] = unique_by_type(config["interceptors"])
        return config
