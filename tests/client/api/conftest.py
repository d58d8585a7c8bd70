"""Fixtures for the HTTP API's tests: keys in the real Redis, the app on the real dev server."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
import redis.asyncio as aioredis
from temporalio.client import Client

from keel.client.api import create_app
from keel.client.api.keys import ApiKeys
from tests.conftest import unique


@pytest.fixture
async def keys(redis_client: aioredis.Redis) -> ApiKeys:
    return ApiKeys(redis_client)


@pytest.fixture
async def idle_api(client: Client, keys: ApiKeys) -> AsyncIterator[httpx.AsyncClient]:
    """The app with jobs pinned to a queue no worker polls: they start, wait, and list."""
    app = create_app(client, keys, task_queue=unique("idle"))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://keel.test") as http:
        yield http
