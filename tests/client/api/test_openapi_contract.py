"""The OpenAPI document holds: schemathesis calls every endpoint of a real ``keel api`` (real
Temporal, real Redis) with generated requests and a valid key, and every answer must be a
documented status with a body matching its documented schema, and never a 5xx."""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.config import SchemathesisConfig
from temporalio.testing import WorkflowEnvironment

from keel.client.api import create_app
from keel.client.api.keys import Principal, key_records
from tests.conftest import free_port, unique, wait_port

MAX_WAIT_SENT = 0.2
"""Generated ``wait`` values are cut to this (seconds): the contract is the same, and a
hundred requests each holding a connection for up to a minute would not fit the suite."""


@pytest.fixture(scope="module")
def api_server(env: WorkflowEnvironment, redis_url: str) -> Iterator[str]:
    """``keel api`` with jobs pinned to a queue no worker polls, limits far above the load."""
    port = free_port()
    proc_env = os.environ | {
        "TEMPORAL_ADDRESS": env.client.service_client.config.target_host,
        "TEMPORAL_NAMESPACE": env.client.namespace,
        "REDIS_URL": redis_url,
        "KEEL_API_RATE_PER_KEY": "1000000/1",
        "KEEL_API_RATE_PER_TENANT": "1000000/1",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "keel.workers.cli", "api", f"--port={port}",
         f"--task-queue={unique('contract')}"],
        env=proc_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_port(port, proc, "keel api")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def api_key(redis_url: str) -> str:
    """``KEY`` stored as ``ApiKeys.create`` stores a key (its hash, and its ID's record)."""

    async def store() -> None:
        records = key_records(KEY)
        assert records is not None
        principal = Principal(
            key_id=records.key_id,
            tenant=unique("contract"),
            user="fuzz",
            created_at=datetime.now(UTC),
        )
        redis = aioredis.Redis.from_url(redis_url)
        try:
            await redis.set(records.by_hash, principal.model_dump_json())
            await redis.set(records.by_id, records.digest)
        finally:
            await redis.aclose()

    asyncio.run(store())
    return KEY


DOCUMENT = create_app().openapi()
"""The app's OpenAPI document (built without servers); the served one is checked equal."""
# A schema-valid request may still be refused for what a schema cannot say: an unknown tool
# or corpus, a cursor this listing never returned, a callback URL off the tenant's allow-list.
# Those are 400s; so the acceptance check allows 400 besides its defaults. No 5xx, though:
# "not_a_server_error" runs on every answer.
CONFIG = SchemathesisConfig.from_dict(
    {
        "checks": {
            "positive_data_acceptance": {
                "expected-statuses": ["2xx", "400", "401", "404", "409", "429"]
            }
        }
    }
)
schema = schemathesis.openapi.from_dict(DOCUMENT, config=CONFIG)
KEY = f"keel_{secrets.token_hex(6)}_{secrets.token_urlsafe(32)}"
"""The module's API key: made here, since schemathesis applies auth while it collects (before
any fixture runs); ``api_key`` stores it in the test Redis."""


@schema.auth()
class ValidKey:
    """Every generated request carries a valid key, so the fuzzing reaches the routes.

    Given as schemathesis auth rather than as extra headers, so its checks know the key is
    there (a case whose generator dropped the header is not then judged by its absence).
    """

    def get(self, case: Any, ctx: Any) -> str:
        return KEY

    def set(self, case: Any, data: str, ctx: Any) -> None:
        case.headers = {**(case.headers or {}), "Authorization": f"Bearer {data}"}


def test_the_served_document_is_the_one_tested(api_server: str) -> None:
    assert httpx.get(f"{api_server}/openapi.json", timeout=10).json() == DOCUMENT


@schema.parametrize()
@settings(
    max_examples=int(os.environ.get("KEEL_SCHEMATHESIS_EXAMPLES", "50")),
    deadline=None,
    suppress_health_check=list(HealthCheck),
    # The same examples every run, so CI is reproducible; explore with new ones by setting
    # KEEL_SCHEMATHESIS_RANDOM=1 (and more of them with KEEL_SCHEMATHESIS_EXAMPLES).
    derandomize=not os.environ.get("KEEL_SCHEMATHESIS_RANDOM"),
)
def test_every_endpoint_answers_as_documented(case: Any, api_server: str, api_key: str) -> None:
    if isinstance(case.query, dict) and isinstance(case.query.get("wait"), int | float):
        case.query["wait"] = min(case.query["wait"], MAX_WAIT_SENT)
    assert api_key == KEY
    case.call_and_validate(base_url=api_server, timeout=30)


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        # What schemathesis found, kept as plain cases: each was a 500.
        ({"goal": "g", "callback_url": ""}, 422, "callback_url"),
        ({"goal": "g", "callback_url": "http://[not-an-address]/"}, 400, "callback_url"),
        ({"goal": "g", "callback_url": "https://A\u0085x/"}, 422, "callback_url"),
        ({"goal": "g", "callback_url": "https://8:port/"}, 400, "callback_url"),
        ({"goal": "g", "callback_url": "https://host:99999/"}, 400, "callback_url"),
        ({"goal": "g", "tools": ["no such/tool"]}, 422, "tools.0"),
        ({"goal": "g", "corpus": ""}, 422, "corpus"),
        ({"goal": "g", "ask_timeout_seconds": 40 * 86400}, 422, "ask_timeout_seconds"),
        # Accepted though the schema refuses them (read as 1, and as a number).
        ({"goal": "g", "ask_timeout_seconds": True}, 422, "ask_timeout_seconds"),
        ({"goal": "g", "budget": {"max_steps": True}}, 422, "budget.max_steps"),
    ],
)
def test_found_failures_stay_fixed(
    api_server: str, api_key: str, body: dict[str, Any], status: int, field: str
) -> None:
    refused = httpx.post(
        f"{api_server}/v1/jobs", json=body, headers={"Authorization": f"Bearer {api_key}"}
    )
    assert refused.status_code == status, refused.text
    assert refused.json()["error"]["field"] == field


def test_a_blank_answer_and_a_repeated_parameter_are_4xx(api_server: str, api_key: str) -> None:
    auth = {"Authorization": f"Bearer {api_key}"}
    blank = httpx.post(f"{api_server}/v1/jobs/%09/answer", json={"text": "\t"}, headers=auth)
    assert blank.status_code == 422 and blank.json()["error"]["field"] == "text"  # was a 500
    twice = httpx.get(f"{api_server}/v1/jobs?state=failed&state=completed", headers=auth)
    assert twice.status_code == 422 and twice.json()["error"]["field"] == "state"


def test_an_empty_idempotency_key_is_refused_not_ignored(api_server: str, api_key: str) -> None:
    headers = {"Authorization": f"Bearer {api_key}", "Idempotency-Key": ""}
    refused = httpx.post(f"{api_server}/v1/jobs", json={"goal": "g"}, headers=headers)
    assert refused.status_code == 400, refused.text
    assert refused.json()["error"]["field"] == "request_key"


def test_a_tiny_ask_timeout_is_accepted(api_server: str, api_key: str) -> None:
    body = {"goal": "g", "ask_timeout_seconds": 5e-324}
    started = httpx.post(
        f"{api_server}/v1/jobs", json=body, headers={"Authorization": f"Bearer {api_key}"}
    )
    assert started.status_code == 202, started.text
