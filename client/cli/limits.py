"""``keel limits``: the API's request limits, shown and changed at run time (no restart)."""

from __future__ import annotations

import os
from typing import Annotated

import typer

from keel.client.cli._common import JsonOpt, emit_json, fail

__all__ = ["limits_app"]

limits_app = typer.Typer(help="Request limits of Keel's HTTP API, per key and per tenant.")


def _limiter_call(
    set_rates: dict[str, str], set_quotas: dict[str, str] | None = None, tenant: str | None = None
) -> dict[str, str]:
    import asyncio

    import redis.asyncio as aioredis
    from redis.exceptions import RedisError

    from keel.client.api.limits import (
        CONFIG_KEY,
        QUOTAS_KEY,
        RateLimiter,
        daily_quotas,
        parse_rate,
    )

    async def call() -> dict[str, str]:
        url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
        redis = aioredis.Redis.from_url(url, socket_timeout=5)
        try:
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
        finally:
            await redis.aclose()

    try:
        return asyncio.run(call())
    except RedisError as err:
        fail(f"cannot reach Redis ({err}); set REDIS_URL", 1)
    except ValueError as err:
        fail(str(err), 2)


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
