"""The data converter every Keel client, worker and replayer uses.

Pydantic JSON, as in ``temporalio.contrib.pydantic``, except that model fields equal to their
defaults are left out (``exclude_defaults``): they come back as the same defaults when the
payload is read, and every job's history is smaller. Not workflow code; deterministic.

Wire contract: because omitted fields are restored from the current defaults, never change the
default of a field that running jobs may replay; add a new field instead.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel
from temporalio.api.common.v1 import Payload
from temporalio.contrib.pydantic import PydanticJSONPlainPayloadConverter
from temporalio.converter import (
    CompositePayloadConverter,
    DataConverter,
    DefaultPayloadConverter,
    JSONPlainPayloadConverter,
    PayloadCodec,
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


_JSON = b"json/plain"
_Z1 = b"binary/keel-z1"
"""The encoding of compressed payloads: ``1`` names the dictionary below."""

_ZDICT_V1 = "".join(
    (
        '"docs_dir":"',
        '"filters":{"ext":"',
        '"depends_on":["s1"]',
        '"kind":"retrieve","query":"',
        '"top_k":',
        '"retrieval_enabled":true',
        '"may_ask":false',
        '"correction":"',
        '"clarifications":[{"question":"',
        '"assumed":true}',
        '"default_assumption":"',
        '{"plan":{"decision":"ask","question":"',
        '"invalid_reason":"',
        '"error_type":"',
        '"ok":false',
        '"replayed":true',
        '"attempt":2',
        '"ref":"keel:blob:',
        '"size":',
        '"events":[{"at":"20',
        '"kind":"started","detail":"goal: ',
        '"runs":',
        '"state":{"state":"running","iteration":',
        '"started_at":"20',
        '"counters":{',
        '"retries_by_tool":{',
        '"questions":',
        '"waited_seconds":',
        '"best_draft":"',
        '"best_score":0.',
        '"continue_as_new_after":',
        '"budget":{"max_steps":',
        '"max_tool_calls":',
        '"max_retries_per_tool":',
        '"max_tokens":',
        '"max_seconds":',
        '"max_iterations":',
        '"max_questions":',
        '"ask_timeout_seconds":',
        '"notify_workflow":"',
        '"mode":"batch"',
        '{"request":{"goal":"',
        '"user":"',
        '"tools":["calculator","http_get","write_note","search_docs"]',
        '{"job_id":"agent-job-',
        '"outcome":"budget_exhausted","exhausted_budget":"max_',
        '"outcome":"completed","answer":"',
        '"verified":true',
        '"iterations":',
        '"usage":{"tokens":',
        '"steps":',
        '"tool_calls":',
        '{"hits":[{"doc_id":"',
        '"path":"',
        '"score":0.',
        '"snippet":"',
        '"metadata":{',
        '{"tool":"http_get",',
        '"args":{"url":"https://',
        '"args":{"query":"',
        '"args":{"title":"',
        '"body":"',
        '{"verdict":{"passed":false,"score":0.',
        '"critique":"',
        '{"answer":"',
        '"draft":"',
        '"observations":[{"step_id":"s1","kind":"retrieve","name":"retrieve",',
        '{"step_id":"s2","name":"calculator","content":"',
        '{"plan":{"decision":"act","rationale":"',
        '"steps":[{"id":"s1","kind":"tool","tool":"calculator","args":{"expression":"',
        '{"id":"s2","kind":"tool","tool":"http_get","args":{"url":"https://',
        '"op_key":"agent-job-',
        '"allowed_tools":["calculator"',
        '{"content":"',
        '"usage":{"prompt_tokens":',
        '"completion_tokens":',
        '"cost_usd":0.000',
        '{"tenant":"',
        '"goal":"',
        '"iteration":',
        '"max_output_tokens":',
        '"max_cost_usd":',
    )
).encode()
"""zlib's preset dictionary for ``binary/keel-z1`` payloads: fragments of Keel's JSON, the
most common last (zlib reaches those with the shortest distances). Part of the wire format:
every history written with it needs it to be read, so it never changes. A better dictionary
gets a new encoding name (``binary/keel-z2``) beside this one."""


class CompressionCodec(PayloadCodec):
    """Compress structured JSON payloads with zlib and a preset dictionary.

    Only ``json/plain`` payloads holding a JSON object are compressed: activity and workflow
    inputs and results. Strings stay as they are, so the summaries, details and current
    details an operator reads in the Temporal UI and CLI need no codec server; search
    attributes never pass through a codec. A payload is kept as it is when compression would
    not make it smaller. Decoding passes every other encoding through, so histories written
    before this codec, or by other SDKs, read as before.
    """

    async def encode(self, payloads: Sequence[Payload]) -> list[Payload]:
        """Compress what is worth compressing; see the class docstring."""
        return [compress_payload(p) for p in payloads]

    async def decode(self, payloads: Sequence[Payload]) -> list[Payload]:
        """Restore ``binary/keel-z1`` payloads to ``json/plain``; pass the rest through."""
        return [decompress_payload(p) for p in payloads]


def compress_payload(payload: Payload) -> Payload:
    """``payload`` as ``binary/keel-z1`` when it is a JSON object that shrinks; else itself."""
    plain_object = dict(payload.metadata) == {"encoding": _JSON} and payload.data[:1] == b"{"
    if not plain_object:
        return payload
    packer = zlib.compressobj(level=6, wbits=-15, zdict=_ZDICT_V1)
    data = packer.compress(payload.data) + packer.flush()
    if len(data) + len(_Z1) - len(_JSON) >= len(payload.data):
        return payload
    return Payload(metadata={"encoding": _Z1}, data=data)


def decompress_payload(payload: Payload) -> Payload:
    """The ``json/plain`` payload a ``binary/keel-z1`` one was made from; others unchanged."""
    if payload.metadata.get("encoding") != _Z1:
        return payload
    unpacker = zlib.decompressobj(wbits=-15, zdict=_ZDICT_V1)
    data = unpacker.decompress(payload.data) + unpacker.flush()
    return Payload(metadata={"encoding": _JSON}, data=data)


DATA_CONVERTER = DataConverter(
    payload_converter_class=KeelPayloadConverter, payload_codec=CompressionCodec()
)
"""Pass as ``data_converter`` to ``Client.connect``, ``WorkflowEnvironment`` and ``Replayer``."""
