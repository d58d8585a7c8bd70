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

BEATS_PER_TIMEOUT = 2
"""Heartbeats per heartbeat timeout. The SDK sends one at most every 0.8x the timeout, so beating
more often sends no more RPCs, only costs the worker CPU (each beat encodes its details: with
2,000 model calls in flight, beating every third of the timeout was a tenth of the worker's
CPU); at half the timeout a beat is always waiting when the SDK may send again."""
DEFAULT_EVERY_SECONDS = 2.0
"""The interval when the activity has no heartbeat timeout (or the block runs outside one)."""


def beat_interval() -> float:
    """Half the running activity's heartbeat timeout, or ``DEFAULT_EVERY_SECONDS``."""
    timeout = activity.info().heartbeat_timeout if activity.in_activity() else None
    if not timeout:
        return DEFAULT_EVERY_SECONDS
    return timeout.total_seconds() / BEATS_PER_TIMEOUT


@contextlib.asynccontextmanager
async def heartbeating(every: float | None = None) -> AsyncIterator[None]:
    """Heartbeat every ``every`` seconds (default ``beat_interval()``) until the block exits."""
    interval = every if every is not None else beat_interval()

    async def beat() -> None:
        # Sleep first: a call that finishes within one interval (most of them) sends no
        # heartbeat at all, so fast activities cost the server no extra RPC.
        while True:
            await asyncio.sleep(interval)
            activity.heartbeat()

    task = asyncio.create_task(beat())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
