"""The answer-token side channel: a Redis stream per job that carries a draft as it is written.

Not workflow code. ``draft_answer`` streams the model's reply and publishes the new text of the
answer here as ``TokenDelta`` entries of the stream ``keel:tokens:{job_id}``; the HTTP API reads
them back (``read_tokens``) to show an answer while it is being written. Tokens never enter
Temporal's history, which keeps only the final ``AnswerResult`` (issue 13): a history holds what
the job decided, and a stream of fragments would multiply its size for nothing a replay needs.

The channel is best-effort by design. A Redis error is logged and swallowed and never fails the
activity; writes run in the background one at a time, so a slow or missing Redis cannot slow the
model call down, and deltas that pile up meanwhile are sent as one. A reader that misses part of
a draft still gets the final answer from the job's result.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import structlog
from pydantic import BaseModel
from redis.exceptions import RedisError

from keel.activities.redis_client import KeelRedis

__all__ = [
    "AnswerTokens",
    "DraftTokens",
    "TokenDelta",
    "mark_watched",
    "read_tokens",
    "tokens_key",
    "watch_key",
]

log = structlog.get_logger(__name__)

FLUSH_EVERY_SECONDS = 0.04
"""Longest a piece of text waits before it is sent: readers see a steady flow of text, and Redis
sees at most about 25 writes a second per draft however fast the model writes."""
FLUSH_CHARS = 512
"""Text that is sent at once, without waiting for the interval."""
END_TIMEOUT_SECONDS = 1.0
"""Longest the end of a draft waits for Redis. The activity's result does not depend on the
channel, so a Redis that hangs delays it by this much at most."""


WATCH_TTL_SECONDS = 30
"""How long a reader's mark on a job lasts; readers renew it every WATCH_RENEW_SECONDS."""
WATCH_RENEW_SECONDS = 10.0


def tokens_key(job_id: str) -> str:
    """The Redis stream that carries ``job_id``'s answer tokens."""
    return f"keel:tokens:{job_id}"


def watch_key(job_id: str) -> str:
    """The key a reader of ``job_id``'s events sets while it reads (see ``mark_watched``)."""
    return f"keel:watching:{job_id}"


async def mark_watched(redis: KeelRedis, job_id: str) -> None:
    """Say that someone reads the job's events for the next WATCH_TTL_SECONDS.

    A worker built to stream only for readers (``AnswerTokens(only_when_watched=True)``)
    streams a draft that starts while the mark is there; renew it while reading.

    Raises:
        redis.exceptions.RedisError: Redis could not be written; the caller decides.
    """
    await redis.set(watch_key(job_id), 1, ex=WATCH_TTL_SECONDS)


class TokenDelta(BaseModel):
    """New text of one draft of a job's answer: one entry of the job's token stream."""

    iteration: int
    """The loop iteration the draft belongs to."""
    attempt: int
    """The activity attempt that wrote it (from 1). A retried attempt starts its draft again,
    so a reader discards what it holds of the iteration when a higher attempt appears."""
    text: str
    """The new text of the answer, decoded (not fragments of the model's JSON)."""
    end: bool = False
    """True on the last delta of one draft call; its text may be empty."""


class AnswerTokens:
    """Publishes answer tokens to each job's Redis stream; one instance per worker."""

    def __init__(
        self,
        redis: KeelRedis,
        *,
        maxlen: int = 10_000,
        ttl_seconds: int = 86_400,
        flush_every_seconds: float = FLUSH_EVERY_SECONDS,
        flush_chars: int = FLUSH_CHARS,
        only_when_watched: bool = False,
    ) -> None:
        """Build the publisher.

        Args:
            redis: The worker's Redis client.
            maxlen: Entries a job's stream keeps, approximately (Redis trims whole nodes).
            ttl_seconds: The stream's expiry, refreshed on every write: the tokens of a job
                nobody watches do not outlive it by more than this.
            flush_every_seconds: Longest a draft's text waits before it is sent.
            flush_chars: Pending text that is sent without waiting for the interval.
            only_when_watched: Stream a draft only when a reader has marked the job
                (``mark_watched``): a streamed call costs the worker several times the CPU
                of a plain one, for nobody when nobody reads. Workers are built with it on.
        """
        self.redis = redis
        self.only_when_watched = only_when_watched
        self._maxlen = maxlen
        self._ttl = ttl_seconds
        self.flush_every_seconds = flush_every_seconds
        self.flush_chars = flush_chars

    async def publish(self, job_id: str, delta: TokenDelta) -> None:
        """Append ``delta`` to the job's stream; a Redis error is logged, never raised.

        Args:
            job_id: The job (workflow ID) whose stream gets the delta.
            delta: The text to append.
        """
        if (err := await self._send(job_id, delta)) is not None:
            log.warning("answer_tokens.publish_failed", job_id=job_id, error=str(err))

    async def wanted(self, job_id: str) -> bool:
        """Whether a draft of ``job_id`` should stream now (a reader is there, or always).

        One ``EXISTS`` when only watched jobs stream; a Redis error means no (the draft then
        arrives with the result, as it does for every reader that comes late).
        """
        if not self.only_when_watched:
            return True
        try:
            return bool(await self.redis.exists(watch_key(job_id)))
        except (RedisError, OSError):
            return False

    def draft(self, job_id: str, *, iteration: int, attempt: int) -> DraftTokens:
        """A batching publisher for one draft call of ``job_id`` (see ``DraftTokens``)."""
        return DraftTokens(self, job_id, iteration=iteration, attempt=attempt)

    async def _send(
        self, job_id: str, delta: TokenDelta, *, refresh: bool = True
    ) -> RedisError | OSError | None:
        """Append ``delta`` (and refresh the expiry) in one round trip; the error if it failed.

        A draft refreshes the expiry on its first and last writes only: the writes between come
        seconds apart, a day before the expiry could matter, and a bare XADD costs the worker
        about half the CPU of a pipeline.
        """
        fields: dict[Any, Any] = {
            "iteration": delta.iteration,
            "attempt": delta.attempt,
            "text": delta.text,
            "end": int(delta.end),
        }
        key = tokens_key(job_id)
        try:
            if not refresh:
                await self.redis.xadd(key, fields, maxlen=self._maxlen, approximate=True)
                return None
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.xadd(key, fields, maxlen=self._maxlen, approximate=True)
                pipe.expire(key, self._ttl)
                await pipe.execute()
        except (RedisError, OSError) as err:
            return err
        return None


class DraftTokens:
    """One draft call's text on its way to the stream, batched and sent in the background.

    ``feed`` never waits: it appends to the pending text and makes sure a writer task runs. The
    writer sends the pending text as one delta once ``flush_every_seconds`` have passed since
    its last write (at once when ``flush_chars`` are pending), one write at a time, so deltas
    arrive in order and text fed during a write goes out with the next. Text a failed write
    carried is put back and sent with the next, so a short Redis hiccup costs readers a pause,
    not part of the answer.
    """

    def __init__(self, tokens: AnswerTokens, job_id: str, *, iteration: int, attempt: int) -> None:
        self._tokens = tokens
        self._job_id = job_id
        self._iteration = iteration
        self._attempt = attempt
        self._pending = ""
        self._sent_at = time.monotonic()
        self._writer: asyncio.Task[None] | None = None
        self._hurry = asyncio.Event()
        self._closing = False
        self._failures = 0
        self._refreshed = False
        self.fed = ""
        """Everything fed so far: the answer as readers will have it once the writes land."""

    def feed(self, text: str) -> None:
        """Queue ``text`` (the answer's new suffix) for the next write; never waits."""
        if not text:
            return
        self.fed += text
        self._pending += text
        if len(self._pending) >= self._tokens.flush_chars:
            self._hurry.set()
        if self._writer is None:
            self._writer = asyncio.create_task(self._write())

    async def finish(self, rest: str = "") -> None:
        """Send what is pending plus ``rest`` as the draft's last delta (``end=True``).

        Waits at most END_TIMEOUT_SECONDS for Redis, then gives up with a log line: the
        activity's result never waits on the side channel for long.
        """
        self.fed += rest
        self._closing = True
        self._hurry.set()
        try:
            async with asyncio.timeout(END_TIMEOUT_SECONDS):
                if self._writer is not None:
                    await self._writer
                text, self._pending = self._pending + rest, ""
                await self._sent(self._delta(text, end=True))
        except TimeoutError:
            log.warning("answer_tokens.end_timed_out", job_id=self._job_id)
        finally:
            await self.abort()

    async def abort(self) -> None:
        """Stop the writer and drop pending text: the draft call failed (or has finished)."""
        self._pending = ""
        if self._writer is not None:
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer
            self._writer = None

    async def _write(self) -> None:
        """Send the pending text whenever it is due, until none is left or a write fails."""
        while self._pending:
            wait = self._sent_at + self._tokens.flush_every_seconds - time.monotonic()
            if wait > 0 and not self._closing and len(self._pending) < self._tokens.flush_chars:
                # Sleep until the text is due, unless ``feed`` or ``finish`` hurries it along.
                self._hurry.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await self._hurry.wait()
            text, self._pending = self._pending, ""
            self._sent_at = time.monotonic()
            if not await self._sent(self._delta(text)):
                # Keep the text for the next write, which the next ``feed`` (or ``finish``)
                # starts no sooner than one interval from now.
                self._pending = text + self._pending
                break
        self._writer = None

    async def _sent(self, delta: TokenDelta) -> bool:
        """Send one delta; whether it was written. Only a draft's first failure is logged."""
        refresh = delta.end or not self._refreshed
        err = await self._tokens._send(self._job_id, delta, refresh=refresh)
        self._refreshed = self._refreshed or err is None
        if err is not None:
            self._failures += 1
            if self._failures == 1:
                log.warning("answer_tokens.publish_failed", job_id=self._job_id, error=str(err))
        return err is None

    def _delta(self, text: str, *, end: bool = False) -> TokenDelta:
        return TokenDelta(iteration=self._iteration, attempt=self._attempt, text=text, end=end)


async def read_tokens(
    redis: KeelRedis,
    job_id: str,
    after: str = "0-0",
    *,
    block_ms: int | None = None,
    count: int = 500,
) -> list[tuple[str, TokenDelta]]:
    """The job's token deltas after stream ID ``after``, oldest first.

    Args:
        redis: A Redis client (with or without ``decode_responses``).
        job_id: The job (workflow ID).
        after: The last stream ID the reader has; ``"0-0"`` reads from the start. Pass the ID
            of the last entry returned to resume.
        block_ms: Wait up to this long for a new entry when there is none; None returns at once.
        count: Most entries returned.

    Returns:
        ``(stream ID, delta)`` pairs; empty when nothing came (or the stream does not exist).

    Raises:
        redis.exceptions.RedisError: Redis could not be read; the caller decides what to do.
    """
    reply: Any = await redis.xread({tokens_key(job_id): after}, count=count, block=block_ms)
    if not reply:
        return []
    # RESP2 answers a list of [key, entries] pairs, RESP3 a map from key to entries.
    streams = reply.values() if isinstance(reply, dict) else (entries for _, entries in reply)
    out: list[tuple[str, TokenDelta]] = []
    for entries in streams:
        for entry_id, fields in entries:
            out.append((_text(entry_id), _delta(fields)))
    return out


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _delta(fields: dict[Any, Any]) -> TokenDelta:
    values = {_text(k): _text(v) for k, v in fields.items()}
    return TokenDelta(
        iteration=int(values["iteration"]),
        attempt=int(values["attempt"]),
        text=values.get("text", ""),
        end=values.get("end") == "1",
    )
