"""``keel codec-server`` with encryption on (issue 16): token, CORS, bounded bodies and payloads."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys
import zlib
from collections.abc import Iterator

import httpx
import pytest
from temporalio.api.common.v1 import Payload

from keel.activities.converter import _ZDICT_V1, KeelCodec
from keel.activities.encryption import KeyRing
from tests.client.test_codec_server import as_json, read
from tests.conftest import free_port, keel_server

KEY = os.urandom(32)
TOKEN = "codec-token-" + base64.urlsafe_b64encode(os.urandom(12)).decode()
UI = "http://ui.example:8080"
LIMIT = 64 * 1024
CODEC = KeelCodec(KeyRing([("k1", KEY)]))
PLAIN = Payload(
    metadata={"encoding": b"json/plain"},
    data=json.dumps({"tenant": "acme", "goal": "What is 6 * 7?" * 5}).encode(),
)


def server_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEEL_")}
    env["KEEL_ENCRYPTION_KEYS"] = f"k1:{base64.b64encode(KEY).decode()}"
    return env | extra


@pytest.fixture(scope="module")
def codec_url() -> Iterator[str]:
    with keel_server(
        "keel codec-server",
        "codec-server",
        f"--cors-origin={UI}",
        f"--max-body-bytes={LIMIT}",
        env=server_env(KEEL_CODEC_TOKEN=TOKEN),
    ) as url:
        yield url


AUTH = {"Authorization": f"Bearer {TOKEN}"}


def test_it_refuses_to_start_with_keys_and_no_token() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "keel.workers.cli", "codec-server", f"--port={free_port()}"],
        env=server_env(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert run.returncode == 2 and "KEEL_CODEC_TOKEN" in run.stderr
    assert base64.b64encode(KEY).decode() not in run.stderr + run.stdout


def test_it_refuses_a_wildcard_origin() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "keel.workers.cli", "codec-server", f"--port={free_port()}"]
        + ["--cors-origin=*"],
        env=server_env(KEEL_CODEC_TOKEN=TOKEN),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert run.returncode == 2 and "'*'" in run.stderr


def test_decode_needs_the_token(codec_url: str) -> None:
    sealed = CODEC.encode_payload(PLAIN)
    body = as_json(sealed)
    missing = httpx.post(f"{codec_url}/decode", content=body)
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    wrong = httpx.post(f"{codec_url}/decode", content=body, headers={"Authorization": "Bearer x"})
    assert wrong.status_code == 401
    ok = httpx.post(f"{codec_url}/decode", content=body, headers=AUTH)
    assert ok.status_code == 200 and read(ok.text) == [PLAIN]


def test_encode_encrypts_with_the_current_key(codec_url: str) -> None:
    resp = httpx.post(f"{codec_url}/encode", content=as_json(PLAIN), headers=AUTH)
    [sealed] = read(resp.text)
    assert sealed.metadata["encoding"] == b"binary/encrypted"
    assert sealed.metadata["encryption-key-id"] == b"k1"
    assert CODEC.decode_payload(sealed) == PLAIN


def test_unknown_keys_and_tampering_are_400s_that_name_the_key_id(codec_url: str) -> None:
    other = KeelCodec(KeyRing([("k0", os.urandom(32))])).encode_payload(PLAIN)
    resp = httpx.post(f"{codec_url}/decode", content=as_json(other), headers=AUTH)
    assert resp.status_code == 400 and "key ID 'k0'" in resp.json()["error"]
    sealed = CODEC.encode_payload(PLAIN)
    tampered = Payload(metadata=sealed.metadata, data=sealed.data[:-1] + b"\x00")
    resp = httpx.post(f"{codec_url}/decode", content=as_json(tampered), headers=AUTH)
    assert resp.status_code == 400 and "failed authentication" in resp.json()["error"]


def test_a_decompression_bomb_is_refused(codec_url: str) -> None:
    packer = zlib.compressobj(level=9, wbits=-15, zdict=_ZDICT_V1)
    data = packer.compress(b'{"a":"' + b"A" * (32 * 1024 * 1024) + b'"}') + packer.flush()
    bomb = Payload(metadata={"encoding": b"binary/keel-z1"}, data=data)
    for payload in (bomb, CODEC.encode_payload(bomb)):
        body = as_json(payload)
        assert len(body) < LIMIT
        resp = httpx.post(f"{codec_url}/decode", content=body, headers=AUTH)
        assert resp.status_code == 413 and "limit" in resp.json()["error"]


def test_only_the_configured_ui_origin_may_call_it(codec_url: str) -> None:
    headers = {
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type,x-namespace",
    }
    allowed = httpx.options(f"{codec_url}/decode", headers=headers | {"Origin": UI})
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == UI
    assert "authorization" in allowed.headers["access-control-allow-headers"].lower()
    for origin in ("http://evil.example", "http://127.0.0.1:8233"):
        denied = httpx.options(f"{codec_url}/decode", headers=headers | {"Origin": origin})
        assert "access-control-allow-origin" not in denied.headers


async def _send_then_read(codec_url: str, head: bytes, chunks: list[bytes]) -> bytes:
    """Send ``head`` and ``chunks`` and then nothing more: the body is never finished."""
    host, port = codec_url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(head)
        for chunk in chunks:
            writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        await writer.drain()
        # The answer must come while the client still holds the rest of the body back.
        return await asyncio.wait_for(reader.read(4096), timeout=10)
    finally:
        writer.close()


async def test_a_body_over_the_limit_is_refused_while_it_streams(codec_url: str) -> None:
    head = (
        b"POST /decode HTTP/1.1\r\nHost: codec\r\nTransfer-Encoding: chunked\r\n"
        + f"Authorization: Bearer {TOKEN}\r\n\r\n".encode()
    )
    reply = await _send_then_read(codec_url, head, [b"x" * 16 * 1024] * 5)
    assert reply.startswith(b"HTTP/1.1 413")
    # A declared length over the limit is refused before any of the body is sent.
    head = (
        b"POST /decode HTTP/1.1\r\nHost: codec\r\n"
        + f"Content-Length: {LIMIT + 1}\r\nAuthorization: Bearer {TOKEN}\r\n\r\n".encode()
    )
    reply = await _send_then_read(codec_url, head, [])
    assert reply.startswith(b"HTTP/1.1 413")
