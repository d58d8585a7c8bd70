"""``keel codec-server``: Temporal's remote codec protocol over real HTTP, used by the real CLI."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest
from google.protobuf import json_format
from temporalio.api.common.v1 import Payload, Payloads
from temporalio.testing import WorkflowEnvironment

from keel.activities.converter import compress_payload
from keel.client import AgentJobs, JobRequest
from tests.conftest import keel_server, temporal, unique

UI = "http://127.0.0.1:8233"
GOAL = "What is 6 * 7? use calculator"


@pytest.fixture(scope="module")
def codec_url() -> Iterator[str]:
    with keel_server("keel codec-server", "codec-server") as url:
        yield url


def as_json(*payloads: Payload) -> str:
    return json_format.MessageToJson(Payloads(payloads=payloads))


def read(body: str) -> list[Payload]:
    return list(json_format.Parse(body, Payloads()).payloads)


PLAIN = Payload(
    metadata={"encoding": b"json/plain"},
    data=json.dumps({"tenant": "acme", "goal": GOAL, "iteration": 0}).encode(),
)


def test_decode_restores_json_and_passes_the_rest_through(codec_url: str) -> None:
    compressed = compress_payload(PLAIN)
    summary = Payload(metadata={"encoding": b"json/plain"}, data=b'"plan \xc2\xb7 iteration 1"')
    resp = httpx.post(f"{codec_url}/decode", content=as_json(compressed, summary))
    assert resp.status_code == 200
    assert read(resp.text) == [PLAIN, summary]


def test_encode_compresses_like_the_workers(codec_url: str) -> None:
    resp = httpx.post(f"{codec_url}/encode", content=as_json(PLAIN))
    assert read(resp.text) == [compress_payload(PLAIN)]


def test_bad_input_is_a_400_that_says_why(codec_url: str) -> None:
    resp = httpx.post(f"{codec_url}/decode", content=b"{not json")
    assert resp.status_code == 400 and "Payloads" in resp.json()["error"]
    corrupt = Payload(metadata={"encoding": b"binary/keel-z1"}, data=b"garbage")
    resp = httpx.post(f"{codec_url}/decode", content=as_json(corrupt))
    assert resp.status_code == 400 and "decompress" in resp.json()["error"]


def test_only_the_ui_origin_may_call_it_from_a_browser(codec_url: str) -> None:
    headers = {
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type,x-namespace",
    }
    allowed = httpx.options(f"{codec_url}/decode", headers=headers | {"Origin": UI})
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == UI
    denied = httpx.options(
        f"{codec_url}/decode", headers=headers | {"Origin": "http://evil.example"}
    )
    assert "access-control-allow-origin" not in denied.headers


async def test_the_temporal_cli_shows_payloads_as_json_through_it(
    env: WorkflowEnvironment, make_worker, codec_url: str
) -> None:
    async with make_worker(env.client) as worker:
        jobs = AgentJobs(env.client, task_queue=worker.task_queue)
        job_id = await jobs.start(JobRequest(goal=GOAL, tenant=unique("acme")))
        await jobs.result(job_id, timeout=60)

    def first_input(**extra_env: str) -> Payload:
        events = temporal(env, "workflow", "show", "--workflow-id", job_id, **extra_env)
        started = events["events"][0]["workflowExecutionStartedEventAttributes"]
        return json_format.ParseDict(started["input"]["payloads"][0], Payload())

    raw = first_input()
    assert raw.metadata["encoding"] == b"binary/keel-z1"
    decoded = first_input(TEMPORAL_CODEC_ENDPOINT=codec_url)
    assert decoded.metadata["encoding"] == b"json/plain"
    assert json.loads(decoded.data)["request"]["goal"] == GOAL
