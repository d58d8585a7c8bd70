"""A job's running-job slot: taken before the job starts working, given back when it ends.

Deterministic orchestration: two activities (``acquire_job_slot``, ``release_job_slot`` in
``activities/slots.py``) and the events a caller sees. The slot is taken once per job, in the
first run; continue-as-new carries ``LoopState.job_slot`` and the new run keeps the slot.

Queued time is not work: the wall-clock budget (``max_seconds``) starts when the slot is
granted, so a job never runs out of time in line. The line itself is bounded by
``policies.JOB_SLOT_MAX_WAIT``; a job still waiting then fails with ``JobSlotUnavailable``,
naming the full limit, and the job's execution timeout allows for that wait.

Only a job started with ``AgentLoopInput.job_slot`` asks for a slot (the gateway sets it when a
limit covers the job's tenant or user), so every other job, and every history recorded before
slots existed, runs no slot call at all; only a job that asked for one gives one back. Asking
once and giving back are local activities (a marker each); waiting in line is an activity.
"""

from __future__ import annotations

from collections.abc import Callable

from temporalio import workflow
from temporalio.exceptions import ActivityError

with workflow.unsafe.imports_passed_through():
    from keel.activities import errors
    from keel.activities.slots import JobSlotActivities
    from keel.activities.types import SlotGrant, SlotRelease, SlotRequest
    from keel.workflows import policies
    from keel.workflows._state import JobFailure, raise_if_cancelled
    from keel.workflows.types import JobRequest, LoopState

SLOT_LEASE_SLACK_SECONDS = 600.0
"""Room over the longest a job can work (its wall-clock budget plus every question's wait)
before a slot it never gave back (a terminated workflow) frees itself."""


def slot_lease_seconds(req: JobRequest) -> float:
    """How long a job's slot is held unless given back: longer than the job can run."""
    budget = req.budget
    asking = budget.max_questions * req.ask_timeout_seconds
    return budget.max_seconds + asking + SLOT_LEASE_SLACK_SECONDS


class JobSlot:
    """The slot of one job."""

    def __init__(
        self,
        req: JobRequest,
        state: LoopState,
        event: Callable[[str, str], None],
        *,
        wanted: bool = False,
    ) -> None:
        """Bind to the job.

        Args:
            req: The job's request (tenant, user and budgets).
            state: The loop state; ``job_slot`` records that the job asked for a slot.
            event: Adds one of the job's events (``queued``, ``slot_granted``).
            wanted: The job was started to take a slot (``AgentLoopInput.job_slot``).
        """
        self._req, self._s, self._event = req, state, event
        self._wanted = wanted

    async def acquire(self) -> None:
        """Take the job's slot, waiting in line when its tenant's or user's limit is full.

        Raises:
            JobFailure: ``JobSlotUnavailable`` when no slot freed within JOB_SLOT_MAX_WAIT.
            asyncio.CancelledError: The job was cancelled while it waited.
        """
        if not self._wanted:
            return
        # Set before asking, so a job cancelled or failed while in line leaves the line too.
        self._s.job_slot = True
        inp = SlotRequest(
            tenant=self._req.tenant,
            user=self._req.user,
            lease_seconds=slot_lease_seconds(self._req),
        )
        grant = await self._ask(inp, None, "job slot")
        if grant.granted:
            return
        self._event("queued", f"{_full(grant)}; {grant.ahead} ahead in line")
        queued_at = workflow.now()
        waiting = inp.model_copy(update={"wait_until": queued_at + policies.JOB_SLOT_MAX_WAIT})
        grant = await self._ask(waiting, policies.JOB_SLOT_WAIT, "queued for a job slot")
        if not grant.granted:
            raise JobFailure(
                errors.JOB_SLOT_UNAVAILABLE,
                f"no running-job slot freed within {policies.JOB_SLOT_MAX_WAIT}: {_full(grant)}",
            )
        waited = (workflow.now() - queued_at).total_seconds()
        self._event("slot_granted", f"after {waited:.0f} s in line")

    async def release(self) -> None:
        """Give the slot back (or leave the line); a failure here never fails the job."""
        if not self._s.job_slot:
            return
        self._s.job_slot = False
        inp = SlotRelease(tenant=self._req.tenant, user=self._req.user)
        local = policies.JOB_SLOT.copy()
        local["summary"] = "release job slot"
        try:
            await workflow.execute_local_activity_method(
                JobSlotActivities.release_job_slot, inp, **local
            )
        except ActivityError as err:
            # The lease expires on its own (slot_lease_seconds); the job's outcome stands.
            self._event("slot_release_failed", str(err.cause)[:200])

    async def _ask(
        self, inp: SlotRequest, waiting: workflow.ActivityConfig | None, summary: str
    ) -> SlotGrant:
        """Ask once (a local activity), or, with ``waiting``, wait in line (an activity)."""
        try:
            if waiting is None:
                local = policies.JOB_SLOT.copy()
                local["summary"] = summary
                return await workflow.execute_local_activity_method(
                    JobSlotActivities.acquire_job_slot, inp, **local
                )
            config = waiting.copy()
            config["summary"] = summary
            return await workflow.execute_activity_method(
                JobSlotActivities.acquire_job_slot, inp, **config
            )
        except ActivityError as err:
            raise_if_cancelled(err)
            raise JobFailure(
                errors.JOB_SLOT_UNAVAILABLE, f"could not take a job slot: {err.cause}"
            ) from None


def _full(grant: SlotGrant) -> str:
    """Which limit is full, for an event or an error: ``the tenant's limit of 2 running jobs``."""
    who = "tenant's" if grant.blocked_by == "tenant" else "user's"
    return f"the {who} limit of {grant.limit} running jobs is reached"
