"""``keel keys``: a key is printed once, listed without its secret, and revoked by its ID."""

from __future__ import annotations

import json

import redis
from typer.testing import CliRunner

from keel.workers.cli import app
from tests.conftest import unique


def stored_tenant(redis_url: str, key_id: str) -> tuple[str, bool]:
    """The tenant and revoked flag Redis holds for a key ID (read as the store lays it out)."""
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    digest = r.get(f"keel:apikey:id:{key_id}")
    record = json.loads(r.get(f"keel:apikey:hash:{digest}") or "{}")
    r.close()
    return record["tenant"], record["revoked"]


def test_create_list_revoke(redis_url: str) -> None:
    runner = CliRunner(env={"REDIS_URL": redis_url})
    tenant = unique("acme")
    made = runner.invoke(
        app, ["keys", "create", "--tenant", tenant, "--role", "operator", "--json"]
    )
    assert made.exit_code == 0, made.output
    created = json.loads(made.stdout)
    key, key_id = created["key"], created["key_id"]
    assert key.startswith(f"keel_{key_id}_") and created["role"] == "operator"
    assert stored_tenant(redis_url, key_id) == (tenant, False)

    listed = runner.invoke(app, ["keys", "list", "--tenant", tenant, "--json"])
    assert listed.exit_code == 0 and key not in listed.stdout
    assert [row["key_id"] for row in json.loads(listed.stdout)] == [key_id]

    assert runner.invoke(app, ["keys", "revoke", key_id]).exit_code == 0
    assert stored_tenant(redis_url, key_id) == (tenant, True)
    again = runner.invoke(app, ["keys", "revoke", "nope"])
    assert again.exit_code == 1 and "no key with ID nope" in again.output
    bad = runner.invoke(app, ["keys", "create", "--tenant", "acme corp"])
    assert bad.exit_code == 2 and "tenant" in bad.output
