"""/healthz, /readyz and /metrics on the real app: readiness names the dependency that is down,
and the metrics count what the API answered, by route template and status."""

from __future__ import annotations

import httpx
import pytest
import redis.asyncio as aioredis
from prometheus_client.parser import text_string_to_metric_families
from temporalio.client import Client

from keel.activities.converter import DATA_CONVERTER
from keel.client.api import create_app
from keel.client.api.keys import ApiKeys
from tests.conftest import free_port, unique


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition, by name and sorted labels."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def asgi(app: object) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://keel.test")  # type: ignore[arg-type]


async def test_ready_when_temporal_and_redis_answer(client: Client, keys: ApiKeys) -> None:
    async with asgi(create_app(client, keys)) as api:
        assert (await api.get("/healthz")).json() == {"ok": True}
        ready = await api.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"ok": True, "temporal": True, "redis": True}


async def test_not_ready_names_what_is_down(client: Client, keys: ApiKeys) -> None:
    dead_redis = aioredis.Redis.from_url(f"redis://127.0.0.1:{free_port()}/0")
    dead_temporal = await Client.connect(
        f"127.0.0.1:{free_port()}", data_converter=DATA_CONVERTER, lazy=True
    )
    try:
        cases = [
            (create_app(client, ApiKeys(dead_redis)), ["redis"]),
            (create_app(dead_temporal, keys), ["temporal"]),
            (create_app(dead_temporal, ApiKeys(dead_redis)), ["temporal", "redis"]),
        ]
        for app, down in cases:
            async with asgi(app) as api:
                ready = await api.get("/readyz")
                assert (await api.get("/healthz")).status_code == 200  # alive all the same
            assert ready.status_code == 503, ready.text
            assert ready.json()["error"]["code"] == "not_ready"
            assert ready.json()["error"]["unavailable"] == down
        # With Redis down, an authenticated route is a 503 naming it, never a 500.
        async with asgi(create_app(client, ApiKeys(dead_redis))) as api:
            refused = await api.get("/v1/jobs", headers=bearer("keel_0123456789ab_" + "x" * 43))
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "redis_unavailable"
    finally:
        await dead_redis.aclose()


async def test_metrics_count_requests_by_route_status_and_refusals(
    client: Client, keys: ApiKeys, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KEEL_API_RATE_PER_KEY", "3/60")
    key, _ = await keys.create(unique("metered"))
    foreign = "/v1/jobs/agent-job-someone-else:x"
    async with asgi(create_app(client, keys)) as api:
        statuses = [(await api.get(foreign, headers=bearer(key))).status_code for _ in range(5)]
        assert (await api.get("/v1/jobs")).status_code == 401
        assert (await api.get("/nowhere")).status_code == 404
        assert (await api.post("/v1/jobs", content=b"x" * 70_000)).status_code == 413
        exposition = await api.get("/metrics")
    assert statuses == [404, 404, 404, 429, 429]
    assert exposition.status_code == 200
    assert exposition.headers["content-type"].startswith("text/plain; version=0.0.4")
    found = samples(exposition.text)

    def requests(method: str, route: str, status: str) -> float:
        labels = (("method", method), ("route", route), ("status", status))
        return found.get(("keel_api_requests_total", labels), 0.0)

    assert requests("GET", "/v1/jobs/{job_id}", "404") == 3  # by template, not by path
    assert requests("GET", "/v1/jobs/{job_id}", "429") == 2
    assert requests("GET", "/v1/jobs", "401") == 1
    assert requests("GET", "unmatched", "404") == 1
    assert requests("POST", "unmatched", "413") == 1  # refused before routing
    assert found[("keel_api_rate_limited_total", (("limit", "per_key"),))] == 2
    count = found[
        (
            "keel_api_request_duration_seconds_count",
            (("method", "GET"), ("route", "/v1/jobs/{job_id}")),
        )
    ]
    assert count == 5
    within_60s = found[
        (
            "keel_api_request_duration_seconds_bucket",
            (("le", "60.0"), ("method", "GET"), ("route", "/v1/jobs/{job_id}")),
        )
    ]
    assert within_60s == 5


def test_the_status_query_bound_is_configuration_checked_at_start(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from keel.client.api.app import STATUS_QUERIES, status_queries

    assert status_queries() == STATUS_QUERIES
    monkeypatch.setenv("KEEL_API_STATUS_QUERIES", "4")
    assert status_queries() == 4
    for bad in ("0", "-1", "many", "100001"):
        monkeypatch.setenv("KEEL_API_STATUS_QUERIES", bad)
        with pytest.raises(ValueError):
            create_app()
