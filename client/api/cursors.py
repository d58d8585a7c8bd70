"""List cursors: Temporal's visibility page token, sealed so that only this API's own go back.

``GET /v1/jobs`` pages with Temporal's ``next_page_token``. Handing callers the raw token would
let them send the server any bytes: Temporal answers a forged token with an ``UNKNOWN`` error,
which the SDK retries for seconds before the caller hears anything. So a cursor is the token
plus an HMAC-SHA256 over it and the listing it belongs to (the caller's scope and filters),
keyed by a secret every API process shares through Redis (created once, ``SET NX``). A
cursor that was altered, made up, or sent with other filters or by another tenant is refused
as a 400 before anything reaches Temporal.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets

from keel.activities.redis_client import KeelRedis
from keel.client.errors import InvalidJobRequest

__all__ = ["SECRET_KEY", "ListCursors"]

SECRET_KEY = "keel:config:cursor_secret"
"""Redis key of the shared secret cursors are sealed with (rotating it voids open cursors)."""

_VERSION = "c1"
_MAC_BYTES = 16


class ListCursors:
    """Seal page tokens into cursors and open them again, for one Redis (all API processes)."""

    def __init__(self, redis: KeelRedis) -> None:
        self._redis = redis
        self._secret: bytes | None = None

    async def seal(self, listing: str, token: bytes) -> str:
        """The cursor for ``token``, valid only for the same ``listing`` (scope and filters)."""
        mac = await self._mac(listing, token)
        return f"{_VERSION}.{_b64(token)}.{_b64(mac)}"

    async def open(self, listing: str, cursor: str | None) -> bytes | None:
        """The page token inside a cursor this API sealed for ``listing``; None for no cursor.

        Raises:
            InvalidJobRequest: With ``field="cursor"`` if it is not such a cursor.
        """
        if cursor is None:
            return None
        version, token_text, mac_text = (cursor.split(".") + ["", ""])[:3]
        token, mac = _unb64(token_text), _unb64(mac_text)
        if version != _VERSION or not token or mac is None:
            raise _refused()
        if not hmac.compare_digest(mac, await self._mac(listing, token)):
            raise _refused()
        return token

    async def _mac(self, listing: str, token: bytes) -> bytes:
        if self._secret is None:
            candidate = secrets.token_hex(32)
            ours = await self._redis.set(SECRET_KEY, candidate, nx=True)
            stored = candidate if ours else (await self._redis.get(SECRET_KEY) or candidate)
            self._secret = stored.encode() if isinstance(stored, str) else bytes(stored)
        message = listing.encode() + b"\x00" + token
        return hmac.new(self._secret, message, hashlib.sha256).digest()[:_MAC_BYTES]


def _refused() -> InvalidJobRequest:
    return InvalidJobRequest(
        "cursor", "not a cursor this listing returned (send the same filters with it)"
    )


def _b64(data: bytes) -> str:
    # Unpadded base64url: the cursor goes into a query string as it is.
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes | None:
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_", validate=True)
    except (binascii.Error, ValueError):
        return None
