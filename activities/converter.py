"""The data converter every Keel client, worker and replayer uses.

Pydantic JSON, as in ``temporalio.contrib.pydantic``, except that model fields equal to their
defaults are left out (``exclude_defaults``): they come back as the same defaults when the
payload is read, and every job's history is smaller. ``KeelCodec`` then compresses structured
payloads and, when a key ring is configured (``activities.encryption``), encrypts every payload
except operator text (``PlainText``: summaries and details the Temporal UI shows without a codec
server). A payload Temporal would refuse (over its 2 MB limit, or, with the payload store on,
over what a reader may inflate) is refused at encoding as a non-retryable ``PayloadTooLarge``
that names the activity or workflow and the size, never retried. With the payload store on
(``activities.payload_store``, ``KEEL_PAYLOAD_STORE=on``), payloads from 256 KiB travel by
reference to Redis through the SDK's ``ExternalStorage``. Not workflow code; the converter is
deterministic, encryption is not (fresh nonces).

Wire contract: because omitted fields are restored from the current defaults, never change the
default of a field that running jobs may replay; add a new field instead.
"""

from __future__ import annotations

import copy
import os
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel
from temporalio.api.common.v1 import Payload
from temporalio.contrib.pydantic import PydanticJSONPlainPayloadConverter
from temporalio.converter import (
    ActivitySerializationContext,
    CompositePayloadConverter,
    DataConverter,
    DefaultFailureConverterWithEncodedAttributes,
    DefaultPayloadConverter,
    ExternalStorage,
    JSONPlainPayloadConverter,
    PayloadCodec,
    SerializationContext,
    WithSerializationContext,
    WorkflowSerializationContext,
)
from temporalio.exceptions import ApplicationError

from keel.activities.encryption import (
    PAYLOAD_TOO_LARGE,
    KeyRing,
    decrypt_payload,
    encrypt_payload,
    load_key_ring,
)
from keel.activities.payload_store import PayloadStoreSettings, RedisPayloadDriver


class PlainText(str):
    """Text for operators that stays readable in history when payloads are encrypted.

    Summaries and details the Temporal UI and CLI show are marked with this type; the codec
    never encrypts them, so they read without a codec server. Wrap only text Keel builds from
    structural facts (phase, iteration, tool name, budgets): never a goal, a message, a query
    or anything a model wrote.
    """


_PLAIN_TEXT_KEY = "keel-text"
"""Metadata entry marking a ``PlainText`` payload; its encoding stays ``json/plain``."""


class CompactJSONConverter(PydanticJSONPlainPayloadConverter):
    """Pydantic JSON that omits model fields holding their default value."""

    def to_payload(self, value: Any) -> Payload | None:
        """Serialise models without defaults; everything else as pydantic does."""
        if isinstance(value, BaseModel):
            data = value.model_dump_json(exclude_defaults=True).encode()
            return Payload(metadata={"encoding": self.encoding.encode()}, data=data)
        payload = super().to_payload(value)
        if isinstance(value, PlainText) and payload is not None:
            payload.metadata[_PLAIN_TEXT_KEY] = b"plain"
        return payload


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


MAX_DECODED_BYTES = 4 * 1024 * 1024
"""Default cap on what one compressed payload may inflate to: above Temporal's 2 MB payload
limit, so every payload Keel writes fits, and far below what a crafted 100 KB payload inflates to
(zlib reaches about 1000:1)."""
MAX_DECODED_BYTES_ENV = "KEEL_PAYLOAD_MAX_BYTES"
"""Overrides ``MAX_DECODED_BYTES`` for a process (bytes)."""
TEMPORAL_PAYLOAD_LIMIT = 2 * 1024 * 1024
"""The server's default ``limit.blobSize.error``: a payload over it is refused by the worker's
core (``PayloadsTooLarge``) as a *retryable* failure, so an activity whose result is too large
runs again on every attempt, and a workflow task that carries one fails and retries forever."""
MAX_ENCODED_BYTES = TEMPORAL_PAYLOAD_LIMIT - 4 * 1024
"""The codec's default cap on one encoded payload without the payload store: Temporal's limit
less room for the envelope around the payload (the field and its metadata)."""

_WORKFLOW_METADATA = b"temporal.api.sdk.v1.WorkflowMetadata"
"""The message type of the SDK's ``__temporal_workflow_metadata`` query result, which carries the
current details the UI shows (``workflow.set_current_details``); a query result, never history."""


class KeelCodec(PayloadCodec, WithSerializationContext):
    """Compress structured JSON payloads, then encrypt them when a key ring is configured.

    Compression: only ``json/plain`` payloads holding a JSON object are compressed (activity and
    workflow inputs and results), with zlib and a preset dictionary, and only when that makes
    them smaller. Decoding inflates at most ``max_decoded_bytes`` per payload and refuses more.

    Encryption (``keys`` given): every payload is then encrypted with AES-GCM under the ring's
    current key, except operator text: ``PlainText`` summaries and details, and the current
    details of the SDK's metadata query. Search attributes never pass through a codec, so they
    stay readable too.

    Decoding passes every encoding it does not own through, so histories written before
    compression or encryption was turned on, or by other SDKs, read as before; an encrypted
    payload needs its key in the ring.

    Size: encoding refuses a payload over ``max_encoded_bytes`` once encoded, and a JSON object
    over ``max_decoded_bytes`` before it is compressed (no reader would inflate it), with a
    non-retryable ``PayloadTooLarge`` naming what the payload belongs to (the SDK gives each
    activity and workflow its own copy of the codec, ``with_context``) and its size. In an
    activity that fails the activity at once instead of re-running it on every attempt.
    """

    def __init__(
        self,
        keys: KeyRing | None = None,
        *,
        max_decoded_bytes: int = MAX_DECODED_BYTES,
        max_encoded_bytes: int = MAX_ENCODED_BYTES,
    ) -> None:
        """Build the codec.

        Args:
            keys: The key ring; None leaves payloads unencrypted (and refuses encrypted ones).
            max_decoded_bytes: The most one compressed payload may inflate to.
            max_encoded_bytes: The most one payload may take once encoded.
        """
        if max_decoded_bytes < 1 or max_encoded_bytes < 1:
            raise ValueError("max_decoded_bytes and max_encoded_bytes must be positive")
        self.keys = keys
        self.max_decoded_bytes = max_decoded_bytes
        self.max_encoded_bytes = max_encoded_bytes
        self._context: SerializationContext | None = None

    def with_context(self, context: SerializationContext) -> KeelCodec:
        """This codec for payloads of ``context`` (an activity or workflow), for error text."""
        scoped = copy.copy(self)
        scoped._context = context
        return scoped

    async def encode(self, payloads: Sequence[Payload]) -> list[Payload]:
        """Compress what is worth compressing, then encrypt; see the class docstring."""
        return [self.encode_payload(p) for p in payloads]

    async def decode(self, payloads: Sequence[Payload]) -> list[Payload]:
        """Decrypt and inflate Keel's encodings; pass the rest through.

        Raises:
            ApplicationError: ``PayloadKeyUnknown``, ``PayloadTampered`` or
                ``PayloadTooLarge``, all non-retryable.
            zlib.error: A compressed payload is corrupt or cut short.
        """
        return [self.decode_payload(p) for p in payloads]

    def encode_payload(self, payload: Payload) -> Payload:
        """One payload, compressed and (with keys) encrypted.

        Raises:
            ApplicationError: ``PayloadTooLarge`` (non-retryable) past either size cap.
        """
        if len(payload.data) > self.max_decoded_bytes and _compressible(payload):
            self._refuse(len(payload.data), self.max_decoded_bytes, "before compression")
        payload = compress_payload(payload)
        if self.keys is not None and not _operator_text(payload):
            payload = encrypt_payload(payload, self.keys)
        size = payload.ByteSize()
        if size > self.max_encoded_bytes:
            self._refuse(size, self.max_encoded_bytes, "encoded")
        return payload

    def _refuse(self, size: int, limit: int, measured: str) -> None:
        raise ApplicationError(
            f"{_owner(self._context)} is {size} bytes {measured}, over the {limit}-byte payload "
            "limit; refused rather than retried (pass a reference, such as a blob key, instead)",
            type=PAYLOAD_TOO_LARGE,
            non_retryable=True,
        )

    def decode_payload(self, payload: Payload) -> Payload:
        """One payload, decrypted and inflated; see ``decode``."""
        return decompress_payload(decrypt_payload(payload, self.keys), self.max_decoded_bytes)


CompressionCodec = KeelCodec
"""The codec's name before it could encrypt; ``KeelCodec()`` without keys only compresses."""


def _owner(context: SerializationContext | None) -> str:
    """What a payload of ``context`` belongs to, for an error message (names, never data)."""
    if isinstance(context, ActivitySerializationContext):
        return (
            f"a payload of activity {context.activity_type!r} (activity ID "
            f"{context.activity_id}, workflow {context.workflow_id!r})"
        )
    if isinstance(context, WorkflowSerializationContext):
        return f"a payload of workflow {context.workflow_id!r}"
    return "a payload"


def _compressible(payload: Payload) -> bool:
    """Whether ``compress_payload`` would consider ``payload`` (a plain JSON object)."""
    return dict(payload.metadata) == {"encoding": _JSON} and payload.data[:1] == b"{"


def _operator_text(payload: Payload) -> bool:
    """Whether ``payload`` is text the UI shows without a codec server (see ``PlainText``)."""
    meta = payload.metadata
    return meta.get(_PLAIN_TEXT_KEY) == b"plain" or meta.get("messageType") == _WORKFLOW_METADATA


def compress_payload(payload: Payload) -> Payload:
    """``payload`` as ``binary/keel-z1`` when it is a JSON object that shrinks; else itself."""
    if not _compressible(payload):
        return payload
    packer = zlib.compressobj(level=6, wbits=-15, zdict=_ZDICT_V1)
    data = packer.compress(payload.data) + packer.flush()
    if len(data) + len(_Z1) - len(_JSON) >= len(payload.data):
        return payload
    return Payload(metadata={"encoding": _Z1}, data=data)


def decompress_payload(payload: Payload, max_bytes: int = MAX_DECODED_BYTES) -> Payload:
    """The ``json/plain`` payload a ``binary/keel-z1`` one was made from; others unchanged.

    Inflates in steps of at most ``max_bytes + 1`` bytes and stops there, so a crafted payload
    (97 KB inflating to 100 MB) costs at most ``max_bytes`` of memory before it is refused.

    Raises:
        ApplicationError: ``PayloadTooLarge`` (non-retryable) past ``max_bytes``.
        zlib.error: The data is not a complete ``binary/keel-z1`` stream.
    """
    if payload.metadata.get("encoding") != _Z1:
        return payload
    unpacker = zlib.decompressobj(wbits=-15, zdict=_ZDICT_V1)
    data = unpacker.decompress(payload.data, max_bytes + 1)
    if len(data) <= max_bytes and not unpacker.unconsumed_tail:
        # All input was consumed under the cap; what flush returns is the stream's last bytes.
        data += unpacker.flush()
    if len(data) > max_bytes or unpacker.unconsumed_tail:
        raise ApplicationError(
            f"a binary/keel-z1 payload of {len(payload.data)} bytes inflates past the "
            f"{max_bytes}-byte limit ({MAX_DECODED_BYTES_ENV}); refused",
            type=PAYLOAD_TOO_LARGE,
            non_retryable=True,
        )
    if not unpacker.eof:
        raise zlib.error("compressed data is cut short")
    return Payload(metadata={"encoding": _JSON}, data=data)


DATA_CONVERTER = DataConverter(
    payload_converter_class=KeelPayloadConverter, payload_codec=KeelCodec()
)
"""Keel's converter without encryption. Pass as ``data_converter`` to ``Client.connect``,
``WorkflowEnvironment`` and ``Replayer``; ``converter_from_env`` adds the configured keys."""


def keel_data_converter(
    keys: KeyRing | None = None,
    *,
    max_decoded_bytes: int = MAX_DECODED_BYTES,
    payload_store: PayloadStoreSettings | None = None,
) -> DataConverter:
    """Keel's converter with these keys, this inflation cap and this payload store.

    With keys, failure messages and stack traces are moved into an encoded (so encrypted)
    attribute too (the SDK's ``DefaultFailureConverterWithEncodedAttributes``): error text can
    quote a job's content. Error types and retryability stay readable.

    With a payload store, encoded payloads from its threshold on are written to Redis and
    travel by reference (``activities.payload_store``), and the codec's cap on one encoded
    payload rises from Temporal's limit to ``max_decoded_bytes``: what any reader may inflate.

    Args:
        keys: The key ring, or None for compression only.
        max_decoded_bytes: The most one compressed payload may inflate to.
        payload_store: Where large payloads go; None keeps every payload in history.

    Returns:
        ``DATA_CONVERTER`` when none is set, else a new converter.
    """
    if keys is None and max_decoded_bytes == MAX_DECODED_BYTES and payload_store is None:
        return DATA_CONVERTER
    failures = (
        DefaultFailureConverterWithEncodedAttributes
        if keys is not None
        else DATA_CONVERTER.failure_converter_class
    )
    storage = None
    max_encoded = MAX_ENCODED_BYTES
    if payload_store is not None:
        storage = ExternalStorage(
            drivers=[RedisPayloadDriver(payload_store)],
            payload_size_threshold=payload_store.threshold_bytes,
        )
        max_encoded = max(max_decoded_bytes, payload_store.threshold_bytes)
    return DataConverter(
        payload_converter_class=KeelPayloadConverter,
        payload_codec=KeelCodec(
            keys, max_decoded_bytes=max_decoded_bytes, max_encoded_bytes=max_encoded
        ),
        failure_converter_class=failures,
        external_storage=storage,
    )


def codec_from_env(environ: Mapping[str, str] | None = None) -> KeelCodec:
    """The codec the environment configures (keys, inflation cap); see ``converter_from_env``.

    Raises:
        ValueError: The keys or the cap are malformed (the message never holds a key).
    """
    env = os.environ if environ is None else environ
    raw = env.get(MAX_DECODED_BYTES_ENV, "").strip()
    try:
        cap = int(raw) if raw else MAX_DECODED_BYTES
    except ValueError:
        raise ValueError(f"{MAX_DECODED_BYTES_ENV} must be a number of bytes") from None
    return KeelCodec(load_key_ring(env), max_decoded_bytes=cap)


def converter_from_env(environ: Mapping[str, str] | None = None) -> DataConverter:
    """Keel's converter as this process's environment configures it.

    Reads ``KEEL_ENCRYPTION_KEYS`` or ``KEEL_ENCRYPTION_KEYS_FILE`` (encryption is off when
    neither is set), ``KEEL_PAYLOAD_MAX_BYTES`` and the payload store's settings
    (``KEEL_PAYLOAD_STORE``, off by default, its Redis URL defaulting to ``REDIS_URL``; see
    ``PayloadStoreSettings.from_env``). Every Keel client and worker builds its converter here
    (``keel.client.plugin.keel_converter``), so they agree.

    Raises:
        ValueError: The keys, the cap or the store's settings are malformed (the message never
            holds a key).
    """
    codec = codec_from_env(environ)
    return keel_data_converter(
        codec.keys,
        max_decoded_bytes=codec.max_decoded_bytes,
        payload_store=PayloadStoreSettings.from_env(environ),
    )


def is_keel_converter(converter: DataConverter) -> bool:
    """Whether ``converter`` reads and writes Keel's payloads (any keys, any cap)."""
    return converter.payload_converter_class is KeelPayloadConverter and isinstance(
        converter.payload_codec, KeelCodec
    )
