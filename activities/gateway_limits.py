"""The model and tool gateways' limits: one ``async with`` around each call.

Not workflow code. ``GatewayLimits`` combines the fleet-wide primitives of
``activities/limits.py`` for one call: its model's requests and tokens per minute (a place is
reserved and the call waits the delay the limiter returns), then an in-flight lease for the
model or tool, renewed while the call runs. Waiting heartbeats and spends no retries; only a
wait longer than ``LIMIT_WAIT_SECONDS`` raises (``LIMIT_WAIT_EXCEEDED``, retryable after the
wait the limiter named). Limits are read from Redis at most once a second, so ``keel limits
gateway`` applies without restarts. With no Redis, or Redis down, calls pass unlimited.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import random
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import structlog
from temporalio import activity
from temporalio.exceptions import ApplicationError

from keel.activities.errors import LIMIT_WAIT_EXCEEDED
from keel.activities.limits import (
    CONFIG_MAX_AGE_SECONDS,
    INFLIGHT_KEY,
    LEASE_TTL_SECONDS,
    RATES_KEY,
    DegradeOpen,
    LeaseSemaphore,
    ModelRates,
    RuntimeConfig,
)
from keel.activities.redis_client import KeelRedis, connect
from keel.activities.types import CHARS_PER_TOKEN, LIMIT_WAIT_SECONDS

__all__ = ["GateLimits", "GateTicket", "GatewayLimits", "estimate_tokens"]

log = structlog.get_logger(__name__)

_POLL_FIRST, _POLL_MAX = 0.02, 0.5
"""Seconds between a waiting call's looks at a full semaphore: doubling from the first."""


@dataclass(frozen=True)
class GateLimits:
    """The limits of one gate (``tool:{name}`` or ``model:{name}``); 0 means none."""

    inflight: int = 0
    rpm: int = 0
    tpm: int = 0


def _count(config: Mapping[str, str], *fields: str) -> int:
    """The first of ``fields`` present in ``config``, as a non-negative count (0: none)."""
    for name in fields:
        if name in config:
            try:
                return max(0, int(float(config[name])))
            except ValueError:
                log.warning("limits.bad_config", field=name, value=config[name][:40])
                return 0
    return 0


def estimate_tokens(body: Mapping[str, Any]) -> int:
    """Tokens a chat request may use at most: its messages' characters plus ``max_tokens``.

    The same conservative estimate the workflow budgets with (``CHARS_PER_TOKEN``).
    """
    chars = sum(len(str(m.get("content") or "")) for m in body.get("messages", ()))
    return chars // CHARS_PER_TOKEN + int(body.get("max_tokens") or 0)


@dataclass
class GateTicket:
    """What one call through a gate was granted; ``settle`` records what it really used."""

    gate: str
    estimated_tokens: int = 0
    waited_seconds: float = 0.0
    used_tokens: int | None = None

    def settle(self, usage: Any) -> None:
        """Record the call's usage (an object with ``prompt_tokens`` and ``completion_tokens``).

        The tokens reserved at the estimate are corrected to these when the block exits.
        """
        if usage is not None:
            prompt = int(getattr(usage, "prompt_tokens", 0) or 0)
            self.used_tokens = prompt + int(getattr(usage, "completion_tokens", 0) or 0)


def _lease_id() -> str:
    """This attempt's lease: derived from the activity's identity, unique per attempt."""
    if activity.in_activity():
        info = activity.info()
        return f"{info.workflow_run_id}:{info.activity_id}:{info.attempt}"
    return uuid.uuid4().hex  # A call outside any activity (a test, a script) has no identity.


async def _sleep_heartbeating(seconds: float) -> None:
    """Sleep, heartbeating at least every second so a long wait never looks like a hang."""
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        await asyncio.sleep(min(left, 1.0))
        if activity.in_activity():
            activity.heartbeat()


class GatewayLimits:
    """The limits of the model and tool gateways: one ``async with`` around each call.

    A call first reserves its place under its model's requests and tokens per minute and
    waits the delay the limiter returns, then waits for an in-flight lease, heartbeating all
    the while; the wait never raises unless it would pass ``max_wait_seconds`` (then
    ``LIMIT_WAIT_EXCEEDED``, retryable after the wait the limiter named). With no Redis, or
    with Redis down, calls pass unlimited.
    """

    def __init__(
        self,
        redis: KeelRedis | None,
        *,
        lease_ttl_seconds: float = LEASE_TTL_SECONDS,
        max_wait_seconds: float = LIMIT_WAIT_SECONDS,
        config_max_age: float = CONFIG_MAX_AGE_SECONDS,
    ) -> None:
        """Bind the limits to a Redis client.

        Args:
            redis: The limit store; None admits every call (a worker without limits).
            lease_ttl_seconds: Life of an unrenewed in-flight lease.
            max_wait_seconds: Longest a call waits for its limits.
            config_max_age: How stale the limits read from Redis may be.
        """
        self.redis = redis
        self._max_wait = max_wait_seconds
        self._degrade = DegradeOpen("gateway")
        if redis is not None:
            self._leases = LeaseSemaphore(redis, lease_ttl_seconds)
            self._rates = ModelRates(redis)
            self._inflight = RuntimeConfig(redis, INFLIGHT_KEY, config_max_age)
            self._rate_config = RuntimeConfig(redis, RATES_KEY, config_max_age)

    @classmethod
    def from_url(cls, url: str) -> GatewayLimits:
        """Limits on their own client, with short timeouts: a slow store must not slow calls."""
        return cls(connect(url, socket_connect_timeout=1, socket_timeout=1))

    async def aclose(self) -> None:
        """Close the Redis client."""
        if self.redis is not None:
            await self.redis.aclose()

    def tool(self, name: str) -> contextlib.AbstractAsyncContextManager[GateTicket]:
        """Wrap one call of tool ``name``: its in-flight limit."""
        return self._call(f"tool:{name}", 0)

    def model(
        self, model: str, body: Mapping[str, Any]
    ) -> contextlib.AbstractAsyncContextManager[GateTicket]:
        """Wrap one chat request ``body`` to ``model``: its in-flight limit, RPM and TPM."""
        return self._call(f"model:{model}", estimate_tokens(body))

    async def limits_for(self, gate: str) -> GateLimits:
        """The limits in force for ``gate`` (``tool:{name}`` or ``model:{name}``).

        Raises:
            RedisError: When the configuration is stale and Redis cannot be read.
        """
        kind, _, name = gate.partition(":")
        inflight = _count(await self._inflight.values(), gate, f"{kind}:*")
        if kind != "model":
            return GateLimits(inflight=inflight)
        rates = await self._rate_config.values()
        return GateLimits(
            inflight=inflight,
            rpm=_count(rates, f"{name}:rpm", "*:rpm"),
            tpm=_count(rates, f"{name}:tpm", "*:tpm"),
        )

    @contextlib.asynccontextmanager
    async def _call(self, gate: str, tokens: int) -> AsyncIterator[GateTicket]:
        ticket = GateTicket(gate, estimated_tokens=tokens)
        if self.redis is None:
            yield ticket
            return
        limits = await self._degrade.run(lambda: self.limits_for(gate), GateLimits())
        started = time.monotonic()
        reserved = False
        if limits.rpm or limits.tpm:
            reserved = await self._wait_rate(gate, limits, tokens, started + self._max_wait)
        lease = await self._wait_lease(gate, limits.inflight, started + self._max_wait)
        ticket.waited_seconds = time.monotonic() - started
        if ticket.waited_seconds >= 0.05:
            log.info("limits.waited", gate=gate, seconds=round(ticket.waited_seconds, 3))
        renewing = asyncio.create_task(self._renew(gate, lease)) if lease else None
        try:
            yield ticket
        finally:
            if renewing is not None:
                renewing.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await renewing
            if lease is not None:
                key = self._lease_key(gate)
                await self._degrade.run(lambda: self._leases.release(key, lease), None)
        if reserved and limits.tpm and ticket.used_tokens is not None:
            correction = ticket.used_tokens - min(tokens, limits.tpm)
            await self._degrade.run(lambda: self._rates.adjust(gate, limits.tpm, correction), None)

    @staticmethod
    def _lease_key(gate: str) -> str:
        return f"keel:gw:{{{gate}}}:inflight"

    async def _wait_rate(self, gate: str, limits: GateLimits, tokens: int, deadline: float) -> bool:
        """Reserve a place under the model's rates and wait for it; False if not reserved."""
        left = max(0.0, deadline - time.monotonic())
        verdict = await self._degrade.run(
            lambda: self._rates.reserve(gate, limits.rpm, limits.tpm, tokens, left), None
        )
        if verdict is None:
            return False
        reserved, wait = verdict
        if not reserved:
            raise ApplicationError(
                f"{gate}: its requests or tokens per minute would hold this call {wait:.1f} s, "
                f"longer than the {self._max_wait:g} s a call waits",
                type=LIMIT_WAIT_EXCEEDED,
                next_retry_delay=timedelta(seconds=min(max(wait, 1.0), 30.0)),
            )
        await _sleep_heartbeating(wait)
        return True

    async def _wait_lease(self, gate: str, limit: int, deadline: float) -> str | None:
        """Wait for an in-flight lease; None when no limit applies (or Redis is down)."""
        lease_id, key, pause = _lease_id(), self._lease_key(gate), _POLL_FIRST
        while limit > 0:
            got = await self._degrade.run(
                functools.partial(self._leases.try_acquire, key, lease_id, limit), None
            )
            if got is None:
                return None
            if got:
                return lease_id
            if time.monotonic() >= deadline:
                raise ApplicationError(
                    f"{gate}: all {limit} in-flight places stayed taken for {self._max_wait:g} s",
                    type=LIMIT_WAIT_EXCEEDED,
                    next_retry_delay=timedelta(seconds=1),
                )
            # Jitter keeps waiters that started together from asking again together.
            left = deadline - time.monotonic()
            await _sleep_heartbeating(min(pause * random.uniform(0.5, 1.0), left))
            pause = min(pause * 2, _POLL_MAX)
            # A limit raised (or removed) while the call waits applies to it at once.
            current = await self._degrade.run(lambda: self.limits_for(gate), GateLimits())
            limit = current.inflight
        return None

    async def _renew(self, gate: str, lease_id: str) -> None:
        """Renew the call's lease every quarter TTL until the call ends."""
        key = self._lease_key(gate)
        while True:
            await asyncio.sleep(self._leases.ttl_ms / 4000)
            kept = await self._degrade.run(lambda: self._leases.renew(key, lease_id), True)
            if not kept:
                log.warning("limits.lease_lost", gate=gate)
                return
