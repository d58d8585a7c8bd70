"""What the LLM simulator answers each request with, faults and latency included.

``SimState`` holds one app's counters and its RNG and answers chat, embeddings and model
requests in OpenAI's shapes; the replies themselves come from ``workers.sim.replies`` and the
quality model (``workers.sim.quality``). Random faults and jitter draw from one
``random.Random(config.seed)`` per app, so a given sequence of requests sees the same faults.
Each complete draft and verdict served to a request naming its job (``X-Keel-Job-Id``) is
recorded in the app's ``TruthLedger`` (``workers.sim.truth``). Errors are answered in OpenAI's
error shape (``SimError``).
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from dataclasses import dataclass
from typing import Any, Literal

from fastapi.responses import JSONResponse, Response

from keel.workers.sim import quality, replies, streaming, wire
from keel.workers.sim.config import SimConfig
from keel.workers.sim.directives import FAULT_KINDS, Directives, fault_key, parse_goal
from keel.workers.sim.truth import MAX_JOB_ID_CHARS, TruthLedger

INVALID = "invalid_request_error"
"""OpenAI's error type for a request the simulator cannot read."""
_REQUEST_KINDS = ("plan", "answer", "verify", "route", "summary", "chat", "embeddings")
_NO_DIRECTIVES = Directives()
_ERRORS: dict[str, tuple[int, str, str, str]] = {
    "500": (500, "server_error", "internal_error", "The server had an error (simulated 500)."),
    "503": (503, "server_error", "service_unavailable", "The engine is overloaded (simulated)."),
    "429": (429, "rate_limit_exceeded", "rate_limit_exceeded", "Rate limit reached (simulated)."),
    "401": (401, "authentication_error", "invalid_api_key", "Incorrect API key (simulated)."),
    "400": (400, "invalid_request_error", "invalid_request", "Invalid request (simulated)."),
    "timeout": (504, "timeout", "timeout", "The model did not answer in time (simulated)."),
}
"""Status, error type, code and message of each injected HTTP fault."""


class SimError(Exception):
    """An error answered in OpenAI's error shape."""

    def __init__(self, status: int, message: str, type_: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code = status, message, type_, code


def error_response(
    status: int, message: str, type_: str, code: str | None, headers: dict[str, str] | None = None
) -> JSONResponse:
    """An error response in OpenAI's shape: ``{"error": {message, type, param, code}}``."""
    body = {"error": {"message": message, "type": type_, "param": None, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


class SimState:
    """Counters and the RNG of one app; touched only from its event loop, so no locks."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.truth = TruthLedger()
        self.reset()

    def reset(self) -> None:
        """Reseed the RNG, zero every counter and per-goal fault count, and forget every job."""
        self.truth.clear()
        self.rng = random.Random(self.config.seed)
        self.requests = dict.fromkeys(_REQUEST_KINDS, 0)
        self.faults = dict.fromkeys(FAULT_KINDS, 0)
        self.fault_hits: dict[str, int] = {}
        self.completions = 0
        self.down_until = 0.0
        """While ``time.monotonic()`` is below this, every request gets a 503 (an outage)."""
        self.outage_requests = 0
        """Requests that arrived during an outage (chaos tests count what reached a dead
        endpoint)."""

    def outage(self, seconds: float) -> None:
        """Fail every chat and embeddings request with 503 for ``seconds`` (0: end it now)."""
        self.down_until = time.monotonic() + seconds if seconds > 0 else 0.0

    async def delay(self, extra_ms: float = 0.0) -> None:
        """Sleep the configured latency plus ``extra_ms`` and, if configured, seeded jitter."""
        cfg = self.config
        ms = cfg.latency_ms + extra_ms
        if cfg.latency_jitter_ms > 0:
            ms += self.rng.uniform(0.0, cfg.latency_jitter_ms)
        if ms > 0:
            await asyncio.sleep(ms / 1000)

    def pick_fault(
        self, kind: str, goal: str | None, directives: Directives, *, stream: bool = False
    ) -> str | None:
        """The fault this request gets: an outage's 503, a goal directive, else a random one.

        ``malformed_plan`` spares every call but the plan, and ``cut`` every one but a stream.
        """
        cfg = self.config
        if time.monotonic() < self.down_until:
            self.outage_requests += 1
            self.faults["503"] += 1
            return "503"
        random_fault = None
        if cfg.fault_rate > 0 and self.rng.random() < cfg.fault_rate and cfg.fault_kinds:
            random_fault = self.rng.choice(cfg.fault_kinds)
        fault = directives.fault
        applies = (fault != "malformed_plan" or kind == "plan") and (fault != "cut" or stream)
        if goal is not None and fault and applies:
            key = fault_key(goal, fault)
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
        return error_response(status, message, type_, code, headers)

    async def chat(self, body: dict[str, Any], api_key: str = "", job_id: str = "") -> Response:
        """Answer ``POST /v1/chat/completions``.

        With ``stream: true`` the same reply is streamed (``workers.sim.streaming``); faults
        other than ``cut`` are answered before the stream starts, as a provider answers them.

        Args:
            body: The request's JSON body.
            api_key: The bearer token it came with.
            job_id: The ``X-Keel-Job-Id`` header, empty when the request names no job.

        Returns:
            The completion, a stream of it, or an injected fault.

        Raises:
            SimError: The request cannot be read.
        """
        if len(job_id) > MAX_JOB_ID_CHARS:
            message = f"X-Keel-Job-Id is longer than {MAX_JOB_ID_CHARS} characters"
            raise SimError(400, message, INVALID, "x-keel-job-id")
        stream = body.get("stream") is True
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise SimError(400, "messages must be a non-empty list", INVALID, "messages")
        if not all(isinstance(m, dict) for m in messages):
            raise SimError(400, "every message must be an object", INVALID, "messages")
        reply = _reply(body, messages, self.config)
        self.requests[reply.kind] += 1
        if job_id and reply.kind != "chat":
            seen = self.truth.see(
                job_id, reply.raw_goal, quality.difficulty(reply.raw_goal, self.config)
            )
            users = [m for m in messages if m.get("role") == "user"]
            prompt = wire.message_text((users or messages)[-1].get("content"))
            seen.received(reply.kind, str(body.get("model")), prompt)
        await self.delay(reply.directives.slow_ms)
        fault = self.pick_fault(reply.kind, reply.raw_goal, reply.directives, stream=stream)
        content, call = reply.content, reply.call
        if fault in ("malformed", "malformed_plan"):
            content, call = wire.MALFORMED_CONTENT, None
        elif fault and fault != "cut":
            return await self.fault_response(fault, api_key)
        completion = self._completion(body, messages, content, call, reply.directives)
        if job_id and not fault and completion["choices"][0]["finish_reason"] == "stop":
            self._record(job_id, reply)
        if not stream:
            return JSONResponse(completion)
        delay_ms = self.config.token_delay_ms + reply.directives.token_ms
        return streaming.sse_response(
            streaming.chunks(completion, with_usage=streaming.include_usage(body)),
            delay_seconds=delay_ms / 1000,
            cut=fault == "cut",
        )

    def _record(self, job_id: str, reply: _Reply) -> None:
        """Note a complete draft or verdict served for ``job_id`` in the truth ledger.

        Only replies that reach the caller whole count: a fault, a malformed reply, a cut
        stream or a reply truncated by ``max_tokens`` serves no draft or verdict Keel can use.
        """
        record = self.truth.get(job_id)
        if record is None or reply.content is None:
            return
        if reply.kind == "answer":
            record.drafts += 1
            record.correct = quality.is_right(reply.raw_goal, reply.content)
        elif reply.kind == "verify":
            record.verifier_passed = json.loads(reply.content)["passed"] is True

    def _completion(
        self,
        body: dict[str, Any],
        messages: list[dict[str, Any]],
        content: str | None,
        call: dict[str, str] | None,
        directives: Directives,
    ) -> dict[str, Any]:
        max_tokens = wire.max_tokens(body)
        message: dict[str, Any] = {"role": "assistant", "content": None, "refusal": None}
        if call is not None:
            arguments, cut = wire.truncate(call["arguments"], max_tokens)
            billed = call["name"] + arguments
            function = {"name": call["name"], "arguments": arguments}
            call_id = wire.tool_call_id(call["name"], call["arguments"])
            message["tool_calls"] = [{"id": call_id, "type": "function", "function": function}]
        else:
            billed, cut = wire.truncate(content or "", max_tokens)
            message["content"] = billed
        finish = "length" if cut else "tool_calls" if call is not None else "stop"
        chars = sum(len(wire.message_text(m.get("content"))) for m in messages)
        prompt_tokens = math.ceil(chars / 4)
        completion_tokens = wire.count_tokens(billed) + directives.extra_tokens
        if max_tokens is not None:
            # ``tokens=`` stands for hidden (reasoning) tokens, which a provider bills within
            # the request's cap, never beyond it.
            completion_tokens = min(completion_tokens, max(max_tokens, wire.count_tokens(billed)))
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
            raise SimError(400, "input must be a string or a non-empty list", INVALID, "input")
        encoding = body.get("encoding_format") or "float"
        if encoding not in ("float", "base64"):
            raise SimError(400, "encoding_format must be float or base64", INVALID, "encoding")
        texts = [
            x if isinstance(x, str) else " ".join(map(str, x)) if isinstance(x, list) else str(x)
            for x in items
        ]
        self.requests["embeddings"] += 1
        await self.delay()
        fault = self.pick_fault("embeddings", None, _NO_DIRECTIVES)
        if fault == "malformed":
            return Response(wire.MALFORMED_CONTENT, media_type="application/json")
        if fault:
            return await self.fault_response(fault)
        data = []
        for index, text in enumerate(texts):
            vector = wire.embed(text)
            value = wire.embedding_base64(vector) if encoding == "base64" else vector
            data.append({"object": "embedding", "index": index, "embedding": value})
        tokens = sum(wire.count_tokens(t) for t in texts)
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        return JSONResponse(
            {"object": "list", "data": data, "model": body["model"], "usage": usage}
        )

    async def models(self) -> Response:
        """Answer ``GET /v1/models``."""
        await self.delay()
        return JSONResponse({"object": "list", "data": [model_card(m) for m in self.config.models]})

    def stats(self) -> dict[str, Any]:
        """Requests seen by kind and faults injected by kind since start or the last reset."""
        return {
            "requests": dict(self.requests),
            "faults": dict(self.faults),
            "outage_requests": self.outage_requests,
            "down": time.monotonic() < self.down_until,
        }


@dataclass(frozen=True)
class _Reply:
    """What a chat request asked for and what the simulator answers (before faults)."""

    kind: str
    raw_goal: str
    directives: Directives
    content: str | None
    call: dict[str, str] | None = None


def _reply(body: dict[str, Any], messages: list[dict[str, Any]], config: SimConfig) -> _Reply:
    name, schema = wire.response_schema(body.get("response_format"))
    users = [m for m in messages if m.get("role") == "user"]
    text = wire.message_text((users or messages)[-1].get("content"))
    kind = replies.KEEL_KINDS.get(name or "", "chat")
    payload: dict[str, Any] = {}
    if kind != "chat":
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError:
            parsed = None
        payload = parsed if isinstance(parsed, dict) else {"goal": text}
    raw_goal = payload["goal"] if isinstance(payload.get("goal"), str) else text
    goal, directives = parse_goal(raw_goal)
    model = str(body["model"])
    reply: dict[str, Any] | None = None
    if kind == "plan":
        reply = replies.plan_reply(payload, goal, directives)
    elif kind == "answer":
        right = quality.drafts_right(model, raw_goal, config)
        fact = quality.fact(raw_goal) if right else quality.wrong_fact(raw_goal)
        reply = replies.answer_reply(payload, goal, fact)
    elif kind == "verify":
        reply = replies.verdict_reply(
            payload,
            directives,
            fail_first_verify=config.fail_first_verify,
            judged=_judge(payload, raw_goal, model, config),
        )
    elif kind == "route":
        tiers = replies.route_tiers(payload)
        if tiers is None:
            message = "a keel_route request needs a non-empty tiers object of tier: model"
            raise SimError(400, message, INVALID, "tiers")
        reply = replies.route_reply(payload, quality.route(raw_goal, tiers, config), tiers)
    elif kind == "summary":
        reply = replies.summary_reply(payload)
    elif name == "json_object":
        reply = {"reply": f"Simulated reply to: {goal[:200]}"}
    elif name:
        reply = replies.build_args(schema, goal)
    if reply is not None:
        return _Reply(kind, raw_goal, directives, wire.dumps(reply))
    content, call = replies.chat_reply(messages, goal, body.get("tools"), body.get("tool_choice"))
    return _Reply(kind, raw_goal, directives, content, call)


def _judge(
    payload: dict[str, Any], goal: str, model: str, config: SimConfig
) -> Literal["right", "caught", "missed"]:
    """The quality model's view of a verified draft: right, or wrong and caught or missed."""
    draft = payload.get("draft")
    draft = draft if isinstance(draft, str) else ""
    if quality.is_right(goal, draft):
        return "right"
    iteration = replies.iteration_of(payload)
    caught = quality.verifier_catches(goal, model, iteration, draft, config)
    return "caught" if caught else "missed"


def _masked(key: str) -> str:
    """A key as OpenAI's 401 shows it: the first three and last four characters."""
    return f"{key[:3]}{'*' * (len(key) - 7)}{key[-4:]}" if len(key) > 10 else "***"


def model_card(model_id: str) -> dict[str, Any]:
    """The ``/v1/models`` entry of a model id."""
    return {"id": model_id, "object": "model", "created": 0, "owned_by": "keel-sim"}
