"""The data converter every Keel client, worker and replayer uses.

Pydantic JSON, as in ``temporalio.contrib.pydantic``, except that model fields equal to their
defaults are left out (``exclude_defaults``): they come back as the same defaults when the
payload is read, and every job's history is smaller. Not workflow code; deterministic.

Wire contract: because omitted fields are restored from the current defaults, never change the
default of a field that running jobs may replay; add a new field instead.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from temporalio.api.common.v1 import Payload
from temporalio.contrib.pydantic import PydanticJSONPlainPayloadConverter
from temporalio.converter import (
    CompositePayloadConverter,
    DataConverter,
    DefaultPayloadConverter,
    JSONPlainPayloadConverter,
)


class CompactJSONConverter(PydanticJSONPlainPayloadConverter):
    """Pydantic JSON that omits model fields holding their default value."""

    def to_payload(self, value: Any) -> Payload | None:
        """Serialise models without defaults; everything else as pydantic does."""
        if isinstance(value, BaseModel):
            data = value.model_dump_json(exclude_defaults=True).encode()
            return Payload(metadata={"encoding": self.encoding.encode()}, data=data)
        return super().to_payload(value)


_CONVERTERS = tuple(
    CompactJSONConverter() if isinstance(c, JSONPlainPayloadConverter) else c
    for c in DefaultPayloadConverter.default_encoding_payload_converters
)
"""Built once: the SDK instantiates the payload converter class every time it derives a data
converter for a serialization context (several times per workflow task), and the pydantic
converter's type-adapter cache is worth keeping. None of them holds per-context state."""


class KeelPayloadConverter(CompositePayloadConverter):
    """The SDK's default converters with JSON replaced by CompactJSONConverter."""

    def __init__(self) -> None:
        super().__init__(*_CONVERTERS)


DATA_CONVERTER = DataConverter(payload_converter_class=KeelPayloadConverter)
"""Pass as ``data_converter`` to ``Client.connect``, ``WorkflowEnvironment`` and ``Replayer``."""
