"""``keel keys``: create, list and revoke API keys (stored hashed in Redis at ``REDIS_URL``).

``create`` prints the key once; only its hash is kept, so a lost key is revoked and replaced,
never recovered. Imports Redis only when a command runs.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Annotated, Literal, TypeVar

import typer

from keel.client.cli._common import JsonOpt, emit_json, fail

if TYPE_CHECKING:
    from keel.client.api.keys import ApiKeys

__all__ = ["keys_app"]

T = TypeVar("T")

keys_app = typer.Typer(help="API keys for Keel's HTTP API, per tenant and role.")


def _redis_call(main: Callable[[ApiKeys], Awaitable[T]]) -> T:
    """Run ``main`` against the key store at ``REDIS_URL``; errors become one line."""
    import asyncio

    from redis.exceptions import RedisError

    from keel.activities.redis_client import connect
    from keel.client.api.keys import ApiKeys

    async def call() -> T:
        url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
        redis = connect(url, socket_timeout=5)
        try:
            return await main(ApiKeys(redis))
        finally:
            await redis.aclose()

    try:
        return asyncio.run(call())
    except RedisError as err:
        fail(f"cannot reach Redis for the key store ({err}); set REDIS_URL", 1)
    except ValueError as err:
        fail(str(err), 2)


@keys_app.command("create")
def create(
    tenant: Annotated[str, typer.Option(metavar="T", help="Tenant the key acts for.")],
    role: Annotated[
        str, typer.Option(metavar="member|operator", help="operator sees every tenant.")
    ] = "member",
    user: Annotated[
        str | None, typer.Option(metavar="U", help="User jobs are recorded for.")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Create a key and print it once (only its hash is stored)."""
    if role not in ("member", "operator"):
        fail(f"--role {role}: choose member or operator", 2)
    chosen: Literal["member", "operator"] = "operator" if role == "operator" else "member"
    key, principal = _redis_call(lambda keys: keys.create(tenant, chosen, user))
    if as_json:
        emit_json({"key": key, **principal.model_dump(mode="json")})
    else:
        typer.echo(key)
        typer.echo(f"key id {principal.key_id} · tenant {tenant} · {chosen}; shown once", err=True)


@keys_app.command("webhook-secret")
def webhook_secret(
    tenant: Annotated[str, typer.Option(metavar="T", help="Tenant whose webhooks it signs.")],
) -> None:
    """Make (or rotate) a tenant's webhook signing secret and print it once."""
    import base64
    import secrets

    from keel.activities.webhook_hosts import SECRET_KEY_PREFIX

    secret = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()

    async def store(keys: ApiKeys) -> None:
        await keys.redis.set(SECRET_KEY_PREFIX + tenant, secret)

    _redis_call(store)
    typer.echo(secret)


@keys_app.command("list")
def list_keys(
    tenant: Annotated[str | None, typer.Option(metavar="T", help="Only this tenant's.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """List keys (IDs, tenants, roles; never a secret)."""
    found = _redis_call(lambda keys: keys.list(tenant))
    if as_json:
        emit_json([p.model_dump(mode="json") for p in found])
        return
    for p in found:
        state = "revoked" if p.revoked else "active"
        typer.echo(f"{p.key_id}  {p.tenant}  {p.role}  {p.user or '-'}  {state}")


@keys_app.command("revoke")
def revoke(key_id: Annotated[str, typer.Argument(metavar="KEY_ID")]) -> None:
    """Revoke a key by its ID; its next request is refused."""
    if not _redis_call(lambda keys: keys.revoke(key_id)):
        fail(f"no key with ID {key_id}", 1)
    typer.echo(f"revoked {key_id}")
