"""Running-job limits at the API: under the ``refuse`` policy, a job over them is a 429.

The slots themselves are ``keel.activities.slots``: a tenant's and each user's running jobs,
configured at run time (``keel limits concurrency``). Under the default ``wait`` policy the API
accepts every job and a job over the limits waits in line in its workflow. Under ``refuse``,
``check_concurrency`` reserves the job's slot as the API accepts it, atomically, so concurrent
submits are admitted exactly up to the limit, and refuses the rest with ``ConcurrencyLimited``
(429 ``concurrency_limited``, naming the limit, with Retry-After). The job's workflow then takes
the reserved slot for its whole life. If Redis cannot be reached, jobs are accepted.
"""

from __future__ import annotations

from keel.activities.redis_client import KeelRedis
from keel.activities.slots import slots_for
from keel.workflows.types import JobRequest

__all__ = ["RETRY_AFTER_SECONDS", "ConcurrencyLimited", "check_concurrency"]

RETRY_AFTER_SECONDS = 5
"""What a refused caller is told to wait: when a running job ends is not known in advance."""


class ConcurrencyLimited(Exception):
    """The tenant's or the user's running jobs are at their limit.

    Attributes:
        limit: ``per_tenant`` or ``per_user``.
        count: The running jobs that limit allows.
    """

    def __init__(self, limit: str, count: int) -> None:
        super().__init__(limit, count)
        self.limit, self.count = limit, count
        self.message = f"the {limit} limit of {count} running jobs is reached"


async def check_concurrency(redis: KeelRedis, request: JobRequest, job_id: str) -> bool:
    """Whether the job must hold a running slot; under ``refuse``, reserve it or refuse.

    A retried submit of a running job finds its slot already held and passes.

    Args:
        redis: The API's Redis client.
        request: The validated job (its tenant and user).
        job_id: The job's ID, which names its slot.

    Returns:
        True when a limit covers the job's tenant or user: its workflow then takes a slot
        (``AgentLoopInput.job_slot``). False when none does, so the job makes no slot calls.

    Raises:
        ConcurrencyLimited: The tenant's or user's limit is reached and the policy refuses.
    """
    slots = slots_for(redis)
    if not (await slots.limits(request.tenant)).limited:
        return False
    verdict = await slots.reserve_for_submit(job_id, request.tenant, request.user)
    if verdict is not None and not verdict.granted:
        raise ConcurrencyLimited(f"per_{verdict.blocked_by}", verdict.limit)
    return True
