"""An OpenAI-compatible LLM simulator for offline development, tests and benchmarks.

This module owns the simulator's HTTP surface: ``SimConfig``, the FastAPI app built by
``create_app`` and the blocking ``serve`` entry point. Keel's agent code reaches it only
through the ``openai`` client, exactly as it would reach OpenAI, so the whole plan → act →
verify → refine loop runs for real without a network or an API key.

Replies are deterministic (see ``workers/_sim_logic.py``); a goal can steer them with a
``[sim: ...]`` directive, for example ``[sim: ask, fail_verify=1, fault=503x2, tokens=500]``.
Faults, latency and counters are handled here. Random faults and jitter draw from one
``random.Random(config.seed)`` per app, so a given sequence of requests sees the same faults.

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/embeddings``, ``GET /v1/models``,
``GET /health``, ``GET /_sim/stats`` and ``POST /_sim/reset``. Run it with
``python -m workers.simulator --port 8089``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import time
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException

from keel.workers import _sim_logic as logic
from keel.workers.serving import serve_app

FaultKind = Literal["500", "503", "429", "timeout", "malformed"]

_REQUEST_KINDS = ("plan", "answer", "verify", "chat", "embeddings")
_INVALID = "invalid_request_error"
_NO_DIRECTIVES = logic.Directives()
_ERRORS: dict[str, tuple[int, str, str, str]] = {
    "500": (500, "server_error", "internal_error", "The server had an error (simulated 500)."),
    "503": (503, "server_error", "service_unavailable", "The engine is overloaded (simulated)."),
    "429": (429, "rate_limit_exceeded", "rate_limit_exceeded", "Rate limit reached (simulated)."),
    "401": (401, "authentication_error", "invalid_api_key", "Incorrect API key (simulated)."),
    "400": (400, "invalid_request_error", "invalid_request", "Invalid request (simulated)."),
    "timeout": (504, "timeout", "timeout", "The model did not answer in time (simulated)."),
}
"""Status, error type, code and message of each injected HTTP fault."""


class SimConfig(BaseModel):
    """How the simulator behaves: latency, random faults and verification defaults."""

    latency_ms: float = Field(default=0.0, ge=0.0)
    """Delay added to every ``/v1`` response."""
    latency_jitter_ms: float = Field(default=0.0, ge=0.0)
    """Uniform extra delay in ``[0, jitter)`` drawn from the seeded RNG."""
    fault_rate: float = Field(default=0.0, ge=0.0, le=1.0)
    """Probability that a chat or embeddings request gets a random fault."""
    fault_kinds: list[FaultKind] = Field(default_factory=lambda: list[FaultKind](["503"]))
    """Faults the random fault rate picks from, uniformly."""
    retry_after_seconds: float = Field(default=1.0, ge=0.0)
    """Retry-After header value on 429."""
    timeout_seconds: float = Field(default=30.0, ge=0.0)
    """How long a ``timeout`` fault stalls before answering 504."""
    fail_first_verify: bool = False
    """Fail verification on iteration 0 for every goal, forcing one refine."""
    seed: int = 0
    """Seed of the app's RNG (random faults and jitter)."""
    models: list[str] = Field(default_factory=lambda: ["sim-small", "sim-large"])
    """Model ids listed by ``/v1/models``; any model name is accepted and echoed."""


class _SimError(Exception):
    """An error answered in OpenAI's error shape."""

    def __init__(self, status: int, message: str, type_: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code = status, message, type_, code


def _error(
    status: int, message: str, type_: str, code: str | None, headers: dict[str, str] | None = None
) -> JSONResponse:
    body = {"error": {"message": message, "type": type_, "param": None, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


class _SimState:
    """Counters and the RNG of one app; touched only from its event loop, so no locks."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.reset()

    def reset(self) -> None:
        self.rng = random.Random(self.config.seed)
        self.requests = dict.fromkeys(_REQUEST_KINDS, 0)
        self.faults = dict.fromkeys(logic.FAULT_KINDS, 0)
        self.fault_hits: dict[str, int] = {}
        self.completions = 0

    async def delay(self, extra_ms: float = 0.0) -> None:
        cfg = self.config
        ms = cfg.latency_ms + extra_ms
        if cfg.latency_jitter_ms > 0:
            ms += self.rng.uniform(0.0, cfg.latency_jitter_ms)
        if ms > 0:
            await asyncio.sleep(ms / 1000)

    def pick_fault(self, kind: str, goal: str | None, directives: logic.Directives) -> str | None:
        """The fault this request gets: a goal directive first, else a random one."""
        cfg = self.config
        random_fault = None
        if cfg.fault_rate > 0 and self.rng.random() < cfg.fault_rate and cfg.fault_kinds:
            random_fault = self.rng.choice(cfg.fault_kinds)
        fault = directives.fault
        if goal is not None and fault and (fault != "malformed_plan" or kind == "plan"):
            key = logic.fault_key(goal, fault)
            hits = self.fault_hits.get(key, 0)
            if directives.fault_count is None or hits < directives.fault_count:
                self.fault_hits[key] = hits + 1
                self.faults[fault] += 1
                return fault
        if random_fault:
            self.faults[random_fault] += 1
        return random_fault

    async def fault_response(self, fault: str, api_key: str = "") -> JSONResponse:
        """The HTTP error of an injected fault (``timeout`` stalls first).

        A 401 names the key it was sent, masked, as OpenAI's does: a client must not pass it on.
        """
        status, type_, code, message = _ERRORS[fault]
        if fault == "401":
            message = f"Incorrect API key provided: {_masked(api_key)} (simulated)."
        headers = None
        if fault == "429":
            headers = {"Retry-After": f"{self.config.retry_after_seconds:g}"}
        elif fault == "timeout":
            await asyncio.sleep(self.config.timeout_seconds)
        return _error(status, message, type_, code, headers)

    async def chat(self, body: dict[str, Any], api_key: str = "") -> Response:
        """Answer ``POST /v1/chat/completions``; ``api_key`` is the bearer token it came with."""
        if body.get("stream"):
            raise _SimError(400, "streaming not supported by the simulator", _INVALID, "stream")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _SimError(400, "messages must be a non-empty list", _INVALID, "messages")
        if not all(isinstance(m, dict) for m in messages):
            raise _SimError(400, "every message must be an object", _INVALID, "messages")
        reply = _reply(body, messages, self.config)
        self.requests[reply.kind] += 1
        await self.delay(reply.directives.slow_ms)
        fault = self.pick_fault(reply.kind, reply.raw_goal, reply.directives)
        content, call = reply.content, reply.call
        if fault in ("malformed", "malformed_plan"):
            content, call = logic.MALFORMED_CONTENT, None
        elif fault:
            return await self.fault_response(fault, api_key)
        return JSONResponse(self._completion(body, messages, content, call, reply.directives))

    def _completion(
        self,
        body: dict[str, Any],
        messages: list[dict[str, Any]],
        content: str | None,
        call: dict[str, str] | None,
        directives: logic.Directives,
    ) -> dict[str, Any]:
        max_tokens = logic.max_tokens(body)
        message: dict[str, Any] = {"role": "assistant", "content": None, "refusal": None}
        if call is not None:
            arguments, cut = logic.truncate(call["arguments"], max_tokens)
            billed = call["name"] + arguments
            function = {"name": call["name"], "arguments": arguments}
            call_id = logic.tool_call_id(call["name"], call["arguments"])
            message["tool_calls"] = [{"id": call_id, "type": "function", "function": function}]
        else:
            billed, cut = logic.truncate(content or "", max_tokens)
            message["content"] = billed
        finish = "length" if cut else "tool_calls" if call is not None else "stop"
        chars = sum(len(logic.message_text(m.get("content"))) for m in messages)
        prompt_tokens = math.ceil(chars / 4)
        completion_tokens = logic.count_tokens(billed) + directives.extra_tokens
        self.completions += 1
        return {
            "id": f"chatcmpl-sim{self.completions:08d}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body["model"],
            "system_fingerprint": "keel-sim",
            "choices": [
                {"index": 0, "message": message, "finish_reason": finish, "logprobs": None}
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }

    async def embeddings(self, body: dict[str, Any]) -> Response:
        """Answer ``POST /v1/embeddings``."""
        raw = body.get("input")
        single = isinstance(raw, str) or (
            isinstance(raw, list) and bool(raw) and all(isinstance(x, int) for x in raw)
        )
        items = [raw] if single else raw
        if not isinstance(items, list) or not items:
            raise _SimError(400, "input must be a string or a non-empty list", _INVALID, "input")
        encoding = body.get("encoding_format") or "float"
        if encoding not in ("float", "base64"):
            raise _SimError(400, "encoding_format must be float or base64", _INVALID, "encoding")
        texts = [
            x if isinstance(x, str) else " ".join(map(str, x)) if isinstance(x, list) else str(x)
            for x in items
        ]
        self.requests["embeddings"] += 1
        await self.delay()
        fault = self.pick_fault("embeddings", None, _NO_DIRECTIVES)
        if fault == "malformed":
            return Response(logic.MALFORMED_CONTENT, media_type="application/json")
        if fault:
            return await self.fault_response(fault)
        data = []
        for index, text in enumerate(texts):
            vector = logic.embed(text)
            value = logic.embedding_base64(vector) if encoding == "base64" else vector
            data.append({"object": "embedding", "index": index, "embedding": value})
        tokens = sum(logic.count_tokens(t) for t in texts)
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        return JSONResponse(
            {"object": "list", "data": data, "model": body["model"], "usage": usage}
        )

    async def models(self) -> Response:
        """Answer ``GET /v1/models``."""
        await self.delay()
        return JSONResponse({"object": "list", "data": [_model(m) for m in self.config.models]})

    def stats(self) -> dict[str, Any]:
        """Requests seen by kind and faults injected by kind since start or the last reset."""
        return {"requests": dict(self.requests), "faults": dict(self.faults)}


async def _json_body(request: Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _SimError(400, f"request body is not valid JSON: {exc}", _INVALID) from exc
    if not isinstance(body, dict):
        raise _SimError(400, "request body must be a JSON object", _INVALID)
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise _SimError(400, "you must provide a model parameter", _INVALID, "model")
    return body


@dataclass(frozen=True)
class _Reply:
    """What a chat request asked for and what the simulator answers (before faults)."""

    kind: str
    raw_goal: str
    directives: logic.Directives
    content: str | None
    call: dict[str, str] | None = None


def _reply(body: dict[str, Any], messages: list[dict[str, Any]], config: SimConfig) -> _Reply:
    name, schema = logic.response_schema(body.get("response_format"))
    users = [m for m in messages if m.get("role") == "user"]
    text = logic.message_text((users or messages)[-1].get("content"))
    kind = logic.KEEL_KINDS.get(name or "", "chat")
    payload: dict[str, Any] = {}
    if kind != "chat":
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError:
            parsed = None
        payload = parsed if isinstance(parsed, dict) else {"goal": text}
    raw_goal = payload["goal"] if isinstance(payload.get("goal"), str) else text
    goal, directives = logic.parse_goal(raw_goal)
    reply: dict[str, Any] | None = None
    if kind == "plan":
        reply = logic.plan_reply(payload, goal, directives)
    elif kind == "answer":
        reply = logic.answer_reply(payload, goal)
    elif kind == "verify":
        reply = logic.verdict_reply(payload, directives, fail_first_verify=config.fail_first_verify)
    elif name == "json_object":
        reply = {"reply": f"Simulated reply to: {goal[:200]}"}
    elif name:
        reply = logic.build_args(schema, goal)
    if reply is not None:
        return _Reply(kind, raw_goal, directives, logic.dumps(reply))
    content, call = logic.chat_reply(messages, goal, body.get("tools"), body.get("tool_choice"))
    return _Reply(kind, raw_goal, directives, content, call)


def _masked(key: str) -> str:
    """A key as OpenAI's 401 shows it: the first three and last four characters."""
    return f"{key[:3]}{'*' * (len(key) - 7)}{key[-4:]}" if len(key) > 10 else "***"


def _bearer(request: Request) -> str:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def _model(model_id: str) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": 0, "owned_by": "keel-sim"}


def create_app(config: SimConfig) -> FastAPI:
    """Build the simulator app; each app has its own counters and seeded RNG.

    Args:
        config: Latency, fault and verification behaviour.

    Returns:
        A FastAPI app serving the OpenAI-compatible endpoints and ``/_sim`` controls.
    """
    state = _SimState(config)
    app = FastAPI(title="Keel LLM simulator", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.sim = state

    @app.exception_handler(_SimError)
    async def on_sim_error(_request: Request, exc: _SimError) -> Response:
        return _error(exc.status, exc.message, exc.type, exc.code)

    @app.exception_handler(HTTPException)
    async def on_http_error(_request: Request, exc: HTTPException) -> Response:
        headers = dict(exc.headers) if exc.headers else None
        return _error(exc.status_code, str(exc.detail), _INVALID, None, headers)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await state.chat(await _json_body(request), _bearer(request))

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> Response:
        return await state.embeddings(await _json_body(request))

    @app.get("/v1/models")
    async def list_models() -> Response:
        return await state.models()

    @app.get("/v1/models/{model_id}")
    async def get_model(model_id: str) -> Response:
        if model_id not in config.models:
            message = f"The model `{model_id}` does not exist"
            raise _SimError(404, message, _INVALID, "model_not_found")
        return JSONResponse(_model(model_id))

    @app.get("/health")
    async def health() -> Response:
        return JSONResponse({"ok": True})

    @app.get("/_sim/stats")
    async def stats() -> Response:
        return JSONResponse(state.stats())

    @app.post("/_sim/reset")
    async def reset() -> Response:
        state.reset()
        return JSONResponse({"ok": True})

    return app


def serve(config: SimConfig, host: str = "127.0.0.1", port: int = 8089) -> None:
    """Run the simulator until SIGINT or SIGTERM, then return after a graceful shutdown.

    Args:
        config: Latency, fault and verification behaviour.
        host: Interface to bind.
        port: TCP port to bind.
    """
    # A request stalled by a ``timeout`` fault must not hold up shutdown for long.
    serve_app(create_app(config), host, port, graceful_seconds=2)


def main(argv: list[str] | None = None) -> None:
    """Command line: ``python -m workers.simulator [--port 8089] [--latency-ms 20] ...``.

    Args:
        argv: Arguments without the program name; defaults to ``sys.argv[1:]``.
    """
    parser = argparse.ArgumentParser(description="Keel's OpenAI-compatible LLM simulator.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8089)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--jitter-ms", type=float, default=0.0)
    parser.add_argument("--fault-rate", type=float, default=0.0)
    parser.add_argument("--fault-kinds", default="503", help="comma-separated, e.g. 503,429")
    parser.add_argument("--timeout-seconds", type=float, default=30.0)
    parser.add_argument("--fail-first-verify", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    config = SimConfig.model_validate(
        {
            "latency_ms": args.latency_ms,
            "latency_jitter_ms": args.jitter_ms,
            "fault_rate": args.fault_rate,
            "fault_kinds": [k.strip() for k in args.fault_kinds.split(",") if k.strip()],
            "timeout_seconds": args.timeout_seconds,
            "fail_first_verify": args.fail_first_verify,
            "seed": args.seed,
        }
    )
    serve(config, args.host, args.port)


if __name__ == "__main__":
    main()
