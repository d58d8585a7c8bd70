"""The baseline ``keel bench`` compares Keel against: a workflow of no-op activities.

Its own module, importing nothing but the SDK: the workflow sandbox (which the baseline's
"SDK defaults" worker uses) re-imports the module of every workflow it runs, so the baseline
must not pay for importing the benchmark's machinery or its command-line parser.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

from temporalio import activity, workflow

BARE_ACTIVITY_TIMEOUT = timedelta(seconds=30)
"""Start-to-close timeout of the baseline's activities (Temporal requires one)."""
BARE_FANOUT = 4
"""Parallel calls in the baseline's act phase, as in Keel's ``[sim: fanout=4]`` job."""


@activity.defn(name="bench__noop")
async def bare_noop(label: str) -> str:
    """Return the label unchanged: an activity whose cost is Temporal's alone."""
    return label


@workflow.defn(name="BenchBareWorkflow")
class BareWorkflow:
    """Seven no-op activities in the shape of Keel's benchmark job, with tiny payloads.

    One plan-like call, four in parallel, then two in sequence (answer and verify): the same
    activity count and ordering as Keel's plan, four calculator calls, answer and verify.
    """

    @workflow.run
    async def run(self, tag: str) -> str:
        """Run the seven calls and return the last result."""
        await self._call(f"plan:{tag}")
        await asyncio.gather(*(self._call(f"step{i}:{tag}") for i in range(BARE_FANOUT)))
        await self._call(f"answer:{tag}")
        return await self._call(f"verify:{tag}")

    async def _call(self, label: str) -> str:
        return await workflow.execute_activity(
            bare_noop, label, start_to_close_timeout=BARE_ACTIVITY_TIMEOUT
        )
