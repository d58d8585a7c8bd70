"""LLM activities: model choice, planning, drafting and verification (OpenAI-compatible).

Not workflow code. Talks to any OpenAI-compatible endpoint (OpenAI itself or Keel's simulator)
through ``openai.AsyncOpenAI`` built by the worker with ``max_retries=0``: Temporal owns retries.
These calls are reads; their results are memoised in history, so they carry no idempotency key.
Model output that fails validation is returned as ``invalid_reason`` for the workflow to decide
on, never raised, so a bad answer costs one visible budgeted step, not an activity retry storm.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TypeVar
from urllib.parse import urlsplit

import structlog
from opentelemetry import trace
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import from_json
from redis.exceptions import RedisError
from temporalio import activity
from temporalio.exceptions import ApplicationError

from keel.activities import costing, errors
from keel.activities._heartbeat import heartbeating
from keel.activities.answer_tokens import AnswerTokens, DraftTokens
from keel.activities.breakers import Admission, Breakers, BreakerSettings, CircuitOpen, outcome_of
from keel.activities.cache import CacheKind, KeelCache, Normalization, normalize_text
from keel.activities.catalog import json_schema
from keel.activities.errors import BUDGET_EXHAUSTED, classifying_openai_errors
from keel.activities.gateway_limits import GatewayLimits
from keel.activities.prompts import PROMPTS
from keel.activities.store import KeelStore
from keel.activities.types import (
    LLM_REQUEST_TIMEOUT_SECONDS,
    MIN_OUTPUT_TOKENS,
    PROMPT_CHARS_PER_OBSERVATION,
    TIERS,
    AnswerInput,
    AnswerResult,
    LLMCallBase,
    Observation,
    Plan,
    PlanInput,
    PlanResult,
    Role,
    RouteDecision,
    RouteInput,
    RouteResult,
    SummaryInput,
    SummaryResult,
    TierName,
    Usage,
    Verdict,
    VerifyInput,
    VerifyResult,
    unique_step_ids,
)
from keel.activities.usage import UsageLedger

if TYPE_CHECKING:
    # Only the worker builds the client; see ``errors`` for why the SDK is not imported here.
    import openai

log = structlog.get_logger(__name__)
_tracer = trace.get_tracer(__name__)

DEFAULT_PRICES: dict[str, tuple[float, float]] = {
    "gpt-4.1-nano": (0.10, 0.40),
    "gpt-4.1-mini": (0.40, 1.60),
    "gpt-4.1": (2.00, 8.00),
    "gpt-4o-mini": (0.15, 0.60),
    "gpt-4o": (2.50, 10.00),
    # The simulator's models, priced as gpt-4o-mini, gpt-4.1-mini and gpt-4o: a small model
    # at about a sixteenth of a large one's price, as real ones are.
    "sim-small": (0.15, 0.60),
    "sim-medium": (0.40, 1.60),
    "sim-large": (2.50, 10.00),
}
"""USD per million (prompt, completion) tokens. Unknown models are charged at the highest price
in the table, so a cost budget can be too strict but never too loose."""

PLANNER_PROMPT = PROMPTS["keel_plan"].text
ANSWER_PROMPT = PROMPTS["keel_answer"].text
VERIFY_PROMPT = PROMPTS["keel_verdict"].text

MAX_SUMMARY_CHARS = 2_000
"""Longest rolling summary kept: the summary rides in every later prompt and in history."""

_RESERVED_BODY_KEYS = frozenset(
    {"model", "messages", "response_format", "max_tokens", "max_completion_tokens", "stream"}
    | {"stream_options", "tools", "tool_choice"}
)
"""Request fields Keel sets itself; ``LLMConfig.decoding`` may not override them."""

RoleTier = Literal["job", "router", "fast", "deep"]
"""What a role runs on: ``job`` is the job's own tier (routed, forced or escalated)."""


class LLMConfig(BaseModel):
    """Model tiers, the role map and prices: the worker's settings, never job input."""

    tier_models: dict[str, str] = Field(
        default_factory=lambda: {
            "router": "gpt-4.1-nano",
            "fast": "gpt-4.1-mini",
            "deep": "gpt-4.1",
        }
    )
    """The model serving each tier: ``router``, and ``fast`` and ``deep`` (``TIERS``)."""
    role_tiers: dict[Role, RoleTier] = Field(
        default_factory=lambda: {  # type: ignore[arg-type]  # literals widen in the lambda
            "planner": "job",
            "answerer": "job",
            # A fast tier's verifier lets wrong fast drafts through (keel bench cost: 7 points
            # of correct answers lost); the deep one costs about 5% more per job.
            "verifier": "deep",
            "router": "router",
            "summarizer": "fast",
        }
    )
    """The tier each role runs on. A role missing from the map runs on the job's tier."""
    default_tier: TierName = "deep"
    """The tier of calls whose job names none (recorded before routing existed)."""
    verifier_not_weaker: bool = True
    """The verifier runs on at least the tier that drafted the answer it judges."""
    planner_model: str | None = None
    """Pins the planner to one model whatever the tier (as before tiers existed)."""
    verifier_model: str | None = None
    answerer_model: str | None = None
    max_output_tokens: int = Field(default=1024, gt=0)
    decoding: dict[str, float | int | str | bool] = Field(default_factory=dict)
    """Decoding parameters sent with every call (``temperature``, ``top_p``, ``seed``...);
    each is part of the response cache's key."""
    prices: dict[str, tuple[float, float]] = Field(default_factory=lambda: dict(DEFAULT_PRICES))
    request_timeout_seconds: float = Field(
        default=LLM_REQUEST_TIMEOUT_SECONDS, gt=0, le=LLM_REQUEST_TIMEOUT_SECONDS
    )
    """Seconds the client waits for one request. At most ``LLM_REQUEST_TIMEOUT_SECONDS``, from
    which LLM_CALL's start-to-close timeout is derived, so a slow model ends in a classified
    timeout, never in an attempt Temporal killed."""
    job_header: bool = False
    """Send the job ID as ``X-Keel-Job-Id`` with each call (the simulator scores jobs by it).
    Off by default: a provider needs no job IDs, and they name tenants."""

    @field_validator("prices")
    @classmethod
    def _valid_prices(
        cls, prices: dict[str, tuple[float, float]]
    ) -> dict[str, tuple[float, float]]:
        # NaN, infinite or negative prices would make every budget check meaningless.
        return costing.validate_prices(prices)

    @field_validator("decoding")
    @classmethod
    def _decoding_only(cls, decoding: dict[str, Any]) -> dict[str, Any]:
        reserved = sorted(set(decoding) & _RESERVED_BODY_KEYS)
        if reserved:
            raise ValueError(f"decoding: {', '.join(reserved)} is set by Keel, not configured")
        return decoding

    @model_validator(mode="after")
    def _complete_tiers(self) -> LLMConfig:
        missing = [t for t in ("router", *TIERS) if not self.tier_models.get(t)]
        if missing:
            raise ValueError(f"tier_models: no model for tier(s) {', '.join(missing)}")
        return self

    def price(self, model: str) -> tuple[float, float]:
        """USD per million prompt and completion tokens; unknown models at the highest price."""
        fallback = max(self.prices.values(), key=lambda p: p[0] + p[1], default=(0.0, 0.0))
        return self.prices.get(model, fallback)

    def resolve(self, role: Role, job_tier: TierName | None) -> tuple[str, str]:
        """The tier and the model that serve ``role`` for a job on ``job_tier``.

        The routing seam: the workflow says which tier the job is on; the worker's role map
        says what each role runs on; ``verifier_not_weaker`` lifts the verifier to the job's
        tier when the map puts it lower. A pinned role model wins over all of it.
        """
        job: TierName = job_tier or self.default_tier
        wanted = self.role_tiers.get(role, "job")
        tier: str = job if wanted == "job" else wanted
        if role == "verifier" and self.verifier_not_weaker and tier in TIERS:
            tier = max(tier, job, key=TIERS.index)
        pinned = {
            "planner": self.planner_model,
            "verifier": self.verifier_model,
            "answerer": self.answerer_model,
        }.get(role)
        return tier, pinned or self.tier_models[tier]

    def model_for(self, role: Role, job_tier: TierName | None = None) -> str:
        """The model that serves ``role`` for a job on ``job_tier`` (see ``resolve``)."""
        return self.resolve(role, job_tier)[1]


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
        cache: KeelCache | None = None,
        breakers: Breakers | None = None,
        fallback: Fallback | None = None,
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
        self._cache = cache
        """The response cache (issue 14); None: every call goes to the model."""
        self._breakers = breakers or Breakers(None, BreakerSettings(enabled=False))
        """The fleet's circuit breakers (issue 16); by default none trips."""
        self._fallback = fallback
        """Where a call goes when its model's breaker is open; None: it fails fast."""
        self._endpoint = endpoint_name(str(client.base_url))

    @activity.defn(name="route_job")
    async def route_job(self, inp: RouteInput) -> RouteResult:
        """Ask the router which tier a job should start on, before it starts."""
        tiers = {t: self._config.resolve("planner", t)[1] for t in TIERS}
        context = {
            "goal": inp.goal,
            "tools": list(inp.allowed_tools),
            "retrieval_enabled": inp.retrieval_enabled,
            "tiers": tiers,
            "correction": inp.correction,
        }
        if inp.conversation is not None:
            # A turn of a session: "and add 100 to that" is only as hard as what "that" is.
            context["conversation"] = inp.conversation.model_dump(mode="json")
        reply = await self._complete(inp, "router", context, "keel_route", RouteDecision)
        decision, reason = _parse(RouteDecision, reply.text, reply.reason)
        return RouteResult(decision=decision, invalid_reason=reason, **reply.fields())

    @activity.defn(name="plan_step")
    async def plan_step(self, inp: PlanInput) -> PlanResult:
        """Ask the planner for the next plan."""
        context = await self._context(inp) | {
            "tools": self._tool_specs(inp.allowed_tools),
            "retrieval_enabled": inp.retrieval_enabled,
            "critique": inp.critique,
            "may_ask": inp.may_ask,
        }
        reply = await self._complete(inp, "planner", context, "keel_plan", Plan)
        plan, reason = _parse(Plan, reply.text, reply.reason)
        if plan is not None:
            # A step's id is part of its write's op_key: steps sharing one would share a write.
            plan.steps = unique_step_ids(plan.steps)
        return PlanResult(plan=plan, invalid_reason=reason, **reply.fields())

    @activity.defn(name="draft_answer")
    async def draft_answer(self, inp: AnswerInput) -> AnswerResult:
        """Write a draft answer from the observations.

        With ``AnswerTokens`` the reply is streamed and the answer's text published to the job's
        token stream as it arrives (``activities/answer_tokens.py``); only the result below
        enters history, and it is the same whether the call streamed, or came from the cache.
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
        reply = await self._complete(inp, "answerer", context, "keel_answer", None, draft=draft)
        answer = _answer_text(reply.text) or f"(no answer: {reply.reason})"
        if draft is not None:
            await draft.finish(_rest_of(answer, draft.fed))
        return AnswerResult(answer=answer, **reply.fields())

    @activity.defn(name="verify_draft")
    async def verify_draft(self, inp: VerifyInput) -> VerifyResult:
        """Judge a draft against the goal and observations."""
        context = await self._context(inp) | {"draft": inp.draft}
        reply = await self._complete(inp, "verifier", context, "keel_verdict", Verdict)
        verdict, reason = _parse(Verdict, reply.text, reply.reason)
        return VerifyResult(verdict=verdict, invalid_reason=reason, **reply.fields())

    @activity.defn(name="summarize_observations")
    async def summarize_observations(self, inp: SummaryInput) -> SummaryResult:
        """Fold observations into the job's rolling summary (context compression).

        The summary is bounded (``inp.max_chars``, at most MAX_SUMMARY_CHARS). Output that is
        not the summary's JSON falls back to the previous summary plus each observation's first
        words, so compression never fails a job and never loses an observation without a trace.
        """
        context = {
            "goal": inp.goal,
            "summary": inp.summary or "",
            "observations": await self._observations(inp.fold, inp.tenant),
            "max_chars": inp.max_chars,
        }
        reply = await self._complete(inp, "summarizer", context, "keel_summary", _Summary)
        parsed, _ = _parse(_Summary, reply.text, reply.reason)
        if parsed is not None and parsed.summary.strip():
            summary = parsed.summary.strip()
        else:
            folded = "; ".join(f"{o.name}: {' '.join(o.content.split())[:120]}" for o in inp.fold)
            summary = f"{inp.summary or ''} {folded}".strip()
        return SummaryResult(
            summary=summary[: min(inp.max_chars, MAX_SUMMARY_CHARS)], **reply.fields()
        )

    async def _context(self, inp: LLMCallBase) -> dict[str, Any]:
        """The prompt's JSON context: goal, observations, summary, clarifications."""
        context: dict[str, Any] = {
            "goal": inp.goal,
            "iteration": inp.iteration,
            "observations": await self._observations(inp.observations, inp.tenant),
            "clarifications": [c.model_dump(mode="json") for c in inp.clarifications],
        }
        if inp.summary:
            context["summary"] = inp.summary
        if inp.conversation is not None:
            context["conversation"] = inp.conversation.model_dump(mode="json")
        if inp.correction:
            context["correction"] = inp.correction
        return context

    async def _observations(
        self, observations: Sequence[Observation], tenant: str
    ) -> list[dict[str, Any]]:
        """Observations as the prompt shows them.

        Observations stored by reference arrive without their preview (the tool's result in
        history has it) and are read back from Redis in one round trip, up to
        PROMPT_CHARS_PER_OBSERVATION each, which is what the workflow budgeted for.
        """
        refs = [obs.ref for obs in observations if obs.ref]
        stored = (
            await self._store.get_blobs(refs, tenant=tenant)
            if refs and self._store is not None
            else []
        )
        blobs = dict(zip(refs, stored, strict=True))
        docs = []
        for obs in observations:
            # Not the ref: it names the tenant and the job, which the model has no use for, and
            # it would keep two jobs whose tools returned the same text from sharing a cached
            # reply. The text it points at is in ``content``.
            doc = obs.model_dump(mode="json", exclude={"size", "ref"})
            if obs.ref:
                full = blobs.get(obs.ref)
                doc["content"] = (
                    full[:PROMPT_CHARS_PER_OBSERVATION]
                    if full is not None
                    else obs.content or f"(output of {obs.size} characters no longer stored)"
                )
            docs.append(doc)
        return docs

    async def _complete(
        self,
        inp: LLMCallBase,
        role: Role,
        context: dict[str, Any],
        schema_name: str,
        schema: type[BaseModel] | None,
        *,
        draft: DraftTokens | None = None,
    ) -> _Reply:
        """One chat completion, or its cached reply; returns the text, usage and cache state.

        With ``draft`` the completion is streamed (``_stream``) and the answer's text fed to it.
        A reply is cached only when it is complete (finish reason ``stop``) and valid against
        its schema, so neither a truncated nor an invalid output is ever served again.

        Raises:
            ApplicationError: ``BUDGET_EXHAUSTED`` (non-retryable) when ``max_cost_usd`` cannot
                pay for the prompt and MIN_OUTPUT_TOKENS of output at the model's price, or the
                classified failure of the HTTP call (see ``_post``).
        """
        tier, model = self._config.resolve(role, inp.tier)
        template = PROMPTS[schema_name]
        user = json.dumps(context, ensure_ascii=False)
        info = activity.info()
        with structlog.contextvars.bound_contextvars(
            job_id=info.workflow_id, tenant=inp.tenant, call=schema_name, model=model, tier=tier
        ):
            body: dict[str, Any] = {
                "model": model,
                "messages": [
                    {"role": "system", "content": template.text},
                    {"role": "user", "content": user},
                ],
                **self._config.decoding,
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {
                        "name": schema_name,
                        "schema": json_schema(schema) if schema else _ANSWER_SCHEMA,
                        "strict": False,
                    },
                },
            }
            # Exact prompt tokens (the model's own tokenizer), the response schema included.
            prompt_tokens = costing.count_chat_tokens(
                model, body["messages"]
            ) + costing.count_tokens(model, json.dumps(body["response_format"]))
            charges = costing.AttemptCharges.from_activity()
            body["max_tokens"] = self._affordable(inp, model, prompt_tokens, charges.spent_usd)
            key = self._cache_key(inp, role, template.version, body, context)
            hit = await self._cached(key, body, model, schema)
            if hit is not None:
                log.info("llm.cache_hit", saved_tokens=hit.saved.total_tokens if hit.saved else 0)
                if draft is not None:
                    draft.feed(_answer_text(hit.text))
                return hit.model_copy(update={"tier": tier})
            # The model's breaker (issue 16): open, the call goes to the fallback or fails
            # fast, non-retryable, without spending the job's retries on a dead endpoint.
            route = await self._route(model, tier)
            if route.degraded is not None:
                model = route.model
                body = body | {"model": model}
                body["max_tokens"] = self._affordable(inp, model, prompt_tokens, charges.spent_usd)
                key = None  # another model's reply is never stored as this one's
            with _tracer.start_as_current_span(f"chat {model}") as span:
                # OpenTelemetry GenAI semantic conventions; a no-op without a tracer provider.
                span.set_attributes(_genai_request(body))
                # The fleet's limits for this model: in-flight calls, requests and tokens per
                # minute (activities/limits.py); waiting for them heartbeats and never raises.
                price = self._config.price(model)
                outcome: BaseException | None = None
                try:
                    async with self._limits.model(model, body) as gate:
                        # From here the attempt may be billed in full even if it fails: its
                        # worst case is recorded for the next attempt (``AttemptCharges``).
                        charges.sending(
                            costing.worst_case(price, prompt_tokens, body["max_tokens"])
                        )
                        response = await (
                            self._post(body, charges, route.client)
                            if draft is None
                            else self._stream(body, draft, charges, route.client)
                        )
                        gate.settle(response.usage)
                except BaseException as failure:
                    outcome = failure
                    raise
                finally:
                    sent = outcome is None or isinstance(outcome, ApplicationError)
                    await self._breakers.record(
                        route.admission, outcome_of(outcome) if sent else "none"
                    )
                usage = _charged(price, response.usage, prompt_tokens, body["max_tokens"])
                # Earlier attempts that sent their request and failed are charged here, at
                # their worst case, so retries never spend past max_cost_usd unseen.
                usage = usage + _as_usage(charges.spent)
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
        truncated = choice is not None and choice.finish_reason == "length"
        reason = "output truncated at max_tokens" if truncated else None
        if key is not None and choice is not None and choice.finish_reason == "stop":
            if schema is None or _parse(schema, text, None)[0] is not None:
                entry = {"text": text, "usage": usage.model_dump(mode="json")}
                await self._cache_put(key, entry)
        return _Reply(
            text=text,
            reason=reason,
            usage=usage,
            tier=tier,
            model=model,
            cached=False if key is not None else None,
            degraded=route.degraded,
        )

    async def _route(self, model: str, tier: str) -> _Route:
        """Where the call goes: ``model`` at the endpoint, or its fallback if its breaker is open.

        Raises:
            ApplicationError: ``CIRCUIT_OPEN`` (non-retryable) when the model's breaker is open
                and there is no fallback, or the fallback's is open too.
        """
        primary = f"llm:{self._endpoint}:{model}"
        try:
            return _Route(self._client, model, await self._breakers.admit(primary))
        except CircuitOpen as open_:
            fallback = self._fallback
            if fallback is None:
                raise _circuit_open(open_, tier) from None
            substitute = fallback.models.get(model, model)
            try:
                admission = await self._breakers.admit(f"llm:{fallback.endpoint}:{substitute}")
            except CircuitOpen:
                raise _circuit_open(open_, tier) from None
            reason = f"model {model} at {self._endpoint}: circuit open; served by {substitute}"
            if fallback.endpoint != self._endpoint:
                reason += f" at {fallback.endpoint}"
            log.warning("llm.fallback", breaker=primary, fallback=substitute)
            return _Route(fallback.client, substitute, admission, reason)

    def _cache_key(
        self,
        inp: LLMCallBase,
        role: Role,
        template: str,
        body: dict[str, Any],
        context: dict[str, Any],
    ) -> str | None:
        """The response-cache key of a call, or None when this call is not cached.

        Everything that can change the output is in it: tenant, role, the prompt template's
        version, the model, every decoding parameter (all of the body but the messages, the
        token cap and streaming) with the response schema, and the normalised prompt: the
        template's version stands for the system message, and the user message is its JSON
        context with every string normalised (before encoding, where whitespace is still
        whitespace). The token cap is left out because only complete replies are stored, and a
        hit must fit the cap.
        """
        cache = self._cache
        if cache is None or not inp.cache or not cache.enabled(CacheKind.RESPONSE):
            return None
        mode = cache.settings.normalization
        ignored = {"messages", "max_tokens", "stream", "stream_options"}
        parts = {
            "role": role,
            "template": template,
            "model": body["model"],
            "decoding": {k: v for k, v in body.items() if k not in ignored},
            "prompt": _normalized(context, mode),
        }
        return cache.key(CacheKind.RESPONSE, inp.tenant, parts)

    async def _cached(
        self, key: str | None, body: dict[str, Any], model: str, schema: type[BaseModel] | None
    ) -> _Reply | None:
        """The cached reply for ``key`` when one exists and still serves this call."""
        if key is None or self._cache is None:
            return None
        entry = await self._cache.get(CacheKind.RESPONSE, key)
        if entry is None:
            return None
        try:
            text = str(entry["text"])
            first = Usage.model_validate(entry["usage"])
        except (KeyError, ValidationError):
            return None
        if first.completion_tokens > body["max_tokens"]:
            return None  # it would not have fit this call's cap: ask the model instead
        if schema is not None and _parse(schema, text, None)[0] is None:
            return None
        saved = _usage(
            self._config.price(model),
            _TokenUsage(
                prompt_tokens=first.prompt_tokens, completion_tokens=first.completion_tokens
            ),
        )
        self._cache.saved(CacheKind.RESPONSE, saved.total_tokens, saved.cost_usd)
        return _Reply(text=text, usage=Usage(), model=model, cached=True, saved=saved)

    async def _cache_put(self, key: str, entry: dict[str, Any]) -> None:
        if self._cache is not None:
            await self._cache.put(CacheKind.RESPONSE, key, entry)

    async def _post(
        self,
        body: dict[str, Any],
        charges: costing.AttemptCharges | None = None,
        client: openai.AsyncOpenAI | None = None,
    ) -> _Completion:
        """Send one chat completion request and parse the reply, heartbeating while it runs.

        Raises:
            ApplicationError: The vendor error, classified by ``errors.from_openai`` (retryable
                or not), a retryable ``LLM_TRANSIENT`` when the body is not a chat completion,
                or a non-retryable ``LLM_RESPONSE_TOO_LARGE`` when it is over the size cap.
        """
        client = client or self._client
        try:
            async with heartbeating():
                with classifying_openai_errors(secrets=(client.api_key,)):
                    # The client's own POST (same auth, base URL, timeout, vendor retries off
                    # and error types as ``chat.completions.create``) without the typed
                    # method's walk of every parameter against its TypedDicts, which is about a
                    # third of this activity's CPU; the body is plain JSON already.
                    with _unbilled_on_refusal(charges):
                        raw = await client.post(
                            "/chat/completions",
                            body=body,
                            cast_to=str,
                            options=self._options(self._config.request_timeout_seconds),
                        )
            _check_reply_size(len(raw))
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

    async def _stream(
        self,
        body: dict[str, Any],
        draft: DraftTokens,
        charges: costing.AttemptCharges | None = None,
        client: openai.AsyncOpenAI | None = None,
    ) -> _Completion:
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

        client = client or self._client
        body = body | {"stream": True, "stream_options": {"include_usage": True}}
        timeout = self._config.request_timeout_seconds
        try:
            # The client's timeout bounds each read; this bounds the whole stream, so an
            # endpoint that trickles tokens still ends in a classified timeout well before
            # LLM_CALL's start-to-close timeout kills the attempt.
            async with heartbeating(), asyncio.timeout(timeout):
                with classifying_openai_errors(secrets=(client.api_key,)):
                    with _unbilled_on_refusal(charges):
                        stream = await client.post(
                            "/chat/completions",
                            body=body,
                            cast_to=object,
                            stream=True,
                            stream_cls=openai.AsyncStream[object],
                            options=self._options(timeout),
                        )
                    async with stream:
                        return await _collect(stream, draft)
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

    def _options(self, timeout: float) -> Any:
        """Request options: the timeout, and the job's ID when ``job_header`` is on."""
        options: dict[str, Any] = {"timeout": timeout}
        job_id = activity.info().workflow_id if activity.in_activity() else None
        if self._config.job_header and job_id:
            options["headers"] = {"X-Keel-Job-Id": job_id}
        return options

    def _affordable(
        self, inp: LLMCallBase, model: str, prompt_tokens: int, spent_usd: float = 0.0
    ) -> int:
        """Completion tokens this call may use: the workflow's cap, the worker's, and the money.

        Args:
            inp: The call's input (its token cap and the job's dollars left).
            model: The model, for its price.
            prompt_tokens: The prompt's exact token count.
            spent_usd: What earlier attempts of this call may have cost already.
        """
        cap = self._config.max_output_tokens
        if inp.max_output_tokens is not None:
            cap = min(cap, inp.max_output_tokens)
        if inp.max_cost_usd is None:
            return cap
        price_in, price_out = self._config.price(model)
        spare_usd = inp.max_cost_usd - spent_usd - prompt_tokens * price_in / 1_000_000
        if price_out > 0:
            # One token of slack: charges round up to whole hundred-millionths of a dollar.
            cap = min(cap, int(spare_usd * 1_000_000 / price_out) - 1)
        elif spare_usd < 0:
            cap = 0
        if cap < MIN_OUTPUT_TOKENS:
            log.info("llm.refused_by_budget", usd_left=inp.max_cost_usd, spent_usd=spent_usd)
            raise ApplicationError(
                f"max_cost_usd: ${inp.max_cost_usd - spent_usd:.6f} left cannot pay for a "
                f"{model} call of {prompt_tokens} prompt tokens and {MIN_OUTPUT_TOKENS} "
                "output tokens",
                type=BUDGET_EXHAUSTED,
                non_retryable=True,
            )
        return cap


class _Reply(BaseModel):
    """What ``_complete`` hands back: the reply's text and where and how it was served."""

    text: str
    reason: str | None = None
    """Why the text is unusable as it stands (truncated), if it is."""
    usage: Usage
    tier: str | None = None
    model: str | None = None
    cached: bool | None = None
    saved: Usage | None = None
    degraded: str | None = None

    def fields(self) -> dict[str, Any]:
        """The ``LLMCallResult`` fields of an activity's result."""
        fields: dict[str, Any] = {
            "usage": self.usage,
            "tier": self.tier,
            "model": self.model,
            "cached": self.cached,
            "saved": self.saved,
        }
        if self.degraded is not None:
            fields["degraded"] = self.degraded
        return fields


@dataclass(frozen=True)
class Fallback:
    """Where calls go while a model's breaker is open: another endpoint, or other models.

    ``models`` maps a model to its stand-in (a model of the same tier); a model not in it is
    asked for by the same name, which suits a second endpoint serving the same models.
    """

    client: openai.AsyncOpenAI
    models: dict[str, str]
    endpoint: str


@dataclass(frozen=True)
class _Route:
    client: openai.AsyncOpenAI
    model: str
    admission: Admission
    degraded: str | None = None


def endpoint_name(base_url: str) -> str:
    """An endpoint's name in breaker names and reasons: its host and port, no credentials."""
    parts = urlsplit(base_url)
    return parts.hostname + (f":{parts.port}" if parts.port else "") if parts.hostname else "?"


def _circuit_open(open_: CircuitOpen, tier: str) -> ApplicationError:
    """The call's failure: non-retryable, naming the breaker and the tier it was on.

    The workflow moves the call to the tier above (``workflows/_calling.py``).
    """
    return ApplicationError(
        str(open_), open_.name, tier, type=errors.CIRCUIT_OPEN, non_retryable=True
    )


class _Summary(BaseModel):
    """The summarizer's reply."""

    model_config = ConfigDict(extra="ignore")

    summary: str


def _normalized(value: Any, mode: Normalization) -> Any:
    """``value`` with every string in it normalised for a cache key (keys kept as they are)."""
    if isinstance(value, str):
        return normalize_text(value, mode)
    if isinstance(value, dict):
        return {k: _normalized(v, mode) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_normalized(v, mode) for v in value]
    return value


def _answer_text(text: str) -> str:
    """The answer in a drafting reply: its JSON ``answer``, or the text itself."""
    try:
        return str(json.loads(text)["answer"])
    except (ValueError, KeyError, TypeError):
        return text.strip()  # A plain-text answer is still an answer; the verifier judges it.


class _Message(BaseModel):
    content: str | None = None


class _Choice(BaseModel):
    message: _Message = Field(default_factory=_Message)
    finish_reason: str | None = None


class _TokenUsage(BaseModel):
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


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


def _check_reply_size(chars: int) -> None:
    """Refuse a reply past ``errors.MAX_LLM_RESPONSE_CHARS`` (its body, or its streamed text).

    Raises:
        ApplicationError: ``LLM_RESPONSE_TOO_LARGE``, non-retryable: the same request gets the
            same oversized reply, which could not travel through history anyway.
    """
    if chars > errors.MAX_LLM_RESPONSE_CHARS:
        raise ApplicationError(
            f"the model's reply ran past {errors.MAX_LLM_RESPONSE_CHARS} characters; refused",
            type=errors.LLM_RESPONSE_TOO_LARGE,
            non_retryable=True,
        )


async def _collect(stream: AsyncIterable[object], draft: DraftTokens) -> _Completion:
    """Read a streamed completion to its end, feeding ``draft`` the answer's new text.

    Raises:
        ApplicationError: ``LLM_TRANSIENT`` when the stream ends before its finish reason;
            ``LLM_RESPONSE_TOO_LARGE`` (non-retryable) as soon as the text runs past the cap.
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
                _check_reply_size(len(raw))
                so_far = _answer_so_far(raw)
                if so_far is not None and so_far.startswith(draft.fed):
                    draft.feed(so_far[len(draft.fed) :])
    if finish is None:
        raise ApplicationError(
            "model stream ended before the reply was complete", type=errors.LLM_TRANSIENT
        )
    # An endpoint that ignores ``include_usage`` leaves usage None: the call is then charged
    # at its reservation (``_charged``), so budgets and quotas are never undercharged.
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


def _usage(price: tuple[float, float], usage: _TokenUsage) -> Usage:
    """Usage at ``price`` of known token counts (a cached reply's, for what it saved)."""
    tokens = (usage.prompt_tokens or 0, usage.completion_tokens or 0)
    return _as_usage(costing.charge(price, tokens, 0, 0))


def _charged(
    price: tuple[float, float], usage: _TokenUsage | None, prompt_tokens: int, max_tokens: int
) -> Usage:
    """What an answered call is charged: the endpoint's usage, clamped at zero.

    Counts the endpoint left out are charged at the reservation (``costing.charge``).
    """
    reported = (usage.prompt_tokens, usage.completion_tokens) if usage is not None else None
    charged = costing.charge(price, reported, prompt_tokens, max_tokens)
    if charged.estimated:
        log.info("llm.usage_estimated", prompt_tokens=prompt_tokens, max_tokens=max_tokens)
    return _as_usage(charged)


def _as_usage(charge: costing.Charge) -> Usage:
    return Usage(
        prompt_tokens=charge.prompt_tokens,
        completion_tokens=charge.completion_tokens,
        cost_usd=charge.cost_usd,
    )


@contextlib.contextmanager
def _unbilled_on_refusal(charges: costing.AttemptCharges | None) -> Iterator[None]:
    """Take an attempt's worst case back off the record when the endpoint refused it.

    An endpoint that answered with an error status (429, 5xx, 4xx) did not bill the attempt.
    """
    import openai  # Deferred: only the worker, which built the client, sends requests.

    try:
        yield
    except openai.APIStatusError:
        if charges is not None:
            charges.not_billed()
        raise


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
