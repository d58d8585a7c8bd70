"""Keel's multi-key Redis operations run on a real three-master Redis Cluster (issue 16).

The cluster is three ``redis-server`` processes (the binary the suite already uses) joined by
``redis-cli --cluster create``; the client is redis-py's ``RedisCluster``, which refuses a
command or script whose keys span slots, and the servers refuse a script touching a key of a
slot another node serves. Every operation that uses several keys runs here: the store's
notes and blobs, job slots, usage, the gateways' rates and leases, the caches, the breakers,
and the API's admission (kept in this module so the cluster starts once).

Then Keel itself on the cluster, named by ``REDIS_URL=redis+cluster://...``
(``activities/redis_client.py``): scans that must visit every primary (the fleet's breakers,
the API's keys), answer tokens over streams, a whole job on a worker with its caches on, and
a job submitted through the API.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
import redis.asyncio as aioredis
from redis.asyncio import RedisCluster
from redis.crc import key_slot
from redis.exceptions import RedisClusterException, ResponseError
from temporalio.api.common.v1 import Payload
from temporalio.client import Client
from temporalio.converter import (
    StorageDriverRetrieveContext,
    StorageDriverStoreContext,
    StorageDriverWorkflowInfo,
)

from keel.activities.answer_tokens import TokenDelta, tokens_key
from keel.activities.breakers import Breakers, BreakerSettings, breaker_key
from keel.activities.cache import CacheKind, CacheSettings, KeelCache
from keel.activities.limits import LeaseSemaphore, ModelRates
from keel.activities.payload_store import PayloadStoreSettings, RedisPayloadDriver
from keel.activities.redis_client import connect
from keel.activities.slots import JobSlots
from keel.activities.store import KeelStore, notes_list_key
from keel.activities.usage import UsageLedger
from keel.client import AgentJobs, JobRequest, JobResult
from keel.client.api import create_app
from keel.client.api.keys import _BY_ID, ApiKeys
from keel.client.api.limits import Rate, RateLimiter, RateLimits
from tests.conftest import WorkerFactory, free_port, unique, venv_bin, wait_port


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
def cluster_ports(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[int]]:
    """Three masters on loopback covering all 16,384 slots; yields their ports."""
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
        yield ports
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=10)


@pytest.fixture
def cluster_url(cluster_ports: list[int]) -> str:
    """The ``REDIS_URL`` of the cluster: two of its three nodes (the client finds the third)."""
    return f"redis+cluster://127.0.0.1:{cluster_ports[0]},127.0.0.1:{cluster_ports[1]}"


@pytest.fixture
async def cluster(cluster_ports: list[int]) -> AsyncIterator[RedisCluster]:
    client = RedisCluster(host="127.0.0.1", port=cluster_ports[0], decode_responses=True)
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


# --- Keel on the cluster, from REDIS_URL -------------------------------------------------------


def primary_of(cluster: RedisCluster, key: str) -> str:
    """The name (``host:port``) of the primary that serves ``key``'s slot."""
    node = cluster.get_node_from_key(key)
    assert node is not None
    return str(node.name)


async def test_breaker_states_list_the_breakers_of_every_primary(
    cluster_url: str, cluster: RedisCluster
) -> None:
    # One breaker per primary: names are drawn until their keys' slots cover all three.
    names: dict[str, str] = {}
    while len(names) < 3:
        name = f"model:{unique('m')}"
        names.setdefault(primary_of(cluster, breaker_key(name)), name)
    assert set(names) == {node.name for node in cluster.get_primaries()}
    breakers = Breakers.from_url(cluster_url, BreakerSettings(min_calls=1))
    try:
        assert isinstance(breakers.redis, RedisCluster)
        for name in names.values():
            await breakers.record(await breakers.admit(name), "fail")
        states = await breakers.states()
    finally:
        await breakers.aclose()
    assert {name: states[name]["state"] for name in names.values()} == dict.fromkeys(
        names.values(), "open"
    )


async def test_api_keys_are_listed_from_every_primary(
    cluster_url: str, cluster: RedisCluster
) -> None:
    redis = connect(cluster_url, decode_responses=True, socket_timeout=5)
    keys, tenant = ApiKeys(redis), unique("acme")
    made: dict[str, str] = {}  # key ID -> the primary holding its record
    try:
        while set(made.values()) != {node.name for node in cluster.get_primaries()}:
            _, principal = await keys.create(tenant)
            made[principal.key_id] = primary_of(cluster, _BY_ID + principal.key_id)
        listed = await keys.list(tenant)
    finally:
        await redis.aclose()
    assert sorted(p.key_id for p in listed) == sorted(made)


async def test_a_job_runs_on_a_worker_whose_redis_url_is_the_cluster(
    client: Client,
    make_worker: WorkerFactory,
    cluster_url: str,
    cluster: RedisCluster,
    redis_client: aioredis.Redis,
) -> None:
    tenant = unique("acme")
    req = JobRequest(
        goal="What is 2 * (3 + 4)? Use the calculator and write_note.",
        tenant=tenant,
        tools=["calculator", "write_note"],
    )
    # The reader follows the job as `keel watch` does, with answer tokens from the cluster.
    tokens = connect(cluster_url, socket_timeout=5)
    try:
        async with make_worker(
            client, redis_url=cluster_url, cache=CacheSettings(enabled=True)
        ) as worker:
            jobs = AgentJobs(client, task_queue=worker.task_queue)
            job_id = await jobs.start(req, request_key=unique("job"))
            events = [event async for event in await jobs.events(job_id, tokens=tokens)]
            # The same job again: its model and calculator calls are answered by the caches.
            again = await jobs.result(await jobs.start(req, request_key=unique("job")), timeout=120)
    finally:
        await tokens.aclose()

    first = events[-1].data
    assert isinstance(first, JobResult) and first.outcome == "completed" and first.verified
    assert "14" in (first.answer or "") and first.usage.tool_calls == 2
    drafted = [e.data for e in events if isinstance(e.data, TokenDelta)]
    assert drafted, "no answer tokens came through the cluster's stream"
    last_draft = (first.iterations - 1, drafted[-1].attempt)
    text = "".join(t.text for t in drafted if (t.iteration, t.attempt) == last_draft)
    assert text == first.answer
    assert await cluster.exists(tokens_key(job_id))
    assert again.outcome == "completed" and again.usage.cache_hits.get("response", 0) > 0
    assert again.usage.cache_hits.get("tool", 0) == 1  # the calculator; write_note is a write

    # What the jobs left is on the cluster: both notes, the caches' entries, the usage.
    assert len(await cluster.lrange(notes_list_key(tenant), 0, -1)) == 2
    cached = [key async for key in cluster.scan_iter(match=f"keel:cache:*{{{tenant}}}*")]
    assert {key.split(":")[2] for key in cached} == {"response", "tool"}
    day = (await UsageLedger(cluster).days(tenant, 1))[0]
    assert day.calls > 0 and day.tokens >= first.usage.tokens > 0 and day.cost_usd > 0
    # ...and nothing on the suite's single redis-server.
    assert not [key async for key in redis_client.scan_iter(match=f"*{tenant}*")]


async def test_the_api_submits_a_job_with_a_cluster_redis_url(
    client: Client,
    make_worker: WorkerFactory,
    cluster_url: str,
    cluster: RedisCluster,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tenant = unique("acme")
    key, _ = await ApiKeys(cluster).create(tenant)
    monkeypatch.setenv("REDIS_URL", cluster_url)
    body = {"goal": "What is 6 * 7? use calculator", "tools": ["calculator"]}
    async with make_worker(client, redis_url=cluster_url) as worker:
        # No keys given: the app builds its Redis client from REDIS_URL when it starts.
        app = create_app(client, task_queue=worker.task_queue)
        async with app.router.lifespan_context(app):
            assert isinstance(app.state.keys.redis, RedisCluster)
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://keel.test") as http:
                done = await http.post(
                    "/v1/jobs",
                    json=body,
                    headers={"Authorization": f"Bearer {key}"},
                    params={"wait": 60},
                )
    assert done.status_code == 200, done.text
    assert done.json()["job_id"].startswith(f"agent-job-{tenant}:")
    assert done.json()["result"]["outcome"] == "completed"
    # Admission counted the job in the tenant's day, on the cluster.
    assert (await UsageLedger(cluster).days(tenant, 1))[0].jobs == 1


async def test_stored_payloads_of_two_tenants_are_read_back_in_one_call(cluster_url: str) -> None:
    # One retrieve may name keys of two slots (a history's references are not checked to
    # share a tenant); a plain MGET would fail on the cluster.
    driver = RedisPayloadDriver(PayloadStoreSettings(url=cluster_url))
    payloads = [Payload(data=f"payload {i}".encode()) for i in range(2)]
    try:
        claims = []
        for tenant, payload in zip(("acme", "globex"), payloads, strict=True):
            target = StorageDriverWorkflowInfo(namespace="default", id=f"agent-job-{tenant}:k")
            claims += await driver.store(StorageDriverStoreContext(target=target), [payload])
        keys = [str(claim.claim_data["key"]) for claim in claims]
        assert len({key_slot(key.encode()) for key in keys}) == 2
        assert await driver.retrieve(StorageDriverRetrieveContext(), claims) == payloads
    finally:
        await driver.aclose()
