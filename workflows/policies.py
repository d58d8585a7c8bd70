"""Retry policies and timeouts for every kind of activity, declared once.

Deterministic constants, and ``capped``, a pure function of its arguments.

Non-retryable failures are marked where they are raised (``ApplicationError(non_retryable=True)``
from the classification helpers in ``activities.errors``, covered by their tests), not repeated
as ``non_retryable_error_types`` here: a policy is recorded in history with every activity it
schedules, and that list would add about 140 bytes to each call of every job.

Call sites splat these (``**policies.LLM_CALL``) and may narrow
them (a shorter ``schedule_to_close_timeout`` near the wall-clock deadline, fewer attempts for a
tool that has used its retry budget), never widen them.
"""

from __future__ import annotations

import dataclasses
from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.workflow import ActivityConfig

with workflow.unsafe.imports_passed_through():
    from keel.activities.types import LIMIT_WAIT_SECONDS, LLM_REQUEST_TIMEOUT_SECONDS

LLM_ATTEMPT_SLACK = timedelta(seconds=10)
"""Room over the client's request timeout for building the prompt and reading the reply, so the
activity, not Temporal, is the one that gives up on a slow model (and says why)."""

HEARTBEAT_TIMEOUT = timedelta(seconds=10)
"""Tools, retrieval and waits heartbeat every half of this (``activities/_heartbeat.py``); a
worker killed mid-call is noticed in 10 s instead of at the end of the attempt's timeout."""

LLM_HEARTBEAT_TIMEOUT = timedelta(seconds=45)
"""Model calls take seconds to a minute, and the SDK sends a heartbeat at most every 0.8x the
heartbeat timeout: at 10 s a 60 s call cost the Temporal server eight heartbeat RPCs (each a
write of the activity's state), at 30 s three (at 0, 24 and 48 s). At 45 s a call under 72 s
costs two, and a worker killed mid-call is still noticed within a call's time (``keel bench
load`` measures the server's CPU)."""

LIMIT_WAIT = timedelta(seconds=LIMIT_WAIT_SECONDS)
"""Longest a model or tool call waits at its gateway for the fleet's limits (in-flight leases,
requests and tokens per minute) before it starts; added to those attempts' timeouts, so waiting
for a limit never times an attempt out or spends a retry."""

TOOL_ATTEMPTS = 6
"""Most attempts one tool call may use; the job's ``max_retries_per_tool`` lowers it per call."""

LLM_CALL = ActivityConfig(
    # The attempt timeout is the client's own request timeout plus slack, never shorter, plus
    # the longest wait for the model's limits before the request is sent.
    start_to_close_timeout=timedelta(seconds=LLM_REQUEST_TIMEOUT_SECONDS)
    + LLM_ATTEMPT_SLACK
    + LIMIT_WAIT,
    heartbeat_timeout=LLM_HEARTBEAT_TIMEOUT,
    # Ten attempts ride out a provider brown-out of one to two and a half minutes: the worker
    # jitters each wait into the upper half of 1, 2, 4 ... 30 s (activities/_backoff.py), so
    # jobs that failed together do not retry together; Retry-After on 429 is a floor instead.
    schedule_to_close_timeout=timedelta(minutes=5),
    retry_policy=RetryPolicy(
        initial_interval=timedelta(seconds=1),
        backoff_coefficient=2.0,
        maximum_interval=timedelta(seconds=30),
        maximum_attempts=10,
    ),
)

TOOL_CALL = ActivityConfig(
    # One policy for reads and writes alike. Reads (calculator, http_get, search_docs) are safe
    # to repeat; writes (write_note) are made so by their op_key: the gateway replays a recorded
    # result and the store writes a note at most once per key. A gentler policy for writes would
    # only lose the retries that carry them through a short Redis outage. An attempt may first
    # wait for the tool's in-flight limit.
    start_to_close_timeout=timedelta(seconds=30) + LIMIT_WAIT,
    heartbeat_timeout=HEARTBEAT_TIMEOUT,
    schedule_to_close_timeout=timedelta(minutes=3),
    retry_policy=RetryPolicy(
        initial_interval=timedelta(milliseconds=250),
        backoff_coefficient=2.0,
        maximum_interval=timedelta(seconds=10),
        maximum_attempts=TOOL_ATTEMPTS,
    ),
)

RETRIEVAL = ActivityConfig(
    # Indexing a folder the first time can take a few seconds; searches after that are fast.
    start_to_close_timeout=timedelta(seconds=60),
    heartbeat_timeout=HEARTBEAT_TIMEOUT,
    schedule_to_close_timeout=timedelta(minutes=3),
    retry_policy=RetryPolicy(
        initial_interval=timedelta(milliseconds=250),
        maximum_interval=timedelta(seconds=10),
        maximum_attempts=4,
    ),
)

WEBHOOK = ActivityConfig(
    # A receiver that is down for a while still gets the outcome: eight attempts over about
    # four minutes, each with the same webhook-id. The job's own outcome does not wait longer.
    start_to_close_timeout=timedelta(seconds=15),
    schedule_to_close_timeout=timedelta(minutes=5),
    retry_policy=RetryPolicy(
        initial_interval=timedelta(seconds=1),
        backoff_coefficient=2.0,
        maximum_interval=timedelta(seconds=60),
        maximum_attempts=8,
    ),
)

STORE = ActivityConfig(
    # Housekeeping in Redis (a session's outputs, when it ends): a SCAN and deletes, idempotent,
    # so a Redis blip is ridden out with a few quick retries; the keys' own TTL is the backstop.
    start_to_close_timeout=timedelta(seconds=30),
    schedule_to_close_timeout=timedelta(minutes=2),
    retry_policy=RetryPolicy(
        initial_interval=timedelta(milliseconds=500),
        maximum_interval=timedelta(seconds=10),
        maximum_attempts=5,
    ),
)


JOB_SLOT_MAX_WAIT = timedelta(hours=1)
"""Longest a job waits in line for a running-job slot before it fails with
``JobSlotUnavailable``; the job's execution timeout (``client/_starting.py``) allows for it."""

JOB_SLOT = workflow.LocalActivityConfig(
    # Taking or giving back a slot is one Redis script, run as a local activity: a marker in
    # history instead of three events and a round trip through the server's matching, on every
    # job. A Redis outage is answered inside the activity (the slot is granted unchecked), so
    # retries are for a worker lost mid-call; the waiting (JOB_SLOT_WAIT) is a normal activity.
    start_to_close_timeout=timedelta(seconds=5),
    schedule_to_close_timeout=timedelta(minutes=1),
    retry_policy=RetryPolicy(
        initial_interval=timedelta(milliseconds=250),
        maximum_interval=timedelta(seconds=5),
        maximum_attempts=10,
    ),
)

SESSION_SNAPSHOT = workflow.LocalActivityConfig(
    # A session's status written to Redis as it changes (issue 15): one SET, a local activity
    # so it is a marker in history, not three events and a trip through matching. Best effort:
    # a reader that finds no snapshot asks the workflow instead, so a few quick attempts only.
    start_to_close_timeout=timedelta(seconds=2),
    schedule_to_close_timeout=timedelta(seconds=10),
    retry_policy=RetryPolicy(
        initial_interval=timedelta(milliseconds=200),
        maximum_interval=timedelta(seconds=2),
        maximum_attempts=3,
    ),
)

JOB_SLOT_WAIT = ActivityConfig(
    # One attempt waits the whole time, asking twice a second and heartbeating, so waiting in
    # line spends no retries; a worker that dies is noticed by the heartbeat timeout, and the
    # retry keeps the job's place in line (a place is kept 30 s without asking).
    start_to_close_timeout=JOB_SLOT_MAX_WAIT + timedelta(minutes=1),
    # Cancellation reaches an activity with a heartbeat's reply, at most every 80% of this: a
    # short timeout lets a job cancelled in line leave it within seconds.
    heartbeat_timeout=timedelta(seconds=5),
    # A cancelled job waits until its waiter has left the line: a waiter still asking after
    # the job ended could be granted a slot that nobody would give back.
    cancellation_type=workflow.ActivityCancellationType.WAIT_CANCELLATION_COMPLETED,
    schedule_to_close_timeout=JOB_SLOT_MAX_WAIT + timedelta(minutes=5),
    retry_policy=RetryPolicy(
        initial_interval=timedelta(seconds=1),
        maximum_interval=timedelta(seconds=10),
        maximum_attempts=5,
    ),
)


def capped(
    config: ActivityConfig,
    remaining: timedelta,
    attempts: int | None = None,
    *,
    summary: str | None = None,
) -> ActivityConfig:
    """``config`` narrowed, never widened, for one call (with its UI ``summary``).

    Args:
        config: One of the policies above.
        remaining: Wall-clock time the job has left; schedule-to-close is cut to it (it is the
            whole limit for a policy that sets none).
        attempts: A tool's retry budget: at most this many attempts (of the server's default
            policy for a policy that sets none).
        summary: What the Temporal UI calls this step.

    Returns:
        A copy of ``config`` with the narrowed limits.
    """
    narrowed = config.copy()
    if summary is not None:
        narrowed["summary"] = summary
    limit = config.get("schedule_to_close_timeout")
    narrowed["schedule_to_close_timeout"] = remaining if limit is None else min(limit, remaining)
    if attempts is not None:
        policy = config.get("retry_policy") or RetryPolicy()
        if policy.maximum_attempts > 0:  # Zero is Temporal's "unlimited".
            attempts = min(attempts, policy.maximum_attempts)
        narrowed["retry_policy"] = dataclasses.replace(policy, maximum_attempts=attempts)
    return narrowed
