"""Webhooks: a job's outcome reaches its callback URL signed for its tenant (Standard Webhooks),
with one delivery ID however often it is retried; URLs off the allow-list get nothing."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import secrets
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import redis.asyncio as aioredis
from temporalio.client import Client

from keel.activities.webhook_hosts import SECRET_KEY_PREFIX, WebhookHosts
from keel.activities.webhooks import sign
from keel.client import AgentJobs, InvalidJobRequest, JobRequest
from tests.conftest import unique


def verify(secret: str, headers: dict[str, str], body: bytes) -> bool:
    """The receiver's check, written from the Standard Webhooks spec, not from Keel's code."""
    key = base64.b64decode(secret.split("_", 1)[1])
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    return any(
        hmac.compare_digest(expected, part.split(",", 1)[1])
        for part in headers["webhook-signature"].split()
    )


@contextlib.contextmanager
def receiver(fail_first: int = 0) -> Iterator[tuple[int, list[dict[str, Any]]]]:
    """An HTTP receiver that answers 500 to its first ``fail_first`` deliveries, then 204."""
    got: list[dict[str, Any]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - the http.server hook name
            body = self.rfile.read(int(self.headers["content-length"]))
            got.append({"headers": {k.lower(): v for k, v in self.headers.items()}, "body": body})
            self.send_response(500 if len(got) <= fail_first else 204)
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            """Quiet."""

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_port, got
    finally:
        server.shutdown()
        server.server_close()


def test_allow_list_names_host_and_port_per_tenant() -> None:
    hosts = WebhookHosts({"acme": ["hooks.acme.test:443"], "*": ["ops.test:8443"]})
    assert hosts.allows("acme", "https://hooks.acme.test/x")
    assert not hosts.allows("acme", "https://hooks.acme.test:444/x")
    assert not hosts.allows("globex", "https://hooks.acme.test/x")
    assert hosts.allows("globex", "https://ops.test:8443/hook")
    assert not hosts.allows("acme", "ftp://hooks.acme.test/x")


def test_signature_matches_the_standard() -> None:
    secret = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
    headers = {"webhook-id": "msg_1", "webhook-timestamp": "1700000000"}
    headers["webhook-signature"] = sign(secret, "msg_1", 1700000000, b'{"a":1}')
    assert verify(secret, headers, b'{"a":1}')
    assert not verify(secret, headers, b'{"a":2}')


async def test_a_finished_job_is_delivered_signed_once_per_id_through_retries(
    client: Client, make_worker, redis_client: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    tenant = unique("hooked")
    secret = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
    await redis_client.set(SECRET_KEY_PREFIX + tenant, secret)
    with receiver(fail_first=1) as (port, got):
        allowed = {tenant: [f"127.0.0.1:{port}"]}
        monkeypatch.setenv("KEEL_WEBHOOK_HOSTS", json.dumps(allowed))
        async with make_worker(client, webhook_hosts=allowed) as worker:
            jobs = AgentJobs(client, task_queue=worker.task_queue, tenant=tenant)
            with pytest.raises(InvalidJobRequest) as refused:  # off the list: refused at submit
                await jobs.start(JobRequest(goal="hi", callback_url="http://127.0.0.1:1/x"))
            assert refused.value.field == "callback_url"
            req = JobRequest(
                goal="What is 2 + 5? use calculator", callback_url=f"http://127.0.0.1:{port}/in"
            )
            job_id = await jobs.start(req)
            result = await jobs.result(job_id, timeout=120)
            status = await jobs.status(job_id)
    assert result.outcome == "completed"
    assert len(got) == 2  # a 500, then the retry that succeeded
    assert {d["headers"]["webhook-id"] for d in got} == {f"msg_{job_id}"}
    for delivery in got:
        assert verify(secret, delivery["headers"], delivery["body"])
    event = json.loads(got[-1]["body"])
    assert event["type"] == "job.finished" and event["data"]["job_id"] == job_id
    assert event["data"]["outcome"] == "completed"
    assert "webhook_delivered" in {e.kind for e in status.events}
    history = await client.get_workflow_handle(job_id).fetch_history()
    assert secret not in json.dumps(history.to_json_dict())  # the secret never enters history


async def test_a_url_off_the_workers_list_gets_nothing_and_the_job_still_ends(
    client: Client, make_worker, redis_client: aioredis.Redis
) -> None:
    tenant = unique("hooked")
    await redis_client.set(
        SECRET_KEY_PREFIX + tenant, "whsec_" + base64.b64encode(b"k" * 32).decode()
    )
    with receiver() as (port, got):
        async with make_worker(client, webhook_hosts={tenant: ["127.0.0.1:1"]}) as worker:
            jobs = AgentJobs(client, task_queue=worker.task_queue)  # an operator: no submit check
            req = JobRequest(
                goal="What is 1 + 5? use calculator",
                tenant=tenant,
                callback_url=f"http://127.0.0.1:{port}/in",
            )
            job_id = await jobs.start(req)
            result = await jobs.result(job_id, timeout=120)
            status = await jobs.status(job_id)
    assert result.outcome == "completed" and got == []
    failed = [e for e in status.events if e.kind == "webhook_failed"]
    assert failed and "allow-list" in failed[0].detail
