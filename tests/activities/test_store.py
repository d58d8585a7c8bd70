"""KeelStore against a real redis-server: blobs, idempotency records, exactly-once notes."""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid

import pytest
import redis.asyncio as aioredis
from redis.exceptions import TimeoutError as RedisTimeout
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from keel.activities import errors
from keel.activities.store import KeelStore, _legacy_note_keys, blob_ref, note_keys
from keel.activities.types import ToolResult, ref_belongs_to


@pytest.fixture
def tenant() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def store(redis_client: aioredis.Redis) -> KeelStore:
    return KeelStore(redis_client)


async def test_ping(store: KeelStore) -> None:
    assert await store.ping() is True


async def test_from_url_owns_its_client(redis_url: str, tenant: str) -> None:
    store = KeelStore.from_url(redis_url)
    try:
        ref = await store.put_blob(tenant, "job-1:0:s1", "payload")
        assert await store.get_blob(ref, job_id="job-1") == "payload"
    finally:
        await store.aclose()


async def test_a_redis_that_hangs_fails_the_call_in_time() -> None:
    """A server that accepts connections and never answers, like Redis behind a partition."""
    held: list[asyncio.StreamWriter] = []

    async def silent(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    store = KeelStore.from_url(f"redis://127.0.0.1:{port}/0", timeout_seconds=0.3)
    started = time.monotonic()
    try:
        with pytest.raises(RedisTimeout):  # not asyncio's, which would mean the store hung
            await asyncio.wait_for(store.ping(), 10)
    finally:
        await store.aclose()
        server.close()
    assert time.monotonic() - started < 5  # a few timed-out attempts at most, never a hang


async def test_blob_round_trip_with_ttl(
    store: KeelStore, redis_client: aioredis.Redis, tenant: str
) -> None:
    ref = await store.put_blob(tenant, "job-1:0:s1", "x" * 10_000, ttl_seconds=60)
    assert ref == blob_ref(tenant, "job-1:0:s1") == f"keel:blob:{{{tenant}}}:job-1:0:s1"
    assert await store.get_blob(ref, job_id="job-1", tenant=tenant) == "x" * 10_000
    assert 0 < await redis_client.ttl(ref) <= 60
    assert await store.get_blob(blob_ref(tenant, "job-1:0:missing"), job_id="job-1") is None


async def test_get_blob_refuses_other_keys(store: KeelStore, tenant: str) -> None:
    await store.put_record(tenant, "job-1:0:s1", ToolResult(content="recorded"))
    with pytest.raises(ApplicationError) as refused:
        await store.get_blob(f"keel:idem:{tenant}:job-1:0:s1", job_id="job-1")
    assert refused.value.type == errors.REF_NOT_OWNED and refused.value.non_retryable


# --- a job reads only its own stored outputs (issue 13) ---------------------------------------


@pytest.mark.parametrize(
    ("ref", "job_id", "tenant", "owned"),
    [
        ("keel:blob:acme:agent-job-acme:k1:0:s1", "agent-job-acme:k1", "acme", True),
        ("keel:blob:acme:agent-job-acme:k1:12:step:one", "agent-job-acme:k1", None, True),
        ("keel:blob:acme:agent-job-acme:k2:0:s1", "agent-job-acme:k1", "acme", False),
        ("keel:blob:acme:agent-job-acme:k1:0:s1", "agent-job-acme:k1", "evil", False),
        # An ID that is a prefix of another job's: what follows must be iteration:step.
        ("keel:blob:acme:agent-job-acme:k1:0:s1", "agent-job-acme", "acme", False),
        ("keel:blob:acme:agent-job-acme:k1:0:s1", "agent-job-acme:k", "acme", False),
        ("keel:blob:acme:agent-job-acme:k1", "agent-job-acme:k1", "acme", False),
        ("keel:idem:acme:agent-job-acme:k1:0:s1", "agent-job-acme:k1", "acme", False),
        ("keel:blob::agent-job-acme:k1:0:s1", "agent-job-acme:k1", None, False),
        # Refs carry the tenant as a hash tag since issue 16; the bare form above still reads.
        ("keel:blob:{acme}:agent-job-acme:k1:0:s1", "agent-job-acme:k1", "acme", True),
        ("keel:blob:{acme}:agent-job-acme:k1:0:s1", "agent-job-acme:k1", None, True),
        ("keel:blob:{acme}:agent-job-acme:k1:0:s1", "agent-job-acme:k1", "evil", False),
        ("keel:blob:{acme}:agent-job-acme:k2:0:s1", "agent-job-acme:k1", "acme", False),
        ("keel:blob:{acme}agent-job-acme:k1:0:s1", "agent-job-acme:k1", None, False),
        ("keel:blob:{acme:agent-job-acme:k1:0:s1", "agent-job-acme:k1", None, False),
        ("keel:blob:{}:agent-job-acme:k1:0:s1", "agent-job-acme:k1", None, False),
        ("keel:blob:acme:agent-job-acme:k1:0:s1", "", None, False),
    ],
)
def test_ref_belongs_to(ref: str, job_id: str, tenant: str | None, owned: bool) -> None:
    assert ref_belongs_to(ref, job_id, tenant) is owned


async def test_an_activity_reads_only_its_own_jobs_blobs(store: KeelStore, tenant: str) -> None:
    """Defence in depth behind the workflow's check: the job is the calling workflow."""
    job_a, job_b = f"agent-job-{tenant}:a", f"agent-job-{tenant}:b"
    ref_a = await store.put_blob(tenant, f"{job_a}:0:s1", "A's output")
    ref_b = await store.put_blob(tenant, f"{job_b}:0:s1", "B's output")

    def as_job(job_id: str) -> ActivityEnvironment:
        env = ActivityEnvironment()
        env.info = dataclasses.replace(env.info, workflow_id=job_id)
        return env

    assert await as_job(job_b).run(store.get_blobs, [ref_b]) == ["B's output"]
    with pytest.raises(ApplicationError) as refused:
        await as_job(job_b).run(store.get_blobs, [ref_b, ref_a])
    assert refused.value.type == errors.REF_NOT_OWNED and refused.value.non_retryable
    assert job_b in refused.value.message
    # The tenant, when the caller knows it, is checked too.
    with pytest.raises(ApplicationError):
        await as_job(job_b).run(store.get_blobs, [ref_b], tenant=f"{tenant}-other")
    # Outside any activity, a read must name its job.
    with pytest.raises(ApplicationError):
        await store.get_blobs([ref_a])
    assert await store.get_blobs([ref_a], job_id=job_a) == ["A's output"]


async def test_tenant_must_not_contain_colon(store: KeelStore) -> None:
    with pytest.raises(ValueError, match="invalid tenant"):
        await store.put_blob("a:b", "k", "v")
    with pytest.raises(ValueError, match="invalid tenant"):
        await store.get_record("", "k")


async def test_record_is_set_once(
    store: KeelStore, redis_client: aioredis.Redis, tenant: str
) -> None:
    assert await store.get_record(tenant, "op-1") is None
    first = ToolResult(tool="write_note", content="first", size=5, attempt=2)
    assert await store.put_record(tenant, "op-1", first) is True
    assert (
        await store.put_record(tenant, "op-1", ToolResult(tool="write_note", content="2")) is False
    )
    assert await store.get_record(tenant, "op-1") == first
    ttl = await redis_client.ttl(f"keel:idem:{tenant}:op-1")
    assert 29 * 86400 < ttl <= 30 * 86400


async def test_records_are_tenant_scoped(store: KeelStore, tenant: str) -> None:
    await store.put_record(tenant, "op-1", ToolResult(tool="write_note", content="mine"))
    assert await store.get_record(f"{tenant}-other", "op-1") is None


async def test_write_note_once_is_exactly_once(store: KeelStore, tenant: str) -> None:
    key, created = await store.write_note_once(tenant, "job:1:s1", "Title", "Body", "job")
    assert (key, created) == (note_keys(tenant, "job:1:s1")[0], True)
    again = await store.write_note_once(tenant, "job:1:s1", "Other", "Other body", "job")
    assert again == (key, False)
    notes = await store.list_notes(tenant)
    assert notes == [
        {"key": key, "title": "Title", "body": "Body", "job_id": "job", "op_key": "job:1:s1"}
    ]


async def test_concurrent_writes_with_one_op_key_create_one_note(
    store: KeelStore, tenant: str
) -> None:
    results = await asyncio.gather(
        *(store.write_note_once(tenant, "op", f"T{i}", "B", "job") for i in range(20))
    )
    assert sum(created for _, created in results) == 1
    assert len(await store.list_notes(tenant)) == 1


async def test_list_notes_in_write_order(store: KeelStore, tenant: str) -> None:
    for i in range(3):
        await store.write_note_once(tenant, f"op-{i}", f"T{i}", f"B{i}", "job")
    assert [n["title"] for n in await store.list_notes(tenant)] == ["T0", "T1", "T2"]
    assert await store.list_notes(f"{tenant}-empty") == []


async def test_works_with_a_bytes_client(redis_url: str, tenant: str) -> None:
    client = aioredis.Redis.from_url(redis_url)  # decode_responses=False
    try:
        store = KeelStore(client)
        ref = await store.put_blob(tenant, "job:0:b", "héllo")
        assert await store.get_blob(ref, job_id="job") == "héllo"
        await store.put_record(tenant, "op", ToolResult(tool="t", content="c"))
        assert (await store.get_record(tenant, "op")) == ToolResult(tool="t", content="c")
        await store.write_note_once(tenant, "op", "T", "B", "job")
        assert (await store.list_notes(tenant))[0]["title"] == "T"
    finally:
        await client.aclose()


# --- names from before hash tags (issue 16) are still read on a single server ------------------


async def test_a_note_written_before_the_tags_counts_and_is_listed_first(
    store: KeelStore, redis_client: aioredis.Redis, tenant: str
) -> None:
    old_note, old_list = _legacy_note_keys(tenant, "op-old")
    fields = {"title": "Old", "body": "B", "job_id": "job", "op_key": "op-old"}
    await redis_client.hset(old_note, mapping=fields)
    await redis_client.rpush(old_list, "op-old")
    # A retry of the old write after the upgrade writes nothing, and names the old note.
    assert await store.write_note_once(tenant, "op-old", "Again", "B", "job") == (old_note, False)
    assert (await store.write_note_once(tenant, "op-new", "New", "B", "job"))[1]
    notes = await store.list_notes(tenant)
    assert [(n["key"], n["title"]) for n in notes] == [
        (old_note, "Old"),
        (note_keys(tenant, "op-new")[0], "New"),
    ]


async def test_blobs_written_before_the_tags_are_read_and_expired(
    store: KeelStore, redis_client: aioredis.Redis, tenant: str
) -> None:
    job = f"agent-job-{tenant}:chat.t1"
    old_ref = f"keel:blob:{tenant}:{job}:0:s1"  # as refs in running jobs' state still read
    await redis_client.set(old_ref, "old output")
    new_ref = await store.put_blob(tenant, f"{job}:1:s1", "new output")
    assert await store.get_blobs([old_ref, new_ref], job_id=job, tenant=tenant) == [
        "old output",
        "new output",
    ]
    assert await store.expire_blobs(tenant, f"agent-job-{tenant}:chat.t") == 2
    assert await redis_client.exists(old_ref, new_ref) == 0
