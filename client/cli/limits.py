"""``keel limits``: the API's request limits, shown and changed at run time (no restart)."""

from __future__ import annotations

import os
from typing import Annotated

import typer

from keel.client.cli._common import JsonOpt, emit_json, fail

__all__ = ["limits_app"]

limits_app = typer.Typer(help="Request limits of Keel's HTTP API, per key and per tenant.")


def _limiter_call(set_rates: dict[str, str]) -> dict[str, str]:
    import asyncio

    import redis.asyncio as aioredis
    from redis.exceptions import RedisError

    from keel.client.api.limits import CONFIG_KEY, RateLimiter, parse_rate

    async def call() -> dict[str, str]:
        url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
        redis = aioredis.Redis.from_url(url, socket_timeout=5)
        try:
            for name, text in set_rates.items():
                await redis.hset(CONFIG_KEY, name, str(parse_rate(text)).removesuffix("s"))
            limits = await RateLimiter(redis).limits()
            return {"per_key": str(limits.per_key), "per_tenant": str(limits.per_tenant)}
        finally:
            await redis.aclose()

    try:
        return asyncio.run(call())
    except RedisError as err:
        fail(f"cannot reach Redis ({err}); set REDIS_URL", 1)
    except ValueError as err:
        fail(str(err), 2)


@limits_app.command("show")
def show(as_json: JsonOpt = False) -> None:
    """The limits in force (environment defaults with run-time overrides)."""
    limits = _limiter_call({})
    if as_json:
        emit_json(limits)
    else:
        typer.echo(f"per key: {limits['per_key']}   per tenant: {limits['per_tenant']}")


@limits_app.command("set")
def set_limits(
    per_key: Annotated[str | None, typer.Option(metavar="N/S", help="e.g. 100/10")] = None,
    per_tenant: Annotated[str | None, typer.Option(metavar="N/S", help="e.g. 1000/10")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Change limits now; every API process applies them from its next request."""
    given = {k: v for k, v in {"per_key": per_key, "per_tenant": per_tenant}.items() if v}
    if not given:
        fail("give --per-key or --per-tenant", 2)
    limits = _limiter_call(given)
    if as_json:
        emit_json(limits)
    else:
        typer.echo(f"per key: {limits['per_key']}   per tenant: {limits['per_tenant']}")
