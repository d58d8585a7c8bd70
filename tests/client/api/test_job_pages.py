"""GET /v1/jobs: the ``since`` filter and cursor pagination, against the real dev server's
visibility store; bad values of every parameter are JSON errors with stable codes."""

from __future__ import annotations

import asyncio
import base64
from datetime import datetime, timedelta, timezone

import httpx

from keel.client.api.keys import ApiKeys
from tests.conftest import unique


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def submit(api: httpx.AsyncClient, key: str, count: int) -> list[str]:
    """Start ``count`` jobs one after another (so their start times are ordered)."""
    ids = []
    for _ in range(count):
        started = await api.post("/v1/jobs", json={"goal": "idle"}, headers=bearer(key))
        assert started.status_code == 202, started.text
        ids.append(started.json()["job_id"])
    return ids


async def listed(api: httpx.AsyncClient, key: str, count: int) -> list[dict[str, object]]:
    """The tenant's listing once visibility shows ``count`` jobs."""
    for _ in range(100):
        rows = (await api.get("/v1/jobs", headers=bearer(key))).json()
        if len(rows) >= count:
            return list(rows)
        await asyncio.sleep(0.1)
    raise AssertionError(f"visibility showed {len(rows)} of {count} jobs")


async def test_pages_walk_every_job_once_newest_first(
    idle_api: httpx.AsyncClient, keys: ApiKeys
) -> None:
    key, _ = await keys.create(unique("paged"))
    ids = await submit(idle_api, key, 5)
    await listed(idle_api, key, 5)
    seen: list[str] = []
    sizes: list[int] = []
    params: dict[str, str | int] = {"limit": 2}
    for _ in range(10):
        page = await idle_api.get("/v1/jobs", headers=bearer(key), params=params)
        assert page.status_code == 200, page.text
        assert isinstance(page.json(), list)  # the body is still a plain list of rows
        seen += [row["job_id"] for row in page.json()]
        sizes.append(len(page.json()))
        cursor = page.headers.get("X-Next-Cursor")
        if cursor is None:
            assert "Link" not in page.headers
            break
        assert page.headers["Link"] == f'</v1/jobs?limit=2&cursor={cursor}>; rel="next"'
        params = {"limit": 2, "cursor": cursor}
    assert seen == ids[::-1]  # each job once, newest first
    assert sizes[:3] == [2, 2, 1] and sum(sizes) == 5


async def test_since_keeps_the_jobs_started_at_or_after_it(
    idle_api: httpx.AsyncClient, keys: ApiKeys
) -> None:
    key, _ = await keys.create(unique("since"))
    ids = await submit(idle_api, key, 4)
    rows = await listed(idle_api, key, 4)
    started = {row["job_id"]: str(row["started_at"]) for row in rows}
    third = datetime.fromisoformat(started[ids[2]])

    async def since(moment: str) -> list[str]:
        page = await idle_api.get("/v1/jobs", headers=bearer(key), params={"since": moment})
        assert page.status_code == 200, page.text
        return [row["job_id"] for row in page.json()]

    assert await since(third.isoformat()) == [ids[3], ids[2]]  # "at" is included
    later = third + timedelta(microseconds=1)
    assert await since(later.isoformat()) == [ids[3]]
    # Another offset names the same instant.
    shifted = third.astimezone(timezone(timedelta(hours=-5)))
    assert await since(shifted.isoformat()) == [ids[3], ids[2]]
    assert await since("2000-01-01T00:00:00Z") == ids[::-1]
    assert await since("0652-09-03T12:32:36.49-18:47") == ids[::-1]  # a year of three digits
    assert await since((datetime.now().astimezone() + timedelta(days=1)).isoformat()) == []


async def test_bad_list_parameters_are_json_errors_never_a_500(
    idle_api: httpx.AsyncClient, keys: ApiKeys
) -> None:
    key, _ = await keys.create(unique("strict"))
    operator, _ = await keys.create(unique("ops"), role="operator")
    forged = "c1." + base64.urlsafe_b64encode(b"\x00not a temporal page token\xff").decode()
    cases: list[tuple[str, dict[str, str], int, str]] = [
        (key, {"cursor": "nonsense"}, 400, "cursor"),
        (key, {"cursor": "c1.***"}, 400, "cursor"),
        (key, {"cursor": "c1."}, 400, "cursor"),
        (key, {"cursor": forged}, 400, "cursor"),
        (key, {"cursor": "c" * 5000}, 422, "cursor"),
        (key, {"since": "yesterday"}, 422, "since"),
        (key, {"since": "2024-13-45T00:00:00Z"}, 422, "since"),
        (key, {"since": "0.5"}, 422, "since"),  # not read as a Unix time
        (key, {"since": "2024-01-01T00:00:00"}, 422, "since"),  # an offset is required
        (key, {"since": "2024-01-01"}, 422, "since"),
        (key, {"since": "0001-01-01T00:00:00+05:00"}, 400, "since"),  # before year 1 in UTC
        (key, {"limit": "0"}, 422, "limit"),
        (key, {"limit": "501"}, 422, "limit"),
        (key, {"limit": "many"}, 422, "limit"),
        (key, {"state": "sleeping"}, 422, "state"),
        (key, {"state": ""}, 422, "state"),
        (operator, {"tenant": "a b' OR 1=1"}, 400, "tenant"),
        (key, {"tenant": "t" * 65}, 422, "tenant"),
    ]
    for who, params, status, field in cases:
        refused = await idle_api.get("/v1/jobs", headers=bearer(who), params=params)
        assert refused.status_code == status, (params, refused.text)
        assert refused.headers["content-type"] == "application/json"
        error = refused.json()["error"]
        assert error["code"] == "invalid_request" and error["field"] == field, (params, error)
