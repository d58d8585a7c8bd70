"""A Temporal codec server for Keel's payloads, so the Web UI and the CLI show them as JSON.

Keel's data converter compresses activity and workflow inputs and results
(``binary/keel-z1``, see ``activities.converter``). Temporal's Web UI and the ``temporal`` CLI
cannot read that encoding themselves; they send payloads to a codec server, which is this app:

- ``POST /decode`` and ``POST /encode`` take ``{"payloads": [...]}`` (``temporal.api.common.v1
  .Payloads`` in protobuf JSON: metadata values and data base64) and answer in the same shape,
  as Temporal's remote codec protocol asks. Payloads the codec does not own pass through.
- CORS allows the configured UI origins, because the UI calls the codec from the browser.

It holds no secret and decodes nothing that the history does not already hold (compression is
not encryption), so it needs no credentials; put it behind your usual auth if the UI is.
"""

from __future__ import annotations

import zlib
from collections.abc import Awaitable, Callable, Sequence

from fastapi import FastAPI, Request, Response
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from google.protobuf import json_format
from temporalio.api.common.v1 import Payload, Payloads

from keel.activities.converter import CompressionCodec

__all__ = ["MAX_BODY_BYTES", "UI_ORIGINS", "create_app"]

_Convert = Callable[[Sequence[Payload]], Awaitable[list[Payload]]]

UI_ORIGINS = ("http://127.0.0.1:8233", "http://localhost:8233")
"""Origins of ``keel dev``'s Temporal Web UI, allowed when none are configured."""

MAX_BODY_BYTES = 8 * 1024 * 1024
"""Largest request accepted: a few payloads at Temporal's 2 MB payload limit."""


def create_app(origins: Sequence[str] = UI_ORIGINS) -> FastAPI:
    """The codec server's ASGI app.

    Args:
        origins: Browser origins of the Temporal Web UIs that may call it.
    """
    app = FastAPI(title="Keel codec server", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(
        CORSMiddleware,
        allow_origins=list(origins),
        allow_credentials=True,
        allow_methods=["POST"],
        allow_headers=["content-type", "x-namespace", "authorization"],
    )
    codec = CompressionCodec()

    @app.post("/encode")
    async def encode(request: Request) -> Response:
        return await _convert(request, codec.encode)

    @app.post("/decode")
    async def decode(request: Request) -> Response:
        return await _convert(request, codec.decode)

    @app.get("/healthz")
    async def healthz() -> Response:
        return JSONResponse({"ok": True})

    return app


async def _convert(request: Request, convert: _Convert) -> Response:
    """Parse the payloads, convert them, answer in the protocol's JSON; 400 on bad input."""
    body = await request.body()
    if len(body) > MAX_BODY_BYTES:
        return _error(413, f"body over {MAX_BODY_BYTES} bytes")
    try:
        given = json_format.Parse(body or b"{}", Payloads())
        converted = await convert(list(given.payloads))
    except (json_format.ParseError, ValueError) as err:
        return _error(400, f"not a Payloads JSON document: {err}")
    except zlib.error as err:
        return _error(400, f"a binary/keel-z1 payload does not decompress: {err}")
    out = json_format.MessageToJson(Payloads(payloads=converted), indent=None)
    return Response(out, media_type="application/json")


def _error(status: int, message: str) -> Response:
    return JSONResponse({"error": message}, status_code=status)
