"""A Temporal codec server for Keel's payloads, so the Web UI and the CLI show them as JSON.

Keel's data converter compresses activity and workflow inputs and results
(``binary/keel-z1``) and, when a key ring is configured, encrypts them (``binary/encrypted``,
see ``activities.converter.KeelCodec``). Temporal's Web UI and the ``temporal`` CLI cannot read
those encodings themselves; they send payloads to a codec server, which is this app:

- ``POST /decode`` and ``POST /encode`` take ``{"payloads": [...]}`` (``temporal.api.common.v1
  .Payloads`` in protobuf JSON: metadata values and data base64) and answer in the same shape,
  as Temporal's remote codec protocol asks. Payloads the codec does not own pass through.
- With encryption on, this app holds the keys and would decrypt any payload for anyone who
  can reach it, so every request needs ``Authorization: Bearer <token>`` (``KEEL_CODEC_TOKEN``,
  compared in constant time); it refuses to start with keys and no token. The ``temporal`` CLI
  sends it with ``--codec-auth "Bearer <token>"``.
- CORS admits only the configured UI origins (never ``*``), because the UI calls the codec
  from the browser.
- A request body is counted while it is read and refused with 413 as soon as it passes the
  limit; a payload that inflates past the codec's cap is refused with 413 as well.
"""

from __future__ import annotations

import hmac
import zlib
from collections.abc import Awaitable, Callable, Sequence

import structlog
from fastapi import FastAPI, Request, Response
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from google.protobuf import json_format
from temporalio.api.common.v1 import Payload, Payloads
from temporalio.exceptions import ApplicationError

from keel.activities.converter import KeelCodec
from keel.activities.encryption import PAYLOAD_TOO_LARGE

__all__ = ["MAX_BODY_BYTES", "TOKEN_ENV", "UI_ORIGINS", "create_app"]

_Convert = Callable[[Sequence[Payload]], Awaitable[list[Payload]]]

log = structlog.get_logger("keel.codec_server")

UI_ORIGINS = ("http://127.0.0.1:8233", "http://localhost:8233")
"""Origins of ``keel dev``'s Temporal Web UI, allowed when none are configured."""

MAX_BODY_BYTES = 8 * 1024 * 1024
"""Largest request accepted: a few payloads at Temporal's 2 MB payload limit."""

TOKEN_ENV = "KEEL_CODEC_TOKEN"
"""The bearer token callers must send; required when the codec encrypts."""


class _BodyTooLarge(Exception):
    """The request body passed the limit while it was read."""


def create_app(
    origins: Sequence[str] = UI_ORIGINS,
    *,
    codec: KeelCodec | None = None,
    token: str | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
) -> FastAPI:
    """The codec server's ASGI app.

    Args:
        origins: Browser origins of the Temporal Web UIs that may call it.
        codec: The codec to serve (default: compression only, no keys).
        token: The bearer token every request must carry; required when ``codec`` has keys.
        max_body_bytes: Largest request body read.

    Raises:
        ValueError: ``codec`` encrypts and no token is given, or an origin is ``*``.
    """
    codec = codec or KeelCodec()
    if codec.keys is not None and not token:
        raise ValueError(
            f"the codec server holds encryption keys: set {TOKEN_ENV} so that only callers "
            "with the token can decrypt payloads"
        )
    if any(origin.strip() == "*" for origin in origins):
        raise ValueError("CORS origin '*' would let any web page call the codec; name the UI")
    app = FastAPI(title="Keel codec server", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(
        CORSMiddleware,
        allow_origins=list(origins),
        allow_credentials=True,
        allow_methods=["POST"],
        allow_headers=["content-type", "x-namespace", "authorization"],
    )
    expected = f"Bearer {token}".encode() if token else None

    async def convert(request: Request, how: _Convert) -> Response:
        if expected is not None and not hmac.compare_digest(
            request.headers.get("authorization", "").encode(), expected
        ):
            log.warning("codec.unauthorized", path=request.url.path)
            return _error(401, "a valid bearer token is required", {"WWW-Authenticate": "Bearer"})
        try:
            body = await _read_body(request, max_body_bytes)
        except _BodyTooLarge:
            log.warning("codec.body_too_large", path=request.url.path, limit=max_body_bytes)
            return _error(413, f"body over {max_body_bytes} bytes")
        return await _convert(body, how)

    @app.post("/encode")
    async def encode(request: Request) -> Response:
        return await convert(request, codec.encode)

    @app.post("/decode")
    async def decode(request: Request) -> Response:
        return await convert(request, codec.decode)

    @app.get("/healthz")
    async def healthz() -> Response:
        return JSONResponse({"ok": True})

    return app


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, read chunk by chunk and abandoned as soon as it passes ``limit`` bytes.

    A declared ``Content-Length`` over the limit is refused before anything is read; a chunked
    body is counted as it arrives, so a client cannot make the server buffer more than
    ``limit`` bytes and one chunk.
    """
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _BodyTooLarge
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _BodyTooLarge
        chunks.append(chunk)
    return b"".join(chunks)


async def _convert(body: bytes, convert: _Convert) -> Response:
    """Parse the payloads, convert them, answer in the protocol's JSON; 4xx on bad input."""
    try:
        given = json_format.Parse(body or b"{}", Payloads())
        converted = await convert(list(given.payloads))
    except (json_format.ParseError, ValueError) as err:
        return _error(400, f"not a Payloads JSON document: {err}")
    except zlib.error as err:
        return _error(400, f"a binary/keel-z1 payload does not decompress: {err}")
    except ApplicationError as err:
        # The codec's own refusals: a key the ring lacks, a tampered payload (400), or one that
        # inflates past the cap (413). Their messages name key IDs, never keys.
        status = 413 if err.type == PAYLOAD_TOO_LARGE else 400
        return _error(status, str(err))
    out = json_format.MessageToJson(Payloads(payloads=converted), indent=None)
    return Response(out, media_type="application/json")


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return JSONResponse({"error": message}, status_code=status, headers=headers)
