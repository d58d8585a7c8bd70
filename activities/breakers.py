"""Circuit breakers shared by the whole worker fleet, in Redis (issue 16).

One breaker per model endpoint and model (``llm:{endpoint}:{model}``) and per tool
(``tool:{name}``). Closed, a breaker counts the calls it lets through in a sliding window;
when at least ``min_calls`` ended in the window and ``failure_rate`` of them failed, it opens
for ``open_seconds``. Then it is half-open: at most ``trial_calls`` calls run at a time across
the fleet, each holding a lease (a sorted-set member that expires on its own if its worker
dies); the first trial that succeeds closes the breaker, one that fails opens it again.

Only failures of the provider count: retryable errors (5xx, 429, timeouts, connection errors,
a malformed body). Refusals of Keel's own (budget, schema, policy, a 4xx the request caused)
happen with the provider answering, so they count as neither.

State lives in Redis, so every worker sees a breaker open on its next call (one script per
call, well under the 1 s the issue allows), and a worker that starts reads the fleet's state
rather than resetting it. Each key carries the breaker's name as a hash tag, so a script's keys
share one Redis Cluster slot. When Redis cannot be reached, each worker falls back to a breaker
of its own with the same rules (``keel_breaker_local`` says so) and retries Redis after
``OUTAGE_SECONDS``: a call is never blocked by the breaker store.

Not workflow code: every method performs I/O and runs inside activities.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import structlog
from pydantic import BaseModel, Field
from redis.exceptions import RedisError
from temporalio import activity

from keel.activities.redis_client import KeelRedis, connect

__all__ = [
    "Admission",
    "BreakerSettings",
    "BreakerState",
    "Breakers",
    "CircuitOpen",
    "breaker_key",
]

log = structlog.get_logger(__name__)

KEY_PREFIX = "keel:breaker:"
OUTAGE_SECONDS = 5.0
"""After a Redis error, breakers are this worker's own for this long before Redis is tried."""
REDIS_TIMEOUT_SECONDS = 0.25
"""The breaker store's socket timeouts: a slow Redis must not slow every call it guards."""

BreakerState = Literal["closed", "open", "half_open"]


class BreakerSettings(BaseModel):
    """How every breaker behaves; from the worker's settings (``KEEL_BREAKER_*``)."""

    enabled: bool = True
    window_seconds: float = Field(default=30.0, gt=0)
    """The failure rate is measured over calls that ended this long ago at most."""
    min_calls: int = Field(default=5, ge=1)
    """Fewer calls than this in the window never open the breaker."""
    failure_rate: float = Field(default=0.5, gt=0, le=1)
    open_seconds: float = Field(default=10.0, gt=0)
    """How long an open breaker fails calls fast before it lets trial calls through."""
    trial_calls: int = Field(default=3, ge=1)
    """Trial calls running at once, fleet-wide, while half-open."""
    trial_lease_seconds: float = Field(default=60.0, gt=0)
    """A trial's lease ends on its own after this (its worker died mid-call)."""
    sync_seconds: float = Field(default=0.5, ge=0, le=1)
    """A worker trusts a closed breaker this long before asking Redis again, and sends its
    successes in one batch this often (a failure goes at once, with the batch): two Lua calls per
    model call become about two per breaker per interval, and an open breaker is still seen by
    every worker within a second. 0 asks Redis on every call."""


class CircuitOpen(Exception):
    """A breaker is open: the call was not sent."""

    def __init__(self, name: str, retry_in: float) -> None:
        super().__init__(f"circuit {name} is open; trial calls in {max(0.0, retry_in):.1f} s")
        self.name = name
        self.retry_in = retry_in


@dataclass
class Admission:
    """A call let through by a breaker; ``record`` reports how it ended."""

    name: str
    trial: str | None = None
    """The lease of a half-open trial call, or None for a call through a closed breaker."""
    local: bool = False
    """Decided by this worker's own breaker (Redis unreachable)."""


def breaker_key(name: str) -> str:
    """The Redis key of a breaker's state; ``{name}`` is the Cluster hash tag."""
    return f"{KEY_PREFIX}{{{name}}}"


# KEYS: state hash, trial leases (zset). ARGV: now ms, trial_calls, lease ms, lease id.
# Returns {state, wait ms}: closed -> go; half_open -> a trial lease was taken; open -> refused.
_ADMIT = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state or state == 'closed' then return {'closed', 0} end
local now = tonumber(ARGV[1])
local until_ms = tonumber(redis.call('HGET', KEYS[1], 'until') or '0')
if now < until_ms then return {'open', until_ms - now} end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
if redis.call('ZCARD', KEYS[2]) < tonumber(ARGV[2]) then
  redis.call('ZADD', KEYS[2], now + tonumber(ARGV[3]), ARGV[4])
  redis.call('PEXPIRE', KEYS[2], tonumber(ARGV[3]))
  if state ~= 'half_open' then redis.call('HSET', KEYS[1], 'state', 'half_open') end
  return {'half_open', 0}
end
return {'open', 1000}
"""

# KEYS: state hash, window (hash of bucket -> ok/fail counts), trial leases.
# ARGV: now ms, outcome ('ok' | 'fail'), lease id or '', window ms, bucket ms, min calls,
# failure rate, open ms, key ttl ms, successes to count (a batch: with 'ok', this call's included).
# Returns the state after the outcome.
_RECORD = """
local now = tonumber(ARGV[1])
local ok = ARGV[2] == 'ok'
local ttl = tonumber(ARGV[9])
local function open()
  redis.call('HSET', KEYS[1], 'state', 'open', 'until', now + tonumber(ARGV[8]), 'opened', now)
  redis.call('DEL', KEYS[2])
  redis.call('PEXPIRE', KEYS[1], ttl)
  return 'open'
end
if ARGV[3] ~= '' then
  redis.call('ZREM', KEYS[3], ARGV[3])
  if ok then
    redis.call('HSET', KEYS[1], 'state', 'closed', 'until', 0, 'closed', now)
    redis.call('DEL', KEYS[2], KEYS[3])
    redis.call('PEXPIRE', KEYS[1], ttl)
    return 'closed'
  end
  return open()
end
local state = redis.call('HGET', KEYS[1], 'state')
if state == 'open' or state == 'half_open' then return state end
local bucket = math.floor(now / tonumber(ARGV[5]))
local oldest = math.floor((now - tonumber(ARGV[4])) / tonumber(ARGV[5]))
local oks = tonumber(ARGV[10])
if oks > 0 then redis.call('HINCRBY', KEYS[2], 'ok:' .. bucket, oks) end
if not ok then redis.call('HINCRBY', KEYS[2], 'fail:' .. bucket, 1) end
redis.call('PEXPIRE', KEYS[2], tonumber(ARGV[4]) + tonumber(ARGV[5]))
local fields = redis.call('HGETALL', KEYS[2])
local good, fails = 0, 0
for i = 1, #fields, 2 do
  local kind, b = string.match(fields[i], '(%a+):(%d+)')
  if tonumber(b) <= oldest then
    redis.call('HDEL', KEYS[2], fields[i])
  elseif kind == 'ok' then good = good + tonumber(fields[i + 1])
  else fails = fails + tonumber(fields[i + 1]) end
end
local total = good + fails
if (not ok) and total >= tonumber(ARGV[6]) and fails >= tonumber(ARGV[7]) * total then
  return open()
end
return 'closed'
"""


@dataclass
class _Local:
    """One breaker kept by this worker alone, while Redis is unreachable: the same rules."""

    state: BreakerState = "closed"
    until: float = 0.0
    ends: list[tuple[float, bool]] = field(default_factory=list)
    trials: dict[str, float] = field(default_factory=dict)


class Breakers:
    """The fleet's breakers, through one Redis client (None: this worker's own only).

    Args:
        redis: The breaker store; give it short timeouts (``from_url`` does).
        settings: Thresholds and timings.
        clock: Seconds since the epoch (tests move it).
    """

    def __init__(
        self,
        redis: KeelRedis | None,
        settings: BreakerSettings | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.redis = redis
        self.settings = settings or BreakerSettings()
        self._clock = clock
        self._down_until = 0.0 if redis is not None else float("inf")
        self._local: dict[str, _Local] = {}
        # Per breaker: until when a closed state read from Redis is trusted, the successes not
        # yet sent, and when successes were last sent (``BreakerSettings.sync_seconds``).
        self._trusted: dict[str, float] = {}
        self._oks: dict[str, int] = {}
        self._sent_at: dict[str, float] = {}
        self._admit = redis.register_script(_ADMIT) if redis is not None else None
        self._record = redis.register_script(_RECORD) if redis is not None else None

    @classmethod
    def from_url(cls, url: str, settings: BreakerSettings | None = None) -> Breakers:
        """Breakers on their own Redis client, whose short timeouts never hold a call up."""
        client = connect(
            url,
            decode_responses=True,
            socket_connect_timeout=REDIS_TIMEOUT_SECONDS,
            socket_timeout=REDIS_TIMEOUT_SECONDS,
        )
        return cls(client, settings)

    async def aclose(self) -> None:
        """Close the Redis client."""
        if self.redis is not None:
            await self.redis.aclose()

    async def admit(self, name: str) -> Admission:
        """Let a call through, or refuse it because the breaker is open.

        Raises:
            CircuitOpen: The breaker is open (or half-open with every trial slot taken).
        """
        if not self.settings.enabled:
            return Admission(name)
        now = self._clock()
        if self._admit is not None and now >= self._down_until:
            if self._trusted.get(name, 0.0) > now:
                return Admission(name)
            lease = uuid.uuid4().hex
            s = self.settings
            try:
                state, wait_ms = await self._admit(
                    keys=[breaker_key(name), f"{breaker_key(name)}:trials"],
                    args=[int(now * 1000), s.trial_calls, int(s.trial_lease_seconds * 1000), lease],
                )
            except (RedisError, OSError) as err:
                self._store_failed("admit", err)
            else:
                _gauge(name, str(state))
                self._trust(name, str(state), now)
                if state == "open":
                    raise CircuitOpen(name, int(wait_ms) / 1000)
                return Admission(name, trial=lease if state == "half_open" else None)
        return self._admit_local(name, now)

    async def record(self, admission: Admission, outcome: Literal["ok", "fail", "none"]) -> None:
        """Report how an admitted call ended: ``ok``, a provider ``fail``, or ``none``.

        ``none`` (the provider was not judged: the call was refused before it was sent) gives
        a trial's lease back without deciding anything.
        """
        if not self.settings.enabled:
            return
        now = self._clock()
        if admission.local or self._record is None or now < self._down_until:
            self._record_local(admission, outcome, now)
            return
        if outcome == "none":
            if admission.trial is not None:
                await self._release(admission)
            return
        s = self.settings
        name = admission.name
        if (
            admission.trial is None
            and outcome == "ok"
            and now - self._sent_at.get(name, float("-inf")) < s.sync_seconds
        ):
            self._oks[name] = self._oks.get(name, 0) + 1
            return
        oks = self._oks.pop(name, 0) + (outcome == "ok")
        self._sent_at[name] = now
        bucket = max(1.0, s.window_seconds / 10)
        try:
            state = await self._record(
                keys=[
                    breaker_key(admission.name),
                    f"{breaker_key(admission.name)}:window",
                    f"{breaker_key(admission.name)}:trials",
                ],
                args=[
                    int(now * 1000),
                    outcome,
                    admission.trial or "",
                    int(s.window_seconds * 1000),
                    int(bucket * 1000),
                    s.min_calls,
                    s.failure_rate,
                    int(s.open_seconds * 1000),
                    int(max(s.window_seconds, s.open_seconds, s.trial_lease_seconds) * 10_000),
                    oks,
                ],
            )
        except (RedisError, OSError) as err:
            self._store_failed("record", err)
            self._record_local(admission, outcome, now)
            return
        _gauge(admission.name, str(state))
        self._trust(name, str(state), now)
        if state == "open" and (admission.trial is not None or outcome == "fail"):
            log.warning("breaker.opened", breaker=admission.name)
        elif state == "closed" and admission.trial is not None:
            log.info("breaker.closed", breaker=admission.name)

    async def states(self) -> dict[str, dict[str, Any]]:
        """Every breaker the fleet has in Redis: state, and until when it stays open."""
        if self.redis is None:
            return {}
        found: dict[str, dict[str, Any]] = {}
        # On a Redis Cluster, the cluster client's scan_iter runs SCAN on every primary, each
        # with its own cursor, so breakers in any slot are found.
        async for key in self.redis.scan_iter(match=f"{KEY_PREFIX}{{*}}", count=500):
            name = str(key)[len(KEY_PREFIX) + 1 : -1]
            data = await self.redis.hgetall(key)
            if data:
                found[name] = {
                    "state": data.get("state", "closed"),
                    "open_until": float(data.get("until", 0)) / 1000 or None,
                }
        return found

    def _trust(self, name: str, state: str, now: float) -> None:
        """Trust a closed state for ``sync_seconds``; forget the trust on any other."""
        if state == "closed" and self.settings.sync_seconds > 0:
            self._trusted[name] = now + self.settings.sync_seconds
        else:
            self._trusted.pop(name, None)

    async def _release(self, admission: Admission) -> None:
        try:
            assert self.redis is not None
            await self.redis.zrem(f"{breaker_key(admission.name)}:trials", admission.trial or "")
        except (RedisError, OSError) as err:
            self._store_failed("release", err)

    def _store_failed(self, op: str, err: BaseException) -> None:
        self._down_until = self._clock() + OUTAGE_SECONDS
        log.warning("breaker.store_unavailable", op=op, error=type(err).__name__)
        _count("keel_breaker_store_errors", op=op)

    def _admit_local(self, name: str, now: float) -> Admission:
        if self.redis is not None:
            _count("keel_breaker_local", breaker=name)
        b = self._local.setdefault(name, _Local())
        if b.state == "open" and now < b.until:
            raise CircuitOpen(name, b.until - now)
        if b.state == "closed":
            return Admission(name, local=True)
        b.trials = {k: v for k, v in b.trials.items() if v > now}
        if len(b.trials) >= self.settings.trial_calls:
            raise CircuitOpen(name, 1.0)
        b.state = "half_open"
        lease = uuid.uuid4().hex
        b.trials[lease] = now + self.settings.trial_lease_seconds
        return Admission(name, trial=lease, local=True)

    def _record_local(
        self, admission: Admission, outcome: Literal["ok", "fail", "none"], now: float
    ) -> None:
        s = self.settings
        b = self._local.setdefault(admission.name, _Local())
        if admission.trial is not None:
            b.trials.pop(admission.trial, None)
            if outcome == "ok":
                b.state, b.ends = "closed", []
            elif outcome == "fail":
                b.state, b.until, b.ends = "open", now + s.open_seconds, []
            return
        if outcome == "none" or b.state != "closed":
            return
        b.ends = [e for e in b.ends if e[0] > now - s.window_seconds] + [(now, outcome == "ok")]
        fails = sum(1 for _, ok in b.ends if not ok)
        if (
            outcome == "fail"
            and len(b.ends) >= s.min_calls
            and fails >= s.failure_rate * len(b.ends)
        ):
            b.state, b.until, b.ends = "open", now + s.open_seconds, []
            log.warning("breaker.opened", breaker=admission.name, local=True)


def outcome_of(failure: BaseException | None) -> Literal["ok", "fail", "none"]:
    """How a call's end counts against its breaker: only provider failures are ``fail``.

    A budget, schema or policy refusal, or a 4xx the request caused, came from a provider that
    answered, so it is ``ok`` if the request reached it; an error before sending is ``none``.
    """
    # Deferred: ``keel fleet`` reads breakers on the client path, which never loads the model
    # SDK that ``errors`` imports.
    from keel.activities import errors

    if failure is None:
        return "ok"
    failure_type = getattr(failure, "type", None)
    if failure_type in (errors.LLM_TRANSIENT, errors.LLM_RATE_LIMITED, errors.TOOL_TRANSIENT):
        return "fail"
    if failure_type in (errors.BUDGET_EXHAUSTED, errors.LIMIT_WAIT_EXCEEDED):
        return "none"
    return "ok"


_STATE_VALUE = {"closed": 0, "half_open": 1, "open": 2}


def _gauge(name: str, state: str) -> None:
    if activity.in_activity():
        gauge = activity.metric_meter().create_gauge(
            "keel_breaker_state", "Circuit breaker state: 0 closed, 1 half-open, 2 open."
        )
        gauge.set(_STATE_VALUE.get(state, 0), {"breaker": name})


def _count(name: str, **attrs: str) -> None:
    if activity.in_activity():
        description = {
            "keel_breaker_store_errors": "Breaker store (Redis) operations that failed.",
            "keel_breaker_local": "Calls decided by a worker's own breaker, Redis unreachable.",
        }[name]
        activity.metric_meter().create_counter(name, description).add(1, attrs)
