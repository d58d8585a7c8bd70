"""Heartbeating for activities that can stall (model calls, HTTP tools, indexing).

Not workflow code. A background task heartbeats while the wrapped call runs, so a worker that
dies mid-call (``kill -9``) is noticed after the policy's ``heartbeat_timeout`` instead of the
much longer start-to-close timeout, and the call is retried on another worker.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from temporalio import activity

HEARTBEAT_EVERY_SECONDS = 2.0
"""Well under every policy's heartbeat_timeout (10 s), so one lost heartbeat is harmless."""


@contextlib.asynccontextmanager
async def heartbeating(every: float = HEARTBEAT_EVERY_SECONDS) -> AsyncIterator[None]:
    """Heartbeat every ``every`` seconds until the block exits."""

    async def beat() -> None:
        # Sleep first: a call that finishes within one interval (most of them) sends no
        # heartbeat at all, so fast activities cost the server no extra RPC.
        while True:
            await asyncio.sleep(every)
            activity.heartbeat()

    task = asyncio.create_task(beat())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
