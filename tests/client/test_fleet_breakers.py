"""``keel fleet`` shows the circuit breakers the fleet shares in Redis (issue 16)."""

from __future__ import annotations

import asyncio
import json
import os
import sys

import redis.asyncio as aioredis

from keel.activities.breakers import Breakers, BreakerSettings
from tests.conftest import unique


async def test_keel_fleet_lists_open_breakers(redis_url: str) -> None:
    settings = BreakerSettings(min_calls=2, open_seconds=60)
    fleet = Breakers(aioredis.Redis.from_url(redis_url, decode_responses=True), settings)
    name = unique("tool:http_get:down.example")
    for _ in range(2):
        await fleet.record(await fleet.admit(name), "fail")
    await fleet.aclose()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "keel.workers.cli",
        "fleet",
        "--breakers",
        "--json",
        env={**os.environ, "REDIS_URL": redis_url},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode == 0, err.decode()
    states = json.loads(out)
    assert states[name]["state"] == "open" and states[name]["open_until"] > 0
