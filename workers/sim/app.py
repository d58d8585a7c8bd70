"""The LLM simulator's HTTP surface: the FastAPI app built by ``create_app`` and ``serve``.

An OpenAI-compatible LLM simulator for offline development, tests and benchmarks. Keel's agent
code reaches it only through the ``openai`` client, exactly as it would reach OpenAI, so the whole
plan → act → verify → refine loop runs for real without a network or an API key. Replies are
deterministic (``workers.sim.replies``); a goal can steer them with a ``[sim: ...]`` directive
(``workers.sim.directives``), for example ``[sim: ask, fail_verify=1, fault=503x2, tokens=500]``.
Faults, latency and counters are ``workers.sim.state``'s; whether a draft is right is the
quality model's (``workers.sim.quality``).

Endpoints: ``POST /v1/chat/completions`` (streamed too), ``POST /v1/embeddings``,
``GET /v1/models``, ``GET /health``, ``GET /_sim/stats``, ``POST /_sim/reset`` and
``POST /_sim/outage`` (``{"seconds": 60}``: every request fails with 503 that long); for scoring,
``GET /sim/truth/{job_id}`` (the ground truth of a job whose requests carried
``X-Keel-Job-Id``) and ``POST /sim/grade`` (whether any answer text is right for a goal).
``keel sim-llm`` runs it.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from keel.workers.serving import serve_app
from keel.workers.sim import quality
from keel.workers.sim.config import SimConfig
from keel.workers.sim.state import INVALID, SimError, SimState, error_response, model_card
from keel.workers.sim.truth import JOB_HEADER


async def _json_object(request: Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SimError(400, f"request body is not valid JSON: {exc}", INVALID) from exc
    if not isinstance(body, dict):
        raise SimError(400, "request body must be a JSON object", INVALID)
    return body


async def _json_body(request: Request) -> dict[str, Any]:
    body = await _json_object(request)
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise SimError(400, "you must provide a model parameter", INVALID, "model")
    return body


def _bearer(request: Request) -> str:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def create_app(config: SimConfig) -> FastAPI:
    """Build the simulator app; each app has its own counters and seeded RNG.

    Args:
        config: Latency, fault and verification behaviour.

    Returns:
        A FastAPI app serving the OpenAI-compatible endpoints and ``/_sim`` controls.
    """
    state = SimState(config)
    app = FastAPI(title="Keel LLM simulator", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.sim = state

    @app.exception_handler(SimError)
    async def on_sim_error(_request: Request, exc: SimError) -> Response:
        return error_response(exc.status, exc.message, exc.type, exc.code)

    @app.exception_handler(HTTPException)
    async def on_http_error(_request: Request, exc: HTTPException) -> Response:
        headers = dict(exc.headers) if exc.headers else None
        return error_response(exc.status_code, str(exc.detail), INVALID, None, headers)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        job_id = request.headers.get(JOB_HEADER, "").strip()
        return await state.chat(await _json_body(request), _bearer(request), job_id)

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
            raise SimError(404, message, INVALID, "model_not_found")
        return JSONResponse(model_card(model_id))

    @app.get("/health")
    async def health() -> Response:
        return JSONResponse({"ok": True})

    @app.get("/_sim/stats")
    async def stats() -> Response:
        return JSONResponse(state.stats())

    @app.post("/_sim/outage")
    async def outage(request: Request) -> Response:
        seconds = (await _json_object(request)).get("seconds", 0)
        if not isinstance(seconds, int | float) or seconds < 0:
            raise SimError(400, "seconds must be a number >= 0", INVALID)
        state.outage(float(seconds))
        return JSONResponse({"ok": True, "seconds": seconds})

    @app.post("/_sim/reset")
    async def reset() -> Response:
        state.reset()
        return JSONResponse({"ok": True})

    @app.get("/sim/truth/{job_id:path}")
    async def truth(job_id: str) -> Response:
        record = state.truth.get(job_id)
        if record is None:
            message = f"The simulator has not seen job `{job_id}`"
            raise SimError(404, message, INVALID, "job_not_found")
        return JSONResponse(record.public())

    @app.get("/sim/calls/{job_id:path}")
    async def calls(job_id: str) -> Response:
        """What a job's model calls received (the user message of each), oldest first."""
        record = state.truth.get(job_id)
        if record is None:
            message = f"The simulator has not seen job `{job_id}`"
            raise SimError(404, message, INVALID, "job_not_found")
        return JSONResponse({"job_id": job_id, "calls": record.calls})

    @app.post("/sim/grade")
    async def grade(request: Request) -> Response:
        body = await _json_object(request)
        for field in ("goal", "answer"):
            if not isinstance(body.get(field), str):
                raise SimError(400, f"{field} must be a string", INVALID, field)
        goal, answer = body["goal"], body["answer"]
        difficulty = quality.difficulty(goal, config)
        return JSONResponse({"correct": quality.is_right(goal, answer), "difficulty": difficulty})

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
