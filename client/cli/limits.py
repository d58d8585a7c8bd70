"""``keel limits``: Keel's limits, shown and changed at run time (no restart).

The HTTP API's request rates and daily quotas (``show``, ``set``), running jobs per tenant and
user (``concurrency``), and the gateways' in-flight calls and model rates (``gateway``).
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

import typer

from keel.client.cli._common import JsonOpt, emit_json, fail

__all__ = ["limits_app"]

limits_app = typer.Typer(
    help="Limits: the HTTP API's request rates and quotas, running jobs per tenant and user, "
    "and the model and tool gateways' in-flight calls and per-minute rates."
)


def _limiter_call(
    set_rates: dict[str, str], set_quotas: dict[str, str] | None = None, tenant: str | None = None
) -> dict[str, str]:
    from keel.client.api.limits import (
        CONFIG_KEY,
        QUOTAS_KEY,
        RateLimiter,
        daily_quotas,
        parse_rate,
    )

    async def work(redis: Any) -> dict[str, Any]:
        for name, text in set_rates.items():
            await redis.hset(CONFIG_KEY, name, str(parse_rate(text)).removesuffix("s"))
        for name, text in (set_quotas or {}).items():
            if float(text) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be 0 (none) or more")
            field = f"{name}:{tenant}" if tenant else name
            await redis.hset(QUOTAS_KEY, field, str(float(text)))
        limits = await RateLimiter(redis).limits()
        quotas = await daily_quotas(redis, tenant or "*")
        return {
            "per_key": str(limits.per_key),
            "per_tenant": str(limits.per_tenant),
            "jobs_per_day": str(quotas.jobs_per_day or "none"),
            "usd_per_day": str(quotas.usd_per_day or "none"),
        }

    return _redis_call(work)


def _show(limits: dict[str, str], as_json: bool) -> None:
    if as_json:
        emit_json(limits)
        return
    typer.echo("   ".join(f"{name.replace('_', ' ')}: {value}" for name, value in limits.items()))


@limits_app.command("show")
def show(
    tenant: Annotated[str | None, typer.Option(metavar="T", help="This tenant's quotas.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """The limits and quotas in force (environment defaults with run-time overrides)."""
    _show(_limiter_call({}, tenant=tenant), as_json)


@limits_app.command("set")
def set_limits(
    per_key: Annotated[str | None, typer.Option(metavar="N/S", help="e.g. 100/10")] = None,
    per_tenant: Annotated[str | None, typer.Option(metavar="N/S", help="e.g. 1000/10")] = None,
    jobs_per_day: Annotated[
        str | None,
        typer.Option(metavar="N", help="Jobs a tenant may submit per UTC day (0: none)."),
    ] = None,
    usd_per_day: Annotated[
        str | None, typer.Option(metavar="USD", help="Dollars a tenant may spend per UTC day.")
    ] = None,
    tenant: Annotated[
        str | None, typer.Option(metavar="T", help="Set the quotas for this tenant only.")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Change limits and quotas now; every API process applies them from its next request."""
    rates = {k: v for k, v in {"per_key": per_key, "per_tenant": per_tenant}.items() if v}
    quotas = {
        k: v for k, v in {"jobs_per_day": jobs_per_day, "usd_per_day": usd_per_day}.items() if v
    }
    if not rates and not quotas:
        fail("give --per-key, --per-tenant, --jobs-per-day or --usd-per-day", 2)
    _show(_limiter_call(rates, quotas, tenant), as_json)


# --- Running jobs per tenant and user, and the gateways' limits (read by workers each second) --


def _redis_call(work: Callable[[Any], Awaitable[dict[str, Any]]]) -> dict[str, Any]:
    """Run ``work(redis)`` against ``REDIS_URL``; Redis and input errors become exit codes."""
    import asyncio

    from redis.exceptions import RedisError

    from keel.activities.redis_client import connect

    async def call() -> dict[str, Any]:
        url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
        redis = connect(url, socket_timeout=5)
        try:
            return await work(redis)
        finally:
            await redis.aclose()

    try:
        return asyncio.run(call())
    except RedisError as err:
        fail(f"cannot reach Redis ({err}); set REDIS_URL", 1)
    except ValueError as err:
        fail(str(err), 2)


def _count(name: str, text: str) -> int:
    """A limit given on the command line: a whole number, 0 meaning none."""
    if not text.strip().isdigit():
        raise ValueError(f"{name} must be a whole number of 0 (none) or more, not {text!r}")
    return int(text)


@limits_app.command("concurrency")
def concurrency(
    per_tenant: Annotated[
        str | None, typer.Option(metavar="N", help="Jobs a tenant may run at once (0: none).")
    ] = None,
    per_user: Annotated[
        str | None, typer.Option(metavar="N", help="Jobs one user may run at once (0: none).")
    ] = None,
    policy: Annotated[
        str | None,
        typer.Option(metavar="wait|refuse", help="Over the limit: queue the job, or answer 429."),
    ] = None,
    tenant: Annotated[
        str | None, typer.Option(metavar="T", help="Show or set this tenant's own limits.")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Show, or set, how many jobs run at once; workers and the API apply it within a second."""
    from keel.activities.slots import CONCURRENCY_KEY, JobSlots

    async def work(redis: Any) -> dict[str, Any]:
        suffix = f":{tenant}" if tenant else ""
        for name, text in (("per_tenant", per_tenant), ("per_user", per_user)):
            if text is not None:
                await redis.hset(CONCURRENCY_KEY, name + suffix, _count(f"--{name}", text))
        if policy is not None:
            if policy not in ("wait", "refuse"):
                raise ValueError(f"--policy is wait or refuse, not {policy!r}")
            await redis.hset(CONCURRENCY_KEY, "policy" + suffix, policy)
        slots = JobSlots(redis, config_max_age=0)
        limits = await slots.limits(tenant or "*")
        shown: dict[str, Any] = {
            "per_tenant": limits.per_tenant or "none",
            "per_user": limits.per_user or "none",
            "policy": limits.policy,
        }
        if tenant:
            shown["running"], shown["queued"] = await slots.counts(tenant)
        return shown

    _show(_redis_call(work), as_json)


def _pairs(option: str, values: list[str] | None) -> dict[str, int]:
    """``NAME=N`` options as a mapping; raises ValueError naming the option."""
    found: dict[str, int] = {}
    for item in values or []:
        name, sep, text = item.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"{option} takes NAME=N, e.g. {option} http_get=4, not {item!r}")
        found[name.strip()] = _count(option, text)
    return found


@limits_app.command("gateway")
def gateway(
    tool: Annotated[
        list[str] | None,
        typer.Option(metavar="NAME=N", help="Calls of a tool in flight at once ('*': any)."),
    ] = None,
    model: Annotated[
        list[str] | None,
        typer.Option(metavar="NAME=N", help="Requests to a model in flight at once ('*': any)."),
    ] = None,
    rpm: Annotated[
        list[str] | None,
        typer.Option(metavar="MODEL=N", help="Requests per minute to a model, fleet-wide."),
    ] = None,
    tpm: Annotated[
        list[str] | None,
        typer.Option(metavar="MODEL=N", help="Tokens per minute to a model, fleet-wide."),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Show, or set, the model and tool gateways' limits (0: none); applied within a second."""
    from keel.activities.limits import INFLIGHT_KEY, RATES_KEY

    async def work(redis: Any) -> dict[str, Any]:
        updates = (
            [(INFLIGHT_KEY, f"tool:{k}", v) for k, v in _pairs("--tool", tool).items()]
            + [(INFLIGHT_KEY, f"model:{k}", v) for k, v in _pairs("--model", model).items()]
            + [(RATES_KEY, f"{k}:rpm", v) for k, v in _pairs("--rpm", rpm).items()]
            + [(RATES_KEY, f"{k}:tpm", v) for k, v in _pairs("--tpm", tpm).items()]
        )
        for key, field, value in updates:
            if value:
                await redis.hset(key, field, value)
            else:
                await redis.hdel(key, field)
        shown: dict[str, Any] = {}
        for key, label in ((INFLIGHT_KEY, "in_flight"), (RATES_KEY, "per_minute")):
            raw = await redis.hgetall(key)
            shown[label] = {
                (k.decode() if isinstance(k, bytes) else k): int(v) for k, v in sorted(raw.items())
            }
        return shown

    limits = _redis_call(work)
    if as_json:
        emit_json(limits)
        return
    for label, values in limits.items():
        text = ", ".join(f"{name}={value}" for name, value in values.items()) or "none"
        typer.echo(f"{label.replace('_', ' ')}: {text}")
