"""OpenAI wire-format helpers of the LLM simulator: message text, tokens, ids, embeddings.

Pure: no I/O, no clocks, no randomness, so the same request always gets the same reply.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import re
import struct
from functools import lru_cache
from typing import Any

EMBEDDING_DIM = 64
"""Length of every embedding vector."""
MALFORMED_CONTENT = "Sure! Here is the plan: {oops"
"""Content of a ``malformed`` fault: chatty and not valid JSON, like a misbehaving model."""

_WORD = re.compile(r"\w+")


def message_text(content: Any) -> str:
    """The text of a chat message's content, whether a string or a list of content parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)
        )
    return ""


def count_tokens(text: str) -> int:
    """Tokens the simulator bills for ``text``: one per four characters, rounded up."""
    return math.ceil(len(text) / 4)


def response_schema(response_format: Any) -> tuple[str | None, dict[str, Any]]:
    """The ``json_schema`` name and schema of a response_format (``"json_object"`` for that type).

    Returns ``(None, {})`` when the request asks for plain text.
    """
    if not isinstance(response_format, dict):
        return None, {}
    if response_format.get("type") == "json_object":
        return "json_object", {}
    spec = response_format.get("json_schema")
    if response_format.get("type") == "json_schema" and isinstance(spec, dict):
        schema = spec.get("schema")
        return str(spec.get("name", "")), schema if isinstance(schema, dict) else {}
    return None, {}


def max_tokens(body: dict[str, Any]) -> int | None:
    """The completion cap of a chat request (``max_completion_tokens`` wins over ``max_tokens``)."""
    for key in ("max_completion_tokens", "max_tokens"):
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def truncate(text: str, limit: int | None) -> tuple[str, bool]:
    """Cut ``text`` to ``limit`` tokens the way a model stops mid-output (JSON left invalid).

    Returns:
        The possibly shortened text and whether it was cut.
    """
    if limit is not None and limit < count_tokens(text):
        return text[: max(0, limit) * 4], True
    return text, False


def tool_call_id(name: str, arguments: str) -> str:
    """A deterministic tool-call id derived from the call itself."""
    return "call_" + hashlib.sha256(f"{name}:{arguments}".encode()).hexdigest()[:24]


def dumps(value: Any) -> str:
    """Compact JSON, as models emit it."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


@lru_cache(maxsize=65536)
def _bucket(word: str) -> tuple[int, float]:
    digest = hashlib.blake2b(word.encode(), digest_size=8).digest()
    return digest[0] % EMBEDDING_DIM, 1.0 if digest[1] & 1 else -1.0


def embed(text: str) -> list[float]:
    """A hashed bag-of-words vector of EMBEDDING_DIM floats, L2-normalised.

    Texts without words get a fixed unit vector so every result has norm 1.
    """
    vector = [0.0] * EMBEDDING_DIM
    for word in _WORD.findall(text.lower()):
        index, sign = _bucket(word)
        vector[index] += sign
    norm = math.sqrt(sum(v * v for v in vector))
    if norm == 0.0:
        vector[0] = 1.0
        return vector
    return [v / norm for v in vector]


def embedding_base64(vector: list[float]) -> str:
    """The vector as little-endian float32 bytes, base64-encoded (``encoding_format=base64``)."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
