"""Whether this process should trace: the standard OpenTelemetry variables, read cheaply.

Standard library only, so the ``keel`` command can ask before it imports anything heavy.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

__all__ = ["OTEL_ENDPOINT_VARS", "tracing_configured"]

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
