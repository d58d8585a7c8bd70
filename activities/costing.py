"""Exact token counts and cost arithmetic for model calls, including attempts that failed.

This module owns three things the model gateway (``activities/llm.py``) builds on:

- Token counts with the model's real tokenizer, offline. ``bpe-openai`` ships OpenAI's o200k and
  cl100k vocabularies in its wheel (``tiktoken`` downloads them on first use, which fails on a
  worker without internet). The old estimate of one token per ``CHARS_PER_TOKEN`` characters
  undercounts CJK text and emoji, which take about a token per character or more.
- Cost arithmetic in Keel's unit, the hundred-millionth of a dollar (``UNITS_PER_USD`` in
  ``workflows/_budget.py``), always rounded up so a budget is never undercharged: what a reply
  costs (``charge``), what an attempt can cost at most (``worst_case``), and the check of a
  worker's price table (``validate_prices``).
- ``AttemptCharges``: how an activity carries the worst case of its earlier attempts that sent
  their request and then failed (a timeout, a broken body) into its next attempt, through
  Temporal's heartbeat details, so retries can never spend past ``max_cost_usd`` unseen.
  ``CarryAttemptCharges`` is the worker interceptor that keeps that record from being wiped by
  the activity's other, detail-less heartbeats.

Not workflow code. Counting is CPU work of 0.1 to 0.4 ms per 4,000 characters; the first count
of an encoding loads it (one to two seconds, see ``preload``).
"""

from __future__ import annotations

import functools
import math
import re
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Final, Literal, Protocol

import structlog
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from temporalio import activity
from temporalio.worker import (
    ActivityInboundInterceptor,
    ActivityOutboundInterceptor,
    Interceptor,
)

__all__ = [
    "CHAT_MESSAGE_TOKENS",
    "CHAT_REPLY_PRIMING_TOKENS",
    "DEFAULT_ENCODING",
    "AttemptCharges",
    "CarryAttemptCharges",
    "Charge",
    "charge",
    "count_chat_tokens",
    "count_tokens",
    "encoding_name",
    "preload",
    "validate_prices",
    "worst_case",
    "worst_case_usd",
]

log = structlog.get_logger(__name__)

DEFAULT_ENCODING = "o200k_base"
"""The encoding of a model this module does not know: the one every current OpenAI chat model
(gpt-4o and later, the o-series) uses. An unknown model is usually a new one or a deployment
alias of one; counting it with an older, smaller vocabulary would overcount, not fail."""

CHAT_MESSAGE_TOKENS = 3
"""Tokens OpenAI adds around each chat message (its documented accounting for chat prompts)."""
CHAT_NAME_TOKENS = 1
"""Extra token for a message that carries a ``name``."""
CHAT_REPLY_PRIMING_TOKENS = 3
"""Tokens that prime the assistant's reply, once per prompt."""

_UNITS_PER_USD = 100_000_000
"""Keel's money unit, as ``workflows/_budget.py`` counts it (activities cannot import it)."""

_SHIPPED_ENCODINGS = frozenset({"o200k_base", "cl100k_base", "voyage3_base"})
"""Encodings whose vocabularies are inside the bpe-openai wheel. Its model map also names
gpt2/r50k/p50k, which it can load only through tiktoken's download, so those are never chosen."""

_ENCODING_RULES: tuple[tuple[re.Pattern[str], str], ...] = (
    # Current chat and reasoning models; the simulator's sim-* models stand in for them.
    (re.compile(r"(gpt-4o|chatgpt-4o|gpt-4\.1|gpt-4\.5|gpt-5|gpt-oss|sim-)"), "o200k_base"),
    (re.compile(r"o[134](-|$)"), "o200k_base"),
    # gpt-4 itself and its -turbo/-32k/dated variants, but not gpt-4o or gpt-4.1 (above).
    (re.compile(r"gpt-4(-|$)"), "cl100k_base"),
    (re.compile(r"(gpt-3\.5|gpt-35-turbo|text-embedding-3|text-embedding-ada-002)"), "cl100k_base"),
)
"""Prefix rules, matched at the start of a lower-cased model name without provider prefix, for
the names bpe-openai's exact-match map misses: dated snapshots ("gpt-4o-2024-08-06"), newer
models, and Azure's spelling ("gpt-35-turbo")."""

_PIECE_CHARS = 50_000
"""Longest text encoded in one call. bpe-openai refuses 1,000,000 characters or 200,000 tokens
at once; a character is at most four UTF-8 bytes and so at most four tokens."""


class _Encoder(Protocol):
    """The part of ``bpe_openai.Encoding`` (tiktoken's API) this module uses."""

    def encode_ordinary(self, text: str) -> list[int]:
        """Token IDs of ``text``, with special-token text encoded as plain text."""
        ...


_loaded: dict[str, _Encoder] = {}
_loading = threading.Lock()


COUNT_CACHE_CHARS = 16_000
"""Texts up to this long have their counts kept (under ``_PIECE_CHARS``, so counted whole)."""
COUNT_CACHE_SIZE = 512
"""Counts kept, the least recently used dropped: at most 8 million characters of text held."""


@functools.lru_cache(maxsize=256)
def encoding_name(model: str) -> str:
    """The tokenizer encoding ``model`` uses.

    bpe-openai's own model map answers first when it knows the name and ships the encoding.
    Otherwise: o200k_base for gpt-4o*, chatgpt-4o*, gpt-4.1*, gpt-4.5*, gpt-5*, gpt-oss*, the
    o1/o3/o4 families and the simulator's sim-* models; cl100k_base for gpt-4 (and its -turbo,
    -32k and dated variants), gpt-3.5*/gpt-35-turbo*, text-embedding-3* and
    text-embedding-ada-002; ``DEFAULT_ENCODING`` (o200k_base) for any other model.

    Args:
        model: A model name as sent to the endpoint. Case is ignored, and so are a provider
            prefix ("openai/gpt-4o") and a fine-tune wrapper ("ft:gpt-4o-mini:org::id").

    Returns:
        An encoding name bpe-openai loads offline.
    """
    name = _base_model(model)
    known = _library_encoding(name)
    if known is not None:
        return known
    for pattern, encoding in _ENCODING_RULES:
        if pattern.match(name):
            return encoding
    return DEFAULT_ENCODING


def count_tokens(model: str, text: str) -> int:
    """Exact number of tokens ``text`` is to ``model``.

    Text that looks like a special token ("<|endoftext|>") is counted as the plain text it is,
    which is how the endpoint treats it in a message, and never raises. Text longer than
    50,000 characters is counted in pieces cut where the tokenizer's own pre-splitting cuts
    (before " word" or after a line break), which keeps the sum exact; a piece with no such
    place within 50,000 characters (one unbroken run of CJK, say) is cut anyway, where the count
    may differ from the whole's by a token.

    Args:
        model: The model the text is for (see ``encoding_name``).
        text: Any text.

    Returns:
        The token count.
    """
    encoding = encoding_name(model)
    if len(text) <= COUNT_CACHE_CHARS:
        return _count_short(encoding, text)
    encoder = _encoder(encoding)
    return sum(len(encoder.encode_ordinary(piece)) for piece in _pieces(text))


@functools.lru_cache(maxsize=COUNT_CACHE_SIZE)
def _count_short(encoding: str, text: str) -> int:
    """``count_tokens`` of a text short enough to keep.

    Every model call repeats its prompt template and response schema: counted once per process.
    """
    return len(_encoder(encoding).encode_ordinary(text))


def count_chat_tokens(model: str, messages: Sequence[Mapping[str, Any]]) -> int:
    """Prompt tokens of a chat request's ``messages``, by OpenAI's documented accounting.

    Each message costs ``CHAT_MESSAGE_TOKENS`` plus the tokens of each of its string fields
    (role, content, name ...), one more with a ``name``; the reply's priming adds
    ``CHAT_REPLY_PRIMING_TOKENS``. The response-format schema and tool definitions are not
    messages: the caller adds them.

    Args:
        model: The model the request goes to.
        messages: Chat messages. ``content`` is a string, None, or a list of text parts
            (``{"type": "text", "text": ...}``).

    Returns:
        The prompt's token count.

    Raises:
        ValueError: A field this accounting cannot count exactly (an image part, tool calls):
            Keel sends none, and an undercount would let a call overspend.
    """
    total = CHAT_REPLY_PRIMING_TOKENS
    for message in messages:
        total += CHAT_MESSAGE_TOKENS
        for key, value in message.items():
            if key == "content" and isinstance(value, list):
                total += sum(count_tokens(model, _part_text(part)) for part in value)
            elif isinstance(value, str):
                total += count_tokens(model, value)
                if key == "name":
                    total += CHAT_NAME_TOKENS
            elif value is not None:
                raise ValueError(f"cannot count chat message field {key!r} exactly")
    return total


def preload(models: Iterable[str]) -> None:
    """Load the encodings of ``models`` now rather than at their first count.

    The first load imports bpe-openai, which reads its vocabularies (about 0.9 s and 65 MB),
    and builds the encoding (about 0.1 s and 75 MB for o200k_base). An async activity counting
    first would block its event loop for that long; a worker calls this at start, in a thread.

    Args:
        models: Model names; each distinct encoding is loaded once per process.
    """
    for name in {encoding_name(model) for model in models}:
        _encoder(name)


def validate_prices(prices: Mapping[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
    """A worker's price table, checked: every price finite and not negative.

    Args:
        prices: USD per million (prompt, completion) tokens by model name.

    Returns:
        The same table with every price a float.

    Raises:
        ValueError: Naming the model and the bad value (NaN, infinity, negative, not a number).
    """
    checked: dict[str, tuple[float, float]] = {}
    for model, (prompt, completion) in prices.items():
        checked[model] = (_price(model, "prompt", prompt), _price(model, "completion", completion))
    return checked


@dataclass(frozen=True)
class Charge:
    """Tokens and dollars charged for one call (or several added up)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    """Rounded up to whole hundred-millionths of a dollar."""
    estimated: bool = False
    """Some of it is a reservation standing in for usage the endpoint did not report."""

    @property
    def total_tokens(self) -> int:
        """Prompt plus completion tokens."""
        return self.prompt_tokens + self.completion_tokens

    def __add__(self, other: Charge) -> Charge:
        return Charge(
            prompt_tokens=self.prompt_tokens + other.prompt_tokens,
            completion_tokens=self.completion_tokens + other.completion_tokens,
            cost_usd=_units(self.cost_usd + other.cost_usd) / _UNITS_PER_USD,
            estimated=self.estimated or other.estimated,
        )


def charge(
    price: tuple[float, float],
    reported: tuple[int | None, int | None] | None,
    reserved_prompt: int,
    reserved_completion: int,
) -> Charge:
    """What one answered call costs.

    Usage the endpoint reports is the truth, even above the reservation, but a negative count
    from a buggy endpoint counts as zero. A reply with no usage at all is charged at the whole
    reservation; a usage that lacks one of the two counts is charged that part's reservation.

    Args:
        price: USD per million (prompt, completion) tokens.
        reported: The endpoint's (prompt_tokens, completion_tokens), either None when missing;
            None when the reply had no usage.
        reserved_prompt: The prompt's counted tokens (``count_chat_tokens`` plus allowances).
        reserved_completion: The completion tokens the request allowed (its ``max_tokens``).

    Returns:
        The tokens charged and their cost, rounded up to whole hundred-millionths of a dollar.

    Raises:
        ValueError: A reservation is negative or a price is not finite and non-negative.
    """
    if reserved_prompt < 0 or reserved_completion < 0:
        raise ValueError(f"negative reservation: {reserved_prompt}, {reserved_completion}")
    prompt, completion = reported if reported is not None else (None, None)
    charged = Charge(
        prompt_tokens=reserved_prompt if prompt is None else max(0, prompt),
        completion_tokens=reserved_completion if completion is None else max(0, completion),
        estimated=prompt is None or completion is None,
    )
    return _priced(price, charged)


def worst_case(
    price: tuple[float, float], prompt_tokens: int, max_completion_tokens: int
) -> Charge:
    """The most one attempt can cost: its prompt and every completion token it allows.

    Args:
        price: USD per million (prompt, completion) tokens.
        prompt_tokens: The prompt's counted tokens.
        max_completion_tokens: The request's ``max_tokens``.

    Returns:
        The worst case, marked ``estimated``, cost rounded up to whole hundred-millionths.
    """
    return charge(price, None, prompt_tokens, max_completion_tokens)


def worst_case_usd(
    price: tuple[float, float], prompt_tokens: int, max_completion_tokens: int
) -> float:
    """``worst_case(...).cost_usd``: dollars one attempt can cost at most, rounded up."""
    return worst_case(price, prompt_tokens, max_completion_tokens).cost_usd


_RECORD_KIND: Final = "keel.attempt_charges"


class _Record(BaseModel):
    """The heartbeat detail that carries earlier attempts' charges to the next attempt."""

    model_config = ConfigDict(frozen=True, allow_inf_nan=False)

    kind: Literal["keel.attempt_charges"] = _RECORD_KIND
    attempts: int = Field(default=0, ge=0)
    """Earlier attempts charged (each sent its request and failed)."""
    prompt_tokens: int = Field(default=0, ge=0)
    completion_tokens: int = Field(default=0, ge=0)
    cost_usd: float = Field(default=0.0, ge=0)


class AttemptCharges:
    """The worst cases of an activity's earlier attempts that sent a request and then failed.

    A model call whose attempt times out or breaks off mid-reply may still be billed in full,
    and Temporal retries it with the same input, so nothing in the workflow sees that spend.
    Each attempt records, in its heartbeat details, what the attempts so far may have cost;
    Temporal hands the last recorded details to the next attempt
    (``activity.info().heartbeat_details``). Use::

        charges = AttemptCharges.from_activity()
        # Afford this call from max_cost_usd - charges.spent_usd, then:
        charges.sending(worst_case(price, prompt_tokens, max_tokens))
        response = await post(...)         # an error status: charges.not_billed(), then raise
        usage = charge(...) + charges.spent  # what the activity reports

    Delivery (read in sdk-core, tested with temporalio 1.35 in tests/activities/test_costing.py):
    the SDK sends an attempt's first heartbeat at once and later ones at most every
    0.8 x heartbeat_timeout, keeping only the newest; when the attempt fails, the worker flushes
    that newest one before reporting the failure. Not covered: a worker killed, or an attempt
    Temporal times out, within that interval after ``sending``; the record of that attempt never
    leaves the worker, and the next attempt does not charge it. Every other heartbeat of the
    activity replaces the details; ``CarryAttemptCharges`` must be registered so that
    heartbeats without details repeat the record instead of erasing it.
    """

    def __init__(self, spent: Charge | None = None, attempts: int = 0) -> None:
        """Start from what earlier attempts spent.

        Args:
            spent: The worst cases of earlier attempts that sent a request; none by default.
            attempts: How many attempts those were.
        """
        self._spent = spent or Charge()
        self._attempts = attempts
        self._at_risk: Charge | None = None

    @classmethod
    def from_activity(cls) -> AttemptCharges:
        """What earlier attempts of the running activity recorded.

        Returns:
            Their charges; none outside an activity, on attempt 1, or when the last heartbeat
            details are not a charges record.
        """
        if not activity.in_activity():
            return cls()
        info = activity.info()
        carried = cls.from_details(info.heartbeat_details)
        if carried.attempts:
            log.info(
                "llm.earlier_attempts_charged",
                job_id=info.workflow_id,
                attempt=info.attempt,
                attempts_charged=carried.attempts,
                cost_usd=carried.spent_usd,
            )
        return carried

    @classmethod
    def from_details(cls, details: Sequence[Any]) -> AttemptCharges:
        """Read a charges record from heartbeat details.

        Args:
            details: An activity's last heartbeat details, as the SDK decoded them.

        Returns:
            The record's charges; none when the details hold no valid record.
        """
        record = _record_in(details)
        if record is None:
            return cls()
        spent = Charge(
            prompt_tokens=record.prompt_tokens,
            completion_tokens=record.completion_tokens,
            cost_usd=_units(record.cost_usd) / _UNITS_PER_USD,
            estimated=record.attempts > 0,
        )
        return cls(spent, record.attempts)

    @property
    def spent(self) -> Charge:
        """Tokens and dollars of the earlier attempts, to add to this attempt's usage."""
        return self._spent

    @property
    def spent_usd(self) -> float:
        """Dollars of the earlier attempts: the call may spend only what is left after them."""
        return self._spent.cost_usd

    @property
    def spent_tokens(self) -> int:
        """Tokens of the earlier attempts."""
        return self._spent.total_tokens

    @property
    def attempts(self) -> int:
        """How many earlier attempts are charged."""
        return self._attempts

    def sending(self, worst: Charge) -> None:
        """Record, right before the request goes out, that this attempt may cost ``worst``.

        Heartbeats the totals including this attempt, so an attempt that dies after sending is
        charged by the next one. One request per attempt: a second call replaces the first.

        Args:
            worst: This attempt's worst case (``worst_case``).
        """
        self._at_risk = worst
        self._heartbeat()

    def not_billed(self) -> None:
        """Take this attempt back out: the endpoint answered with an error status.

        Providers do not bill a request they refused (429, 5xx, 4xx), so a retry storm of
        refusals costs nothing. Heartbeats the earlier attempts' totals again.
        """
        if self._at_risk is not None:
            self._at_risk = None
            self._heartbeat()

    def details(self) -> dict[str, Any]:
        """The heartbeat record: earlier attempts, plus this one once it has sent its request."""
        total, attempts = self._spent, self._attempts
        if self._at_risk is not None:
            total, attempts = total + self._at_risk, attempts + 1
        return _Record(
            attempts=attempts,
            prompt_tokens=total.prompt_tokens,
            completion_tokens=total.completion_tokens,
            cost_usd=total.cost_usd,
        ).model_dump()

    def _heartbeat(self) -> None:
        if activity.in_activity():
            activity.heartbeat(self.details())


class CarryAttemptCharges(Interceptor):
    """Worker interceptor: heartbeats without details repeat the attempt-charges record.

    Temporal keeps only the last heartbeat's details, and Keel's activities heartbeat with none
    while they wait or call (``activities/_heartbeat.py``, ``activities/gateway_limits.py``);
    without this, such a heartbeat after ``AttemptCharges.sending`` or on a later attempt would
    erase the record. Activities that never record charges are untouched. Register it on the
    worker (``workers/registry.py`` ``INTERCEPTORS``).
    """

    def intercept_activity(self, next: ActivityInboundInterceptor) -> ActivityInboundInterceptor:
        """Wrap each activity execution.

        Args:
            next: The rest of the chain.

        Returns:
            The interceptor that wraps the execution's heartbeats.
        """
        return _CarryingInbound(next)


class _CarryingInbound(ActivityInboundInterceptor):
    def init(self, outbound: ActivityOutboundInterceptor) -> None:
        super().init(_CarryingOutbound(outbound))


class _CarryingOutbound(ActivityOutboundInterceptor):
    """One per attempt: remembers the newest charges record this attempt saw or sent."""

    def __init__(self, next: ActivityOutboundInterceptor) -> None:
        super().__init__(next)
        self._record: tuple[Any, ...] | None = None

    def heartbeat(self, *details: Any) -> None:
        if details:
            if _record_in(details) is not None:
                self._record = details
        else:
            if self._record is None:
                # The record an earlier attempt left is this attempt's until it sends its own.
                carried = self.next.info().heartbeat_details
                self._record = tuple(carried) if _record_in(carried) is not None else ()
            details = self._record
        self.next.heartbeat(*details)


def _record_in(details: Sequence[Any]) -> _Record | None:
    """The charges record that ``details`` consist of, if they do and it is valid."""
    if len(details) != 1 or not isinstance(details[0], Mapping):
        return None
    if details[0].get("kind") != _RECORD_KIND:
        return None
    try:
        return _Record.model_validate(details[0])
    except ValidationError as err:
        # Only a worker writes these; a bad one is a bug, and charging nothing is all we can do.
        log.warning("llm.attempt_charges_invalid", errors=err.error_count())
        return None


def _priced(price: tuple[float, float], tokens: Charge) -> Charge:
    """``tokens`` with their cost at ``price``, rounded up to whole hundred-millionths."""
    price_in = _price("(this call)", "prompt", price[0])
    price_out = _price("(this call)", "completion", price[1])
    # Exact rational arithmetic on the prices as written ("0.15", not the float nearest it),
    # so the rounding up adds a unit only where the true cost has a fraction of one.
    units = (
        tokens.prompt_tokens * Fraction(repr(price_in))
        + tokens.completion_tokens * Fraction(repr(price_out))
    ) * (_UNITS_PER_USD // 1_000_000)
    return Charge(
        prompt_tokens=tokens.prompt_tokens,
        completion_tokens=tokens.completion_tokens,
        cost_usd=math.ceil(units) / _UNITS_PER_USD,
        estimated=tokens.estimated,
    )


def _units(usd: float) -> int:
    """``usd`` (a sum of whole units, give or take float noise) in whole units."""
    return round(usd * _UNITS_PER_USD)


def _price(model: str, which: str, value: object) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value < 0
    ):
        raise ValueError(
            f"price of {model!r}: {which} price {value!r} is not a finite, non-negative number "
            "of USD per million tokens"
        )
    return float(value)


def _base_model(model: str) -> str:
    """``model`` lower-cased, without provider prefix or fine-tune wrapper."""
    name = model.strip().lower().rsplit("/", 1)[-1]
    if name.startswith("ft:"):
        name = name[3:].split(":", 1)[0]
    return name


def _library_encoding(name: str) -> str | None:
    """bpe-openai's encoding for ``name`` when it knows the model and ships the encoding."""
    import bpe_openai  # Deferred: importing it reads every vocabulary (see ``preload``).

    try:
        encoding = str(bpe_openai.encoding_name_for_model(name))
    except KeyError:
        return None
    return encoding if encoding in _SHIPPED_ENCODINGS else None


def _encoder(name: str) -> _Encoder:
    """The encoding ``name``, loaded once per process, whichever thread asks first."""
    encoder = _loaded.get(name)
    if encoder is None:
        with _loading:
            encoder = _loaded.get(name)
            if encoder is None:
                import bpe_openai  # Deferred: see ``preload``.

                encoder = bpe_openai.get_encoding(name)
                _loaded[name] = encoder
    return encoder


def _part_text(part: object) -> str:
    """The text of one content part; other parts are refused (see ``count_chat_tokens``)."""
    if isinstance(part, str):
        return part
    if (
        isinstance(part, Mapping)
        and part.get("type") == "text"
        and isinstance(part.get("text"), str)
    ):
        return str(part["text"])
    kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
    raise ValueError(f"cannot count a {kind!r} content part exactly")


def _pieces(text: str) -> Iterator[str]:
    """``text`` in pieces of at most _PIECE_CHARS, cut where the tokenizer cuts anyway."""
    start = 0
    while len(text) - start > _PIECE_CHARS:
        cut = _cut_before(text, start, start + _PIECE_CHARS)
        yield text[start:cut]
        start = cut
    yield text[start:]


def _cut_before(text: str, start: int, end: int) -> int:
    """The last index in (start, end] where both encodings' pre-splitting starts a new piece.

    Both split before a single space that follows a letter or digit and precedes a letter
    (" word" is one piece, and neither a word nor a number takes a trailing space), and after a
    line break followed by a letter (no piece runs from a line break into a word). Without such
    a place, ``end``.
    """
    for i in range(end, start, -1):
        before, here = text[i - 1], text[i]
        if before == "\n" and here.isalpha():
            return i
        if here == " " and before.isalnum() and i + 1 < len(text) and text[i + 1].isalpha():
            return i
    return end
