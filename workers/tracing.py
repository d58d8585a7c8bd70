"""OpenTelemetry for ``keel`` processes: a tracer provider exporting over OTLP, when asked for.

A process of Keel's own (``keel worker``, a job command) sets up the OpenTelemetry SDK only when
the standard variables ask for traces (``keel.client.plugin.tracing_configured``): spans go to
``OTEL_EXPORTER_OTLP_ENDPOINT`` over OTLP/HTTP, named by ``OTEL_SERVICE_NAME``. Someone else's
worker that hosts ``KeelPlugin`` keeps its own provider; this module is not used there.
"""

from __future__ import annotations

import atexit

import structlog

from keel.client.telemetry import tracing_configured

log = structlog.get_logger(__name__)


def configure_tracing(default_service_name: str) -> bool:
    """Install an OTLP-exporting tracer provider when the ``OTEL_*`` variables ask for one.

    Args:
        default_service_name: ``service.name`` when ``OTEL_SERVICE_NAME`` is unset.

    Returns:
        True when a provider was installed.
    """
    if not tracing_configured():
        return False
    try:
        from opentelemetry import trace
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import OTELResourceDetector, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        log.warning("tracing.unavailable", hint="pip install 'keel-temporal[otel]'")
        return False
    resource = Resource.create({"service.name": default_service_name}).merge(
        OTELResourceDetector().detect()
    )
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    atexit.register(provider.shutdown)
    return True
