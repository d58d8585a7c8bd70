"""LLM activities: model choice, planning, drafting and verification (OpenAI-compatible).

Not workflow code. Talks to any OpenAI-compatible endpoint (OpenAI itself or Keel's simulator)
through ``openai.AsyncOpenAI`` built by the worker with ``max_retries=0``: Temporal owns retries.
These calls are reads; their results are memoised in history, so they carry no idempotency key.
Model output that fails validation is returned as ``invalid_reason`` for the workflow to decide
on, never raised, so a bad answer costs one visible budgeted step, not an activity retry storm.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterable, Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import structlog
from opentelemetry import trace
from pydantic import BaseModel, Field, ValidationError
from pydantic_core import from_json
from redis.exceptions import RedisError
from temporalio import activity
from temporalio.exceptions import ApplicationError

from keel.activities import errors
from keel.activities._heartbeat import heartbeating
from keel.activities.answer_tokens import AnswerTokens, DraftTokens
from keel.activities.catalog import json_schema
from keel.activities.errors import BUDGET_EXHAUSTED, classifying_openai_errors
from keel.activities.gateway_limits import GatewayLimits
from keel.activities.store import KeelStore
from keel.activities.types import (
    CHARS_PER_TOKEN,
    LLM_REQUEST_TIMEOUT_SECONDS,
    MIN_OUTPUT_TOKENS,
    PROMPT_CHARS_PER_OBSERVATION,
    AnswerInput,
    AnswerResult,
    LLMCallBase,
    Plan,
    PlanInput,
    PlanResult,
    Role,
    Usage,
    Verdict,
    VerifyInput,
    VerifyResult,
)
from keel.activities.usage import UsageLedger

if TYPE_CHECKING:
    # Only the worker builds the client; see ``errors`` for why the SDK is not imported here.
    import openai

log = structlog.get_logger(__name__)
_tracer = trace.get_tracer(__name__)

DEFAULT_PRICES: dict[str, tuple[float, float]] = {
    "gpt-4.1-mini": (0.40, 1.60),
    "gpt-4.1": (2.00, 8.00),
    "gpt-4o-mini": (0.15, 0.60),
    "gpt-4o": (2.50, 10.00),
    "sim-small": (0.40, 1.60),
    "sim-large": (2.00, 8.00),
}
"""USD per million (prompt, completion) tokens. Unknown models are charged at the highest price
in the table, so a cost budget can be too strict but never too loose."""

PLANNER_PROMPT = """You are the planner of an agent job. Read the JSON context: the goal, the
tools you may call (with JSON-schema parameters), observations from earlier steps, answers to
earlier questions, and the verifier's critique of the last draft if any.
Reply with JSON only, matching the keel_plan schema:
- decision "act": list steps. A tool step is {"id","kind":"tool","tool","args"}; a retrieval step
  (only when retrieval_enabled) is {"id","kind":"retrieve","query","top_k","filters"}. Steps
  without depends_on run in parallel. Use only the tools listed. At most 8 steps.
- decision "answer": the observations already suffice; no steps.
- decision "ask": only when the goal is ambiguous and may_ask is true; give "question" and the
  "default_assumption" you will use if nobody answers.
If "correction" is set, your previous reply was rejected for that reason; fix it."""

ANSWER_PROMPT = """You write the answer of an agent job. Use the goal, the observations and any
clarifications in the JSON context; address the critique if one is given. Be concise and cite the
observations you rely on. Reply with JSON only: {"answer": "..."}."""

VERIFY_PROMPT = """You verify a draft answer of an agent job against its goal and the
observations in the JSON context. Pass it only if it answers the goal and is supported by the
observations. Reply with JSON only: {"passed": true|false, "score": 0..1, "critique": "..."}."""


class LLMConfig(BaseModel):
    """Model choice and prices, built by the worker from its settings (never from job input)."""

    planner_model: str = "gpt-4.1-mini"
    verifier_model: str = "gpt-4.1-mini"
    answerer_model: str = "gpt-4.1-mini"
    max_output_tokens: int = Field(default=1024, gt=0)
    prices: dict[str, tuple[float, float]] = Field(default_factory=lambda: dict(DEFAULT_PRICES))
    request_timeout_seconds: float = Field(
        default=LLM_REQUEST_TIMEOUT_SECONDS, gt=0, le=LLM_REQUEST_TIMEOUT_SECONDS
    )
    """Seconds the client waits for one request. At most ``LLM_REQUEST_TIMEOUT_SECONDS``, from
    which LLM_CALL's start-to-close timeout is derived, so a slow model ends in a classified
    timeout, never in an attempt Temporal killed."""

    def price(self, model: str) -> tuple[float, float]:
        """USD per million prompt and completion tokens; unknown models at the highest price."""
        fallback = max(self.prices.values(), key=lambda p: p[0] + p[1], default=(0.0, 0.0))
        return self.prices.get(model, fallback)

    def model_for(self, role: Role) -> str:
        """The model that serves ``role``: the single seam where routing between tiers goes."""
        return {
            "planner": self.planner_model,
            "verifier": self.verifier_model,
            "answerer": self.answerer_model,
        }[role]


class LLMActivities:
    """Activities that call the model. One instance per worker, sharing one HTTP client."""

    def __init__(
        self,
        client: openai.AsyncOpenAI,
        config: LLMConfig,
        tool_specs: Callable[[Sequence[str]], list[dict[str, Any]]],
        store: KeelStore | None = None,
        usage: UsageLedger | None = None,
        tokens: AnswerTokens | None = None,
        limits: GatewayLimits | None = None,
    ) -> None:
        self._client = client
        self._config = config
        self._tool_specs = tool_specs
        self._store = store
        self._usage = usage
        self._tokens = tokens
        """Where ``draft_answer`` streams its text (issue 13); None: it does not stream."""
        self._limits = limits or GatewayLimits(None)
        """The model gateway's fleet-wide limits (issue 13); None: calls are not limited."""

    @activity.defn(name="plan_step")
    async def plan_step(self, inp: PlanInput) -> PlanResult:
        """Ask the planner for the next plan."""
        context = await self._context(inp) | {
            "tools": self._tool_specs(inp.allowed_tools),
            "retrieval_enabled": inp.retrieval_enabled,
            "critique": inp.critique,
            "correction": inp.correction,
            "may_ask": inp.may_ask,
        }
        text, usage, reason = await self._complete(
            inp, "planner", PLANNER_PROMPT, context, "keel_plan", Plan
        )
        plan, reason = _parse(Plan, text, reason)
        return PlanResult(plan=plan, invalid_reason=reason, usage=usage)

    @activity.defn(name="draft_answer")
    async def draft_answer(self, inp: AnswerInput) -> AnswerResult:
        """Write a draft answer from the observations.

        With ``AnswerTokens`` the reply is streamed and the answer's text published to the job's
        token stream as it arrives (``activities/answer_tokens.py``); only the result below
        enters history, and it is the same whether the call streamed or not.
        """
        context = await self._context(inp) | {"critique": inp.critique}
        info = activity.info()
        draft = (
            self._tokens.draft(info.workflow_id, iteration=inp.iteration, attempt=info.attempt)
            if self._tokens is not None
            and info.workflow_id
            and await self._tokens.wanted(info.workflow_id)
            else None
        )
        text, usage, reason = await self._complete(
            inp, "answerer", ANSWER_PROMPT, context, "keel_answer", None, draft=draft
        )
        try:
            answer = str(json.loads(text)["answer"])
        except (ValueError, KeyError, TypeError):
            answer = text.strip()  # A plain-text answer is still an answer; the verifier judges it.
        answer = answer or f"(no answer: {reason})"
        if draft is not None:
            await draft.finish(_rest_of(answer, draft.fed))
        return AnswerResult(answer=answer, usage=usage)

    @activity.defn(name="verify_draft")
    async def verify_draft(self, inp: VerifyInput) -> VerifyResult:
        """Judge a draft against the goal and observations."""
        context = await self._context(inp) | {"draft": inp.draft}
        text, usage, reason = await self._complete(
            inp, "verifier", VERIFY_PROMPT, context, "keel_verdict", Verdict
        )
        verdict, reason = _parse(Verdict, text, reason)
        return VerifyResult(verdict=verdict, invalid_reason=reason, usage=usage)

    async def _context(self, inp: LLMCallBase) -> dict[str, Any]:
        """The prompt's JSON context.

        Observations stored by reference arrive without their preview (the tool's result in
        history has it) and are read back from Redis in one round trip, up to
        PROMPT_CHARS_PER_OBSERVATION each, which is what the workflow budgeted for.
        """
        refs = [obs.ref for obs in inp.observations if obs.ref]
        stored = (
            await self._store.get_blobs(refs, tenant=inp.tenant)
            if refs and self._store is not None
            else []
        )
        blobs = dict(zip(refs, stored, strict=True))
        observations = []
        for obs in inp.observations:
            doc = obs.model_dump(mode="json", exclude={"size"})
            if obs.ref:
                full = blobs.get(obs.ref)
                doc["content"] = (
                    full[:PROMPT_CHARS_PER_OBSERVATION]
                    if full is not None
                    else obs.content or f"(output of {obs.size} characters no longer stored)"
                )
            observations.append(doc)
        return {
            "goal": inp.goal,
            "iteration": inp.iteration,
            "observations": observations,
            "clarifications": [c.model_dump(mode="json") for c in inp.clarifications],
        }

    async def _complete(
        self,
        inp: LLMCallBase,
        role: Role,
        system: str,
        context: dict[str, Any],
        schema_name: str,
        schema: type[BaseModel] | None,
        *,
        draft: DraftTokens | None = None,
    ) -> tuple[str, Usage, str | None]:
        """One chat completion; returns the text, its usage, and why it is unusable if it is.

        With ``draft`` the completion is streamed (``_stream``) and the answer's text fed to it.

        Raises:
            ApplicationError: ``BUDGET_EXHAUSTED`` (non-retryable) when ``max_cost_usd`` cannot
                pay for the prompt and MIN_OUTPUT_TOKENS of output at the model's price, or the
                classified failure of the HTTP call (see ``_post``).
        """
        model = self._config.model_for(role)
        user = json.dumps(context, ensure_ascii=False)
        with structlog.contextvars.bound_contextvars(
            job_id=activity.info().workflow_id, tenant=inp.tenant, call=schema_name, model=model
        ):
            body = {
                "model": model,
                "messages": [
                    {"role": "system", "content": system},
                    {"role": "user", "content": user},
                ],
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {
                        "name": schema_name,
                        "schema": json_schema(schema) if schema else _ANSWER_SCHEMA,
                        "strict": False,
                    },
                },
                "max_tokens": self._affordable(inp, model, len(system) + len(user)),
            }
            with _tracer.start_as_current_span(f"chat {model}") as span:
                # OpenTelemetry GenAI semantic conventions; a no-op without a tracer provider.
                span.set_attributes(_genai_request(body))
                # The fleet's limits for this model: in-flight calls, requests and tokens per
                # minute (activities/limits.py); waiting for them heartbeats and never raises.
                async with self._limits.model(model, body) as gate:
                    response = await (
                        self._post(body) if draft is None else self._stream(body, draft)
                    )
                    gate.settle(response.usage)
                usage = _usage(self._config.price(model), response.usage)
                if self._usage is not None:
                    await _charge_tenant(self._usage, inp.tenant, usage)
                span.set_attributes(_genai_response(model, usage))
            log.info(
                "llm.called",
                prompt_tokens=usage.prompt_tokens,
                completion_tokens=usage.completion_tokens,
            )
        choice = response.choices[0] if response.choices else None
        text = (choice.message.content or "") if choice else ""
        reason = (
            "output truncated at max_tokens"
            if choice and choice.finish_reason == "length"
            else None
        )
        return text, usage, reason

    async def _post(self, body: dict[str, Any]) -> _Completion:
        """Send one chat completion request and parse the reply, heartbeating while it runs.

        Raises:
            ApplicationError: The vendor error, classified by ``errors.from_openai`` (retryable
                or not), or a retryable ``LLM_TRANSIENT`` when the body is not a chat completion.
        """
        try:
            async with heartbeating():
                with classifying_openai_errors(secrets=(self._client.api_key,)):
                    # The client's own POST (same auth, base URL, timeout, vendor retries off
                    # and error types as ``chat.completions.create``) without the typed
                    # method's walk of every parameter against its TypedDicts, which is about a
                    # third of this activity's CPU; the body is plain JSON already.
                    raw = await self._client.post(
                        "/chat/completions",
                        body=body,
                        cast_to=str,
                        options={"timeout": self._config.request_timeout_seconds},
                    )
            return _Completion.model_validate_json(raw)
        except ApplicationError as failure:
            log.warning("llm.failed", error_type=failure.type, retryable=not failure.non_retryable)
            raise
        except ValidationError as err:
            log.warning("llm.malformed_body", error_type=errors.LLM_TRANSIENT)
            raise ApplicationError(
                f"malformed chat completion: {err.error_count()} error(s)",
                type=errors.LLM_TRANSIENT,
            ) from None

    async def _stream(self, body: dict[str, Any], draft: DraftTokens) -> _Completion:
        """Stream one chat completion, feeding the answer's new text to ``draft`` as it comes.

        Returns the completion ``_post`` would have: the same text, finish reason and usage (or,
        from an endpoint that sends none, a conservative estimate of it). On any failure the
        draft is dropped unfinished: the retried attempt streams its own.

        Raises:
            ApplicationError: Classified as ``_post``'s failures are. A stream that breaks off
                (``errors.from_openai``), ends before its finish reason, sends a chunk that is
                not one, or outlasts the request timeout is a retryable ``LLM_TRANSIENT``.
        """
        import openai  # Deferred: only the worker, which built the client, streams.

        body = body | {"stream": True, "stream_options": {"include_usage": True}}
        timeout = self._config.request_timeout_seconds
        try:
            # The client's timeout bounds each read; this bounds the whole stream, so an
            # endpoint that trickles tokens still ends in a classified timeout well before
            # LLM_CALL's start-to-close timeout kills the attempt.
            async with heartbeating(), asyncio.timeout(timeout):
                with classifying_openai_errors(secrets=(self._client.api_key,)):
                    stream = await self._client.post(
                        "/chat/completions",
                        body=body,
                        cast_to=object,
                        stream=True,
                        stream_cls=openai.AsyncStream[object],
                        options={"timeout": timeout},
                    )
                    async with stream:
                        return await _collect(stream, draft, _prompt_chars(body))
        except BaseException as failure:
            await draft.abort()
            if isinstance(failure, TimeoutError):
                failure = ApplicationError(
                    f"model stream did not finish within {timeout:g} s", type=errors.LLM_TRANSIENT
                )
            elif isinstance(failure, ValidationError):
                failure = ApplicationError(
                    f"malformed chat completion chunk: {failure.error_count()} error(s)",
                    type=errors.LLM_TRANSIENT,
                )
            if isinstance(failure, ApplicationError):
                log.warning(
                    "llm.failed", error_type=failure.type, retryable=not failure.non_retryable
                )
                raise failure from None
            raise

    def _affordable(self, inp: LLMCallBase, model: str, prompt_chars: int) -> int:
        """Completion tokens this call may use: the workflow's cap, the worker's, and the money.

        The prompt is priced at one token per CHARS_PER_TOKEN characters plus the schema
        allowance, the same conservative estimate the workflow budgets tokens with.
        """
        cap = self._config.max_output_tokens
        if inp.max_output_tokens is not None:
            cap = min(cap, inp.max_output_tokens)
        if inp.max_cost_usd is None:
            return cap
        price_in, price_out = self._config.price(model)
        prompt_tokens = prompt_chars // CHARS_PER_TOKEN + SCHEMA_ALLOWANCE_TOKENS
        spare_usd = inp.max_cost_usd - prompt_tokens * price_in / 1_000_000
        if price_out > 0:
            cap = min(cap, int(spare_usd * 1_000_000 / price_out))
        elif spare_usd < 0:
            cap = 0
        if cap < MIN_OUTPUT_TOKENS:
            log.info("llm.refused_by_budget", usd_left=inp.max_cost_usd)
            raise ApplicationError(
                f"max_cost_usd: ${inp.max_cost_usd:.6f} left cannot pay for a {model} call "
                f"of ~{prompt_tokens} prompt tokens and {MIN_OUTPUT_TOKENS} output tokens",
                type=BUDGET_EXHAUSTED,
                non_retryable=True,
            )
        return cap


SCHEMA_ALLOWANCE_TOKENS = 600
"""Tokens the response-format schema and tool specs may add beyond the prompt's characters."""


class _Message(BaseModel):
    content: str | None = None


class _Choice(BaseModel):
    message: _Message = Field(default_factory=_Message)
    finish_reason: str | None = None


class _TokenUsage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0


class _Completion(BaseModel):
    """The fields of an OpenAI chat completion this module reads; the rest is ignored."""

    choices: list[_Choice] = Field(default_factory=list)
    usage: _TokenUsage | None = None


class _Delta(BaseModel):
    content: str | None = None


class _ChunkChoice(BaseModel):
    delta: _Delta = Field(default_factory=_Delta)
    finish_reason: str | None = None


class _Chunk(BaseModel):
    """The fields of a ``chat.completion.chunk`` this module reads; the rest is ignored."""

    choices: list[_ChunkChoice] = Field(default_factory=list)
    usage: _TokenUsage | None = None


async def _collect(
    stream: AsyncIterable[object], draft: DraftTokens, prompt_chars: int
) -> _Completion:
    """Read a streamed completion to its end, feeding ``draft`` the answer's new text.

    Raises:
        ApplicationError: ``LLM_TRANSIENT`` when the stream ends before its finish reason.
        ValidationError: A chunk is not one.
    """
    raw, finish, usage = "", None, None
    async for item in stream:
        chunk = _Chunk.model_validate(item)
        usage = chunk.usage or usage
        for choice in chunk.choices[:1]:
            finish = choice.finish_reason or finish
            if choice.delta.content:
                raw += choice.delta.content
                so_far = _answer_so_far(raw)
                if so_far is not None and so_far.startswith(draft.fed):
                    draft.feed(so_far[len(draft.fed) :])
    if finish is None:
        raise ApplicationError(
            "model stream ended before the reply was complete", type=errors.LLM_TRANSIENT
        )
    if usage is None:
        # An endpoint that ignores ``include_usage``: count the way ``_affordable`` prices a
        # prompt, high rather than low, so budgets and quotas are never undercharged.
        log.info("llm.usage_estimated")
        usage = _TokenUsage(
            prompt_tokens=prompt_chars // CHARS_PER_TOKEN + SCHEMA_ALLOWANCE_TOKENS,
            completion_tokens=math.ceil(len(raw) / CHARS_PER_TOKEN),
        )
    whole = _Choice(message=_Message(content=raw), finish_reason=finish)
    return _Completion(choices=[whole], usage=usage)


def _answer_so_far(raw: str) -> str | None:
    """The decoded ``answer`` of the partial JSON ``{"answer": "...`` streamed so far, if any.

    Partial parsing keeps only whole characters (an escape cut in half waits for its end), so
    each result extends the one before it.
    """
    try:
        value = from_json(raw, allow_partial="trailing-strings")
    except ValueError:
        return None
    answer = value.get("answer") if isinstance(value, dict) else None
    return answer if isinstance(answer, str) else None


def _rest_of(answer: str, streamed: str) -> str:
    """What the token stream still lacks of ``answer`` once ``streamed`` has been sent.

    The answer is read from the whole reply as the non-streaming path reads it, so it extends
    what was streamed unless the reply as a whole was not the JSON its start looked like (cut
    at max_tokens, or trailing text); then readers keep the streamed text and the job's result
    carries the answer.
    """
    if answer.startswith(streamed):
        return answer[len(streamed) :]
    log.warning("answer_tokens.diverged", streamed_chars=len(streamed), answer_chars=len(answer))
    return ""


def _prompt_chars(body: dict[str, Any]) -> int:
    return sum(len(str(m.get("content") or "")) for m in body["messages"])


_ANSWER_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"answer": {"type": "string"}},
    "required": ["answer"],
}


async def _charge_tenant(ledger: UsageLedger, tenant: str, usage: Usage) -> None:
    """Charge a completed call to the tenant's day, once per (run, activity); never fails it.

    Usage in history is the job's exact ledger; this is the tenant's running total for quotas
    and ``GET /v1/usage``. A Redis outage loses the charge (logged) rather than the call.
    """
    info = activity.info()
    try:
        await ledger.charge_call(
            tenant, f"{info.workflow_run_id}:{info.activity_id}", usage.cost_usd, usage.total_tokens
        )
    except RedisError as err:
        log.warning("usage.charge_failed", error=str(err))


def _genai_request(body: dict[str, Any]) -> dict[str, Any]:
    """Span attributes of a chat request (GenAI semantic conventions); no prompt text."""
    return {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "openai",
        "gen_ai.request.model": body["model"],
        "gen_ai.request.max_tokens": body["max_tokens"],
        "gen_ai.output.type": "json",
    }


def _genai_response(model: str, usage: Usage) -> dict[str, Any]:
    """Span attributes of a chat response: the tokens it used and what it cost."""
    return {
        "gen_ai.response.model": model,
        "gen_ai.usage.input_tokens": usage.prompt_tokens,
        "gen_ai.usage.output_tokens": usage.completion_tokens,
        "keel.cost_usd": usage.cost_usd,
    }


def _usage(price: tuple[float, float], usage: Any) -> Usage:
    prompt = int(getattr(usage, "prompt_tokens", 0) or 0)
    completion = int(getattr(usage, "completion_tokens", 0) or 0)
    cost = (prompt * price[0] + completion * price[1]) / 1_000_000
    return Usage(prompt_tokens=prompt, completion_tokens=completion, cost_usd=round(cost, 8))


M = TypeVar("M", bound=BaseModel)


def _parse(model: type[M], text: str, reason: str | None) -> tuple[M | None, str | None]:
    """Validate model output; on failure return a short reason the next call can correct."""
    try:
        return model.model_validate_json(text), None
    except ValidationError as err:
        first = err.errors()[0] if err.errors() else {"msg": str(err), "loc": ()}
        where = ".".join(str(p) for p in first.get("loc", ())) or "output"
        detail = f"{where}: {first.get('msg')}"
        return None, (f"{reason}; {detail}" if reason else detail)[:300]
