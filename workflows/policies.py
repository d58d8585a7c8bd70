"""Retry policies and timeouts for every kind of activity, declared once.

Deterministic constants only.

Non-retryable failures are marked where they are raised (``ApplicationError(non_retryable=True)``
from the classification helpers in ``activities.errors``, covered by their tests), not repeated
as ``non_retryable_error_types`` here: a policy is recorded in history with every activity it
schedules, and that list would add about 140 bytes to each call of every job.

Call sites splat these (``**policies.LLM_CALL``) and may narrow
them (a shorter ``schedule_to_close_timeout`` near the wall-clock deadline, fewer attempts for a
tool that has used its retry budget), never widen them.
"""

from __future__ import annotations

from datetime import timedelta

from temporalio.common import RetryPolicy
from temporalio.workflow import ActivityConfig

LLM_REQUEST_TIMEOUT_SECONDS = 50.0
"""The openai client's own request timeout; kept inside LLM_CALL's start-to-close timeout so the
activity reports a classified timeout instead of being killed by Temporal mid-request."""

LLM_CALL = ActivityConfig(
    # One attempt may take a slow model 50 s; the timeout must be longer than the client's.
    start_to_close_timeout=timedelta(seconds=60),
    # The activity heartbeats every 2 s; a worker killed mid-call is noticed in 10 s.
    heartbeat_timeout=timedelta(seconds=10),
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

TOOL_READ = ActivityConfig(
    # Read-only tools (calculator, http_get, search_docs) are cheap to repeat.
    start_to_close_timeout=timedelta(seconds=30),
    heartbeat_timeout=timedelta(seconds=10),
    schedule_to_close_timeout=timedelta(minutes=3),
    retry_policy=RetryPolicy(
        initial_interval=timedelta(milliseconds=250),
        backoff_coefficient=2.0,
        maximum_interval=timedelta(seconds=10),
        # The job's max_retries_per_tool budget lowers this per call; this is the ceiling.
        maximum_attempts=6,
    ),
)

TOOL_WRITE = ActivityConfig(
    # Side-effecting tools carry an op_key and are recorded in Redis, so a retry after a
    # timeout replays the recorded result instead of repeating the effect.
    start_to_close_timeout=timedelta(seconds=30),
    heartbeat_timeout=timedelta(seconds=10),
    schedule_to_close_timeout=timedelta(minutes=3),
    retry_policy=RetryPolicy(
        initial_interval=timedelta(milliseconds=250),
        backoff_coefficient=2.0,
        maximum_interval=timedelta(seconds=10),
        maximum_attempts=6,
    ),
)

RETRIEVAL = ActivityConfig(
    # Indexing a folder the first time can take a few seconds; searches after that are fast.
    start_to_close_timeout=timedelta(seconds=60),
    # The activity heartbeats every 2 s; a worker killed mid-call is noticed in 10 s.
    heartbeat_timeout=timedelta(seconds=10),
    schedule_to_close_timeout=timedelta(minutes=3),
    retry_policy=RetryPolicy(
        initial_interval=timedelta(milliseconds=250),
        maximum_interval=timedelta(seconds=10),
        maximum_attempts=4,
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

    Schedule-to-close is cut to the wall-clock time the job has left and, when ``attempts`` is
    given (a tool's retry budget), the retry policy allows at most that many attempts.
    """
    narrowed = config.copy()
    if summary is not None:
        narrowed["summary"] = summary
    limit = config.get("schedule_to_close_timeout") or timedelta(minutes=5)
    narrowed["schedule_to_close_timeout"] = min(limit, remaining)
    if attempts is not None:
        policy = config.get("retry_policy") or RetryPolicy()
        narrowed["retry_policy"] = RetryPolicy(
            initial_interval=policy.initial_interval,
            backoff_coefficient=policy.backoff_coefficient,
            maximum_interval=policy.maximum_interval,
            maximum_attempts=attempts,
        )
    return narrowed
