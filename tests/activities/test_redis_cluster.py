"""Keel's multi-key Redis operations run on a real three-master Redis Cluster (issue 16).

The cluster is three ``redis-server`` processes (the binary the suite already uses) joined by
``redis-cli --cluster create``; the client is redis-py's ``RedisCluster``, which refuses a
command or script whose keys span slots, and the servers refuse a script touching a key of a
slot another node serves. Every operation that uses several keys runs here: the store's
notes and blobs, job slots, usage, the gateways' rates and leases, the caches, the breakers,
and the API's admission (kept in this module so the cluster starts once).

Keel's worker and API build plain ``Redis`` clients from ``REDIS_URL``; a whole job on a
cluster needs that wiring too, which this test does not cover.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from redis.asyncio import RedisCluster
from redis.exceptions import RedisClusterException, ResponseError

from keel.activities.breakers import Breakers
from keel.activities.cache import CacheKind, KeelCache
from keel.activities.limits import LeaseSemaphore, ModelRates
from keel.activities.slots import JobSlots
from keel.activities.store import KeelStore
from keel.activities.usage import UsageLedger
from keel.client.api.keys import ApiKeys
from keel.client.api.limits import Rate, RateLimiter, RateLimits
from tests.conftest import free_port, unique, venv_bin, wait_port


def cluster_node_port() -> int:
    """A free port whose cluster bus port (itself plus 10,000) is a port too, and free."""
    while True:
        port = free_port()
        if port + 10_000 <= 65_535:
            with socket.socket() as bus:
                try:
                    bus.bind(("127.0.0.1", port + 10_000))
                except OSError:
                    continue
            return port


@pytest.fixture(scope="module")
def cluster_port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """Three masters on loopback covering all 16,384 slots; yields one node's port."""
    ports = [cluster_node_port() for _ in range(3)]
    procs = []
    for port in ports:
        data: Path = tmp_path_factory.mktemp(f"cluster-{port}")
        procs.append(
            subprocess.Popen(
                [
                    venv_bin("redis-server"),
                    *("--port", str(port), "--bind", "127.0.0.1", "--dir", str(data)),
                    *("--cluster-enabled", "yes", "--save", "", "--appendonly", "no"),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
    try:
        for port, proc in zip(ports, procs, strict=True):
            wait_port(port, proc, "redis-server")
        subprocess.run(
            [
                venv_bin("redis-cli"),
                "--cluster",
                "create",
                *(f"127.0.0.1:{port}" for port in ports),
                *("--cluster-replicas", "0", "--cluster-yes"),
            ],
            check=True,
            capture_output=True,
            timeout=30,
        )
        yield ports[0]
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=10)


@pytest.fixture
async def cluster(cluster_port: int) -> AsyncIterator[RedisCluster]:
    client = RedisCluster(host="127.0.0.1", port=cluster_port, decode_responses=True)
    # The nodes agree on the slot map a moment after `--cluster create` returns.
    for _ in range(100):
        info = await client.cluster_info()
        if info.get("cluster_state") == "ok":
            break
        await asyncio.sleep(0.05)
    yield client
    await client.aclose()


async def test_the_cluster_refuses_keys_of_two_slots(cluster: RedisCluster) -> None:
    """What every test below would meet if an operation's keys spanned slots."""
    with pytest.raises(RedisClusterException):
        await cluster.mget(["keel:a", "keel:b"])
    with pytest.raises((RedisClusterException, ResponseError)):
        await cluster.eval("return redis.call('GET', KEYS[2])", 2, "keel:a", "keel:b")


async def test_notes_and_blobs(cluster: RedisCluster) -> None:
    store, tenant = KeelStore(cluster), unique("acme")
    assert (await store.write_note_once(tenant, "op-1", "T", "B", "job"))[1]
    assert not (await store.write_note_once(tenant, "op-1", "T2", "B2", "job"))[1]
    await store.write_note_once(tenant, "op-2", "U", "C", "job")
    assert [n["title"] for n in await store.list_notes(tenant)] == ["T", "U"]
    job = f"agent-job-{tenant}:k"
    refs = [await store.put_blob(tenant, f"{job}.t{i}:0:s{i}", f"out {i}") for i in range(3)]
    mine = refs[:1] + [await store.put_blob(tenant, f"{job}.t0:1:s9", "more")]
    assert await store.get_blobs(mine, job_id=f"{job}.t0", tenant=tenant) == ["out 0", "more"]
    assert await store.expire_blobs(tenant, f"{job}.t") == 4
    assert await store.get_blob(refs[2], job_id=f"{job}.t2") is None


async def test_job_slots_queue_and_release(cluster: RedisCluster) -> None:
    tenant = unique("acme")
    await cluster.hset(
        "keel:config:concurrency", mapping={f"per_tenant:{tenant}": 1, f"per_user:{tenant}": 1}
    )
    slots = JobSlots(cluster, config_max_age=0)
    assert (await slots.try_acquire("j1", tenant, "ann", 60, enqueue=True)).granted
    waiting = await slots.try_acquire("j2", tenant, "bob", 60, enqueue=True)
    assert not waiting.granted and waiting.blocked_by == "tenant"
    assert await slots.counts(tenant) == (1, 1)
    await slots.release("j1", tenant, "ann")
    assert (await slots.try_acquire("j2", tenant, "bob", 60, enqueue=True)).granted
    assert not waiting.degraded  # a cross-slot script would have failed open, unchecked


async def test_usage_gateway_limits_caches_and_breakers(cluster: RedisCluster) -> None:
    tenant = unique("acme")
    ledger = UsageLedger(cluster)
    assert await ledger.charge_call(tenant, "call-1", 0.5, 100)
    assert not await ledger.charge_call(tenant, "call-1", 0.5, 100)
    await ledger.admit_job(tenant, "job-1", jobs_per_day=1)
    assert (await ledger.days(tenant, 1))[0].jobs == 1

    gate = f"model:{unique('m')}"
    rates = ModelRates(cluster)
    assert await rates.reserve(gate, 60, 10_000, 500, 5) == (True, 0.0)
    await rates.adjust(gate, 10_000, -200)
    leases = LeaseSemaphore(cluster)
    assert await leases.try_acquire(f"keel:gw:{{{gate}}}:inflight", "lease-1", 1)

    cache = KeelCache(cluster)
    keys = [cache.key(CacheKind.EMBEDDING, tenant, {"text": t}) for t in ("a", "b")]
    assert await cache.put_many(CacheKind.EMBEDDING, {keys[0]: {"v": [1.0]}}) == 1
    assert await cache.get_many(CacheKind.EMBEDDING, keys) == [{"v": [1.0]}, None]
    assert cache.stats.errors == {}

    breakers = Breakers(cluster)
    admission = await breakers.admit(gate)
    await breakers.record(admission, "fail")
    assert not admission.local  # decided by the fleet's breaker in the cluster, not locally


async def test_api_admission(cluster: RedisCluster) -> None:
    keys = ApiKeys(cluster)
    key, principal = await keys.create(unique("acme"))
    limits = RateLimits(per_key=Rate(requests=2, seconds=60))
    limiter = RateLimiter(cluster, limits)
    admissions = [await limiter.check(key) for _ in range(3)]
    assert [a.principal for a in admissions] == [principal] * 3
    assert [a.refused and a.refused[0] for a in admissions] == [None, None, "per_key"]
    assert await keys.revoke(principal.key_id)
    assert (await limiter.check(key)).principal is None
