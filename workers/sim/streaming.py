"""Streamed chat completions of the LLM simulator (``stream: true``), in OpenAI's wire format.

A streamed reply is the non-streaming completion cut into ``chat.completion.chunk`` objects:
a first chunk with the role, one chunk per small piece of the content (a word, or a few
characters of a long one) or of a tool call's arguments, a chunk with the finish reason, then,
when ``stream_options.include_usage`` asks for it, a chunk with no choices and the usage, and
``data: [DONE]``. So the pieces always add up to the reply a non-streaming request gets.
``chunks`` and ``pieces`` are pure; ``sse_response`` paces the chunks (the per-token delay) and
can drop the connection halfway through (the ``cut`` fault).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import StreamingResponse

from keel.workers.sim.wire import dumps

_PIECE = re.compile(r"\s*\S{1,8}|\s+")
"""A word with the space before it, at most eight characters of it at a time."""


class StreamCut(Exception):
    """Raised inside a streamed response to drop the connection mid-stream (the ``cut`` fault).

    The server aborts the response without ending its chunked body, which a client reads as a
    broken connection, as when a provider's stream dies halfway.
    """


def pieces(text: str) -> list[str]:
    """``text`` in the small pieces a model streams; they join back to ``text`` exactly."""
    return _PIECE.findall(text)


def include_usage(body: dict[str, Any]) -> bool:
    """Whether a streamed request asked for a final usage chunk."""
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def chunks(completion: dict[str, Any], *, with_usage: bool) -> list[dict[str, Any]]:
    """The ``chat.completion.chunk`` objects that stream ``completion``.

    Args:
        completion: A non-streaming chat completion, as the simulator answers it.
        with_usage: Add OpenAI's final chunk with no choices and the usage (and ``usage: null``
            on every other chunk), as ``stream_options.include_usage`` asks.

    Returns:
        The chunks in order, without the closing ``[DONE]``.
    """
    choice = completion["choices"][0]
    message = choice["message"]
    deltas: list[dict[str, Any]] = [{"role": "assistant", "content": ""}]
    for call in message.get("tool_calls") or []:
        function = call["function"]
        head = {"index": 0, "id": call["id"], "type": "function"}
        deltas.append({"tool_calls": [head | {"function": {"name": function["name"]}}]})
        deltas.extend(
            {"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}
            for piece in pieces(function["arguments"])
        )
    deltas.extend({"content": piece} for piece in pieces(message.get("content") or ""))
    base = {
        "id": completion["id"],
        "object": "chat.completion.chunk",
        "created": completion["created"],
        "model": completion["model"],
        "system_fingerprint": completion["system_fingerprint"],
    }
    if with_usage:
        base["usage"] = None

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return base | {
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
        }

    out = [chunk(delta) for delta in deltas]
    out.append(chunk({}, choice["finish_reason"]))
    if with_usage:
        out.append(base | {"choices": [], "usage": completion["usage"]})
    return out


def sse_response(
    stream: list[dict[str, Any]], *, delay_seconds: float, cut: bool
) -> StreamingResponse:
    """The chunks as ``text/event-stream``, paced by ``delay_seconds`` and maybe cut short.

    Args:
        stream: The chunks (``chunks``).
        delay_seconds: Sleep before every chunk after the first: the simulated token rate.
        cut: Drop the connection after half of the chunks instead of finishing.

    Returns:
        The streaming response.
    """
    cut_at = len(stream) // 2 if cut else None

    async def events() -> AsyncIterator[str]:
        for index, item in enumerate(stream):
            if index == cut_at:
                raise StreamCut(f"stream cut after {index} chunks (simulated)")
            if index and delay_seconds > 0:
                await asyncio.sleep(delay_seconds)
            yield f"data: {dumps(item)}\n\n"
        yield "data: [DONE]\n\n"

    headers = {"Cache-Control": "no-cache"}
    return StreamingResponse(events(), media_type="text/event-stream", headers=headers)
