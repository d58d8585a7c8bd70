"""Every Redis operation that uses several keys uses keys of one Redis Cluster hash slot (issue 16).

Slots are computed by redis-py (``redis.crc.key_slot``) on the names Keel's own code builds:
its key builders for commands sent with explicit keys, and for scripts that build names inside
Lua (the job-slot line walks its waiters' user keys), every key the operation left in a real
redis-server. ``tests/activities/test_redis_cluster.py`` runs the same operations on a real cluster.
"""

from __future__ import annotations

from datetime import date

import pytest
import redis.asyncio as aioredis
from redis.crc import key_slot

from keel.activities.breakers import breaker_key
from keel.activities.cache import CacheKind, KeelCache
from keel.activities.limits import ModelRates
from keel.activities.slots import JobSlots, _prefix, _routing_keys
from keel.activities.store import KeelStore, blob_ref, note_keys
from keel.activities.usage import UsageLedger
from keel.activities.usage import _keys as usage_keys
from keel.client.api.limits import window_keys
from tests.conftest import unique


def slots_of(keys: list[str]) -> set[int]:
    return {key_slot(key.encode()) for key in keys}


async def keys_like(redis: aioredis.Redis, pattern: str) -> list[str]:
    return [key async for key in redis.scan_iter(match=pattern, count=1000)]


def test_key_builders_put_one_operations_keys_in_one_slot() -> None:
    tenant = unique("acme")
    job = f"agent-job-{tenant}:k1"
    cache = KeelCache(None)
    operations: dict[str, list[str]] = {
        # KeelStore.write_note_once's script and list_notes' reads.
        "note script": [*note_keys(tenant, f"{job}:0:s1"), note_keys(tenant, "other")[0]],
        # KeelStore.get_blobs: one MGET over a job's refs (and a session's jobs' refs).
        "blob MGET": [blob_ref(tenant, f"{job}:{i}:s{i}") for i in range(5)]
        + [blob_ref(tenant, f"agent-job-{tenant}:k2:0:s1")],
        # KeelCache.get_many (MGET) and put_many (pipeline) take one tenant's keys of any kind.
        "cache MGET": [
            cache.key(kind, tenant, {"text": text}) for kind in CacheKind for text in ("a", "b")
        ],
        # ModelRates' reserve script: a model's requests and tokens per minute.
        "rates script": ModelRates._keys("model:gpt-x"),
        # UsageLedger's charge and admit scripts: a tenant's day, its calls and its jobs.
        "usage scripts": list(usage_keys(tenant, date(2026, 1, 2))),
        # The API's admission script: the tenant's window and each of its keys' windows.
        "API windows": window_keys(tenant, "a1b2") + window_keys(tenant, "c3d4")[1:],
        # The breaker's admit and record scripts: its state and its trial leases.
        "breaker scripts": [breaker_key("model:gpt-x"), f"{breaker_key('model:gpt-x')}:trials"],
    }
    for name, keys in operations.items():
        assert len(slots_of(keys)) == 1, (name, keys)


async def test_what_the_store_and_the_ledger_write_stays_in_the_tenants_slot(
    redis_client: aioredis.Redis,
) -> None:
    tenant = unique("acme")
    store, ledger = KeelStore(redis_client), UsageLedger(redis_client)
    await store.write_note_once(tenant, "op-1", "T", "B", "job")
    await store.write_note_once(tenant, "op-2", "T", "B", "job")
    await store.put_blob(tenant, f"agent-job-{tenant}:k:0:s1", "x")
    await ledger.charge_call(tenant, "call-1", 0.01, 10)
    await ledger.admit_job(tenant, "job-1")
    written = await keys_like(redis_client, f"keel:*{tenant}*")
    # Records of side-effecting calls keep their single-key, untagged names (one per key).
    tagged = [key for key in written if not key.startswith("keel:idem:")]
    # Two notes and their list, a blob, and the day's totals, calls and jobs.
    assert len(tagged) == 7 and slots_of(tagged) == slots_of([blob_ref(tenant, "x")])


async def test_the_job_slot_script_touches_only_its_routing_keys_slot(
    redis_client: aioredis.Redis,
) -> None:
    tenant = unique("acme")
    await redis_client.hset(
        "keel:config:concurrency", mapping={f"per_tenant:{tenant}": 1, f"per_user:{tenant}": 1}
    )
    try:
        slots = JobSlots(redis_client, config_max_age=0)
        assert (await slots.try_acquire("j1", tenant, "ann", 60, enqueue=True)).granted
        # Two more wait in line, one behind the tenant's limit, one behind its user's.
        assert not (await slots.try_acquire("j2", tenant, "bob", 60, enqueue=True)).granted
        assert not (await slots.try_acquire("j3", tenant, "ann", 60, enqueue=True)).granted
        written = await keys_like(redis_client, f"keel:slots:*{tenant}*")
        # running, ann's, queue, seen, who, ticket: all in the slot the script declares.
        assert len(written) == 6 and any(":user:" in key for key in written), written
        assert slots_of(written) == slots_of(_routing_keys(_prefix(tenant)))
    finally:
        await redis_client.hdel(
            "keel:config:concurrency", f"per_tenant:{tenant}", f"per_user:{tenant}"
        )


@pytest.mark.parametrize("tenant", ["a{b", "a}b", "{a}", "a:b", ""])
def test_a_tenant_that_could_move_its_hash_tag_is_refused(tenant: str) -> None:
    builders = [
        lambda: blob_ref(tenant, "job:0:s1"),
        lambda: note_keys(tenant, "op"),
        lambda: usage_keys(tenant, date(2026, 1, 2)),
        lambda: window_keys(tenant, "a1b2"),
        lambda: _prefix(tenant),
        lambda: KeelCache(None).key(CacheKind.TOOL, tenant, {}),
    ]
    for build in builders:
        with pytest.raises(ValueError):
            build()
