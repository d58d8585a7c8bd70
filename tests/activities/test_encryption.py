"""Payload encryption and bounded inflation (issue 16): KeelCodec with a key ring."""

from __future__ import annotations

import base64
import json
import os
import zlib
from pathlib import Path

import pytest
from temporalio.api.common.v1 import Payload
from temporalio.exceptions import ApplicationError

from keel.activities.converter import (
    _ZDICT_V1,
    DATA_CONVERTER,
    KeelCodec,
    PlainText,
    codec_from_env,
    compress_payload,
    converter_from_env,
    decompress_payload,
    keel_data_converter,
)
from keel.activities.encryption import (
    PAYLOAD_KEY_UNKNOWN,
    PAYLOAD_TAMPERED,
    PAYLOAD_TOO_LARGE,
    KeyRing,
    load_key_ring,
)
from keel.workflows.types import JobRequest

KEY_A, KEY_B = os.urandom(32), os.urandom(32)
GOAL = "the launch code is swordfish-4471"
REQ = JobRequest(goal=GOAL, tenant="acme", tools=["calculator"])


def ring(*entries: tuple[str, bytes]) -> KeyRing:
    return KeyRing(list(entries))


def spec(*entries: tuple[str, bytes]) -> str:
    return ",".join(f"{i}:{base64.b64encode(k).decode()}" for i, k in entries)


def bomb(inflated: int) -> Payload:
    """A ``binary/keel-z1`` payload of a few KB that inflates to ``inflated`` bytes."""
    packer = zlib.compressobj(level=9, wbits=-15, zdict=_ZDICT_V1)
    data = packer.compress(b'{"a":"' + b"A" * inflated + b'"}') + packer.flush()
    return Payload(metadata={"encoding": b"binary/keel-z1"}, data=data)


async def test_a_model_is_compressed_then_encrypted_and_reads_back() -> None:
    converter = keel_data_converter(ring(("a", KEY_A)))
    [encoded] = await converter.encode([REQ])
    assert encoded.metadata["encoding"] == b"binary/encrypted"
    assert encoded.metadata["encryption-key-id"] == b"a"
    assert GOAL.encode() not in encoded.SerializeToString()
    # Compressed before it was encrypted: smaller than the JSON it holds.
    [plain] = converter.payload_converter.to_payloads([REQ])
    assert len(encoded.data) < len(plain.data) + 12 + 16 + 20
    inner = KeelCodec(ring(("a", KEY_A)), max_decoded_bytes=1 << 20)
    assert (await converter.decode([encoded], [JobRequest])) == [REQ]
    assert inner.decode_payload(encoded) == plain


async def test_every_payload_gets_a_fresh_nonce() -> None:
    converter = keel_data_converter(ring(("a", KEY_A)))
    first, second = await converter.encode([REQ, REQ])
    assert first.data[:12] != second.data[:12] and first.data != second.data


async def test_operator_text_stays_plain_and_other_strings_are_encrypted() -> None:
    converter = keel_data_converter(ring(("a", KEY_A)))
    marked, content = await converter.encode([PlainText("plan · iteration 1"), GOAL])
    assert marked.metadata["encoding"] == b"json/plain"
    assert json.loads(marked.data) == "plan · iteration 1"
    assert content.metadata["encoding"] == b"binary/encrypted"
    assert (await converter.decode([marked, content])) == ["plan · iteration 1", GOAL]


async def test_rotation_old_key_decrypts_newest_encrypts_removed_key_is_named() -> None:
    [old] = await keel_data_converter(ring(("a", KEY_A))).encode([REQ])
    rotated = keel_data_converter(ring(("b", KEY_B), ("a", KEY_A)))
    assert (await rotated.decode([old], [JobRequest])) == [REQ]
    [new] = await rotated.encode([REQ])
    assert new.metadata["encryption-key-id"] == b"b"
    with pytest.raises(ApplicationError) as raised:
        await keel_data_converter(ring(("b", KEY_B))).decode([old], [JobRequest])
    assert raised.value.type == PAYLOAD_KEY_UNKNOWN and raised.value.non_retryable
    assert "'a'" in str(raised.value) and "b" in str(raised.value)
    assert base64.b64encode(KEY_A).decode() not in str(raised.value)


async def test_a_tampered_payload_fails_authentication() -> None:
    codec = KeelCodec(ring(("a", KEY_A)))
    [encoded] = await codec.encode(DATA_CONVERTER.payload_converter.to_payloads([REQ]))
    for i in (0, 20, len(encoded.data) - 1):  # the nonce, the ciphertext, the tag
        flipped = bytearray(encoded.data)
        flipped[i] ^= 1
        tampered = Payload(metadata=encoded.metadata, data=bytes(flipped))
        with pytest.raises(ApplicationError) as raised:
            codec.decode_payload(tampered)
        assert raised.value.type == PAYLOAD_TAMPERED and raised.value.non_retryable
    # Relabelling the key ID to another key in the ring fails too (it is authenticated data).
    both = KeelCodec(ring(("a", KEY_A), ("b", KEY_A)))
    relabelled = Payload(metadata={**encoded.metadata, "encryption-key-id": b"b"})
    relabelled.data = encoded.data
    with pytest.raises(ApplicationError, match="'b' failed authentication"):
        both.decode_payload(relabelled)


async def test_an_encrypted_payload_without_keys_is_a_clear_error() -> None:
    [encoded] = await keel_data_converter(ring(("k1", KEY_A))).encode([REQ])
    with pytest.raises(ApplicationError, match="key ID 'k1'.*KEEL_ENCRYPTION_KEYS is not set"):
        await DATA_CONVERTER.decode([encoded], [JobRequest])


async def test_payloads_written_before_encryption_still_read() -> None:
    converter = keel_data_converter(ring(("a", KEY_A)))
    [plain] = DATA_CONVERTER.payload_converter.to_payloads([REQ])
    [compressed] = await DATA_CONVERTER.encode([REQ])
    assert compressed.metadata["encoding"] == b"binary/keel-z1"
    assert (await converter.decode([plain, compressed], [JobRequest, JobRequest])) == [REQ, REQ]


def test_a_decompression_bomb_is_refused_at_the_cap() -> None:
    payload = bomb(100 * 1024 * 1024)
    assert len(payload.data) < 150 * 1024  # ~100 KB on the wire
    with pytest.raises(ApplicationError) as raised:
        decompress_payload(payload)
    assert raised.value.type == PAYLOAD_TOO_LARGE and raised.value.non_retryable
    assert "4194304-byte limit" in str(raised.value)
    # Just under the cap inflates; one byte over does not.
    fits = bomb(1000)
    assert len(decompress_payload(fits, max_bytes=1008).data) == 1008
    with pytest.raises(ApplicationError, match="1007-byte limit"):
        decompress_payload(fits, max_bytes=1007)


async def test_the_cap_applies_inside_an_encrypted_payload() -> None:
    keys = ring(("a", KEY_A))
    sealed = KeelCodec(keys).encode_payload(bomb(10 * 1024 * 1024))
    assert sealed.metadata["encoding"] == b"binary/encrypted"
    with pytest.raises(ApplicationError) as raised:
        await KeelCodec(keys).decode([sealed])
    assert raised.value.type == PAYLOAD_TOO_LARGE


def test_a_truncated_stream_is_an_error_not_a_prefix() -> None:
    whole = compress_payload(
        Payload(metadata={"encoding": b"json/plain"}, data=json.dumps({"x": "y" * 500}).encode())
    )
    cut = Payload(metadata=whole.metadata, data=whole.data[: len(whole.data) // 2])
    with pytest.raises(zlib.error):
        decompress_payload(cut)


def test_keys_come_from_the_environment_or_a_file(tmp_path: Path) -> None:
    assert load_key_ring({}) is None
    assert converter_from_env({}) is DATA_CONVERTER
    keys = load_key_ring({"KEEL_ENCRYPTION_KEYS": spec(("new", KEY_B), ("old", KEY_A))})
    assert keys is not None and keys.ids == ["new", "old"] and keys.current_id == "new"
    path = tmp_path / "keys"
    path.write_text(f"# rotated 2025-01\n{spec(('new', KEY_B))}\n{spec(('old', KEY_A))}\n")
    from_file = load_key_ring({"KEEL_ENCRYPTION_KEYS_FILE": str(path)})
    assert from_file is not None and from_file.ids == ["new", "old"]
    codec = codec_from_env({"KEEL_ENCRYPTION_KEYS_FILE": str(path), "KEEL_PAYLOAD_MAX_BYTES": "99"})
    assert codec.keys is not None and codec.max_decoded_bytes == 99
    # A ring prints its IDs only.
    assert base64.b64encode(KEY_B).decode() not in repr(from_file) and "new" in repr(from_file)


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"KEEL_ENCRYPTION_KEYS": "a:" + base64.b64encode(b"short").decode()}, "5 bytes"),
        ({"KEEL_ENCRYPTION_KEYS": "a:not base64!"}, "'a' is not valid base64"),
        ({"KEEL_ENCRYPTION_KEYS": spec(("a", KEY_A), ("a", KEY_B))}, "appears twice"),
        ({"KEEL_ENCRYPTION_KEYS": base64.b64encode(KEY_A).decode()}, "id:base64key"),
        ({"KEEL_ENCRYPTION_KEYS": "x", "KEEL_ENCRYPTION_KEYS_FILE": "/k"}, "not both"),
        ({"KEEL_ENCRYPTION_KEYS_FILE": "/nonexistent/keys"}, "cannot read"),
    ],
)
def test_malformed_keys_are_refused_without_echoing_them(
    environ: dict[str, str], message: str
) -> None:
    with pytest.raises(ValueError, match=message) as raised:
        load_key_ring(environ)
    for value in environ.values():
        for part in value.split(","):
            secret = part.partition(":")[2]
            if len(secret) > 8:
                assert secret not in str(raised.value)
