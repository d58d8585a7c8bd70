"""Embedding vectors from an OpenAI-compatible ``/v1/embeddings`` endpoint, with a cache.

Owns turning texts into L2-normalised float32 vectors for dense retrieval
(``activities/retrieval.py``): requests of at most ``MAX_BATCH`` inputs, a few in flight at a
time, through the worker's ``openai.AsyncOpenAI`` client (built with ``max_retries=0``:
Temporal owns retries). Every vector is cached in Redis through ``KeelCache`` under
``CacheKind.EMBEDDING`` with the key parts (model, sha256 of the text), scoped by the tenant
that asked, so one tenant never learns from a fast answer what another tenant embedded. All of
a call's cached vectors are read in one round trip (MGET) and its misses stored in one
pipeline; a cache outage reads as misses. Endpoint failures are classified by
``keel.activities.errors.classifying_openai_errors``, as the model gateway classifies them.

Not workflow code: every call performs network I/O. Embedding is a read, so it carries no
idempotency key and is safe to repeat.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import structlog
from temporalio.exceptions import ApplicationError

from keel.activities.cache import CacheKind, KeelCache
from keel.activities.errors import LLM_TRANSIENT, bounded, classifying_openai_errors

if TYPE_CHECKING:
    # Only the worker builds the client; see ``errors`` for why the SDK is not imported here.
    import openai

__all__ = ["MAX_BATCH", "Embedder", "Vectors"]

log = structlog.get_logger(__name__)

Vectors = npt.NDArray[np.float32]
"""An (n, dim) array of float32 rows, each of L2 norm 1 (or 0 for a zero vector)."""

MAX_BATCH = 128
"""Most inputs one embeddings request carries (OpenAI accepts 2,048; smaller requests keep each
one well inside the request timeout and its token limit)."""
MAX_IN_FLIGHT = 4
"""Most embeddings requests one ``embed`` call has open at once."""
REQUEST_TIMEOUT_SECONDS = 20.0
"""Each request's timeout: well below the retrieval activity's 60 s start-to-close timeout."""


def _text_key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _normalised(rows: npt.ArrayLike) -> Vectors:
    vectors = np.asarray(rows, dtype=np.float32)
    if vectors.ndim != 2:
        raise ValueError("embeddings must be a list of equally long vectors")
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    # A zero vector stays zero (its cosine with anything is 0) instead of becoming NaN.
    out: Vectors = (vectors / np.where(norms > 0, norms, 1.0)).astype(np.float32)
    return out


def _encode(vector: Vectors) -> dict[str, Any]:
    """A vector as a cache entry: little-endian float32 bytes, base64 (a quarter of JSON's size)."""
    return {"f32": base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")}


def _decode(entry: dict[str, Any] | None) -> Vectors | None:
    """A cache entry's vector, or None when it is missing or unreadable (a miss)."""
    raw = entry.get("f32") if entry else None
    if not isinstance(raw, str):
        return None
    try:
        data = base64.b64decode(raw, validate=True)
    except ValueError:
        return None
    if not data or len(data) % 4:
        return None
    return np.frombuffer(data, dtype="<f4").astype(np.float32).reshape(1, -1)


class Embedder:
    """Texts to unit vectors through one embedding model, cached per tenant and text."""

    def __init__(
        self,
        client: openai.AsyncOpenAI | None,
        model: str,
        cache: KeelCache | None = None,
        *,
        batch_size: int = MAX_BATCH,
        request_timeout: float = REQUEST_TIMEOUT_SECONDS,
    ) -> None:
        """Bind the embedder to the worker's client and model.

        Args:
            client: The worker's OpenAI-compatible client (vendor retries off); None turns dense
                retrieval off.
            model: The embedding model (from the worker's settings, never from job input);
                empty turns dense retrieval off.
            cache: Where vectors are cached; None: none.
            batch_size: Most inputs per request (at most ``MAX_BATCH``).
            request_timeout: Each request's timeout in seconds.
        """
        self._client = client if model else None
        self.model = model if client is not None else ""
        self._cache = cache
        self._batch = max(1, min(batch_size, MAX_BATCH))
        self._timeout = request_timeout
        self.requests = 0
        """Embeddings requests sent (tests and benchmarks read it)."""
        self.embedded = 0
        """Texts sent to the endpoint, that is not found in the cache."""

    @property
    def enabled(self) -> bool:
        """Whether a model is configured (else dense retrieval is off)."""
        return self._client is not None

    async def embed(self, texts: Sequence[str], *, tenant: str) -> Vectors:
        """Embed ``texts``, reading and filling the tenant's embedding cache.

        Args:
            texts: The texts, in order; duplicates are embedded once.
            tenant: Whose cache entries are read and written; empty: no cache.

        Returns:
            An (n, dim) float32 array, row i the unit vector of ``texts[i]``.

        Raises:
            ApplicationError: The endpoint's failure, classified (``LLM_TRANSIENT``,
                ``LLM_RATE_LIMITED`` retryable; ``LLM_AUTH``, ``LLM_REJECTED`` not).
            RuntimeError: If no model is configured (check ``enabled`` first).
        """
        if self._client is None:
            raise RuntimeError("no embedding model is configured")
        if not texts:
            return np.zeros((0, 0), dtype=np.float32)
        unique = list(dict.fromkeys(texts))
        found = dict(zip(unique, await self._cached(unique, tenant), strict=True))
        missing = [t for t in unique if found[t] is None]
        if missing:
            fresh = await self._request_all(missing)
            found.update(zip(missing, fresh, strict=True))
            await self._store(missing, fresh, tenant)
            log.info(
                "embeddings.embedded",
                model=self.model,
                texts=len(missing),
                cached=len(unique) - len(missing),
            )
        rows = [found[t] for t in texts]
        dims = {row.shape[1] for row in rows if row is not None}
        if len(dims) != 1:
            # A cached vector of another length (the model changed behind its name) is stale:
            # embed everything again rather than mix spaces.
            fresh = await self._request_all(unique)
            await self._store(unique, fresh, tenant)
            again = dict(zip(unique, fresh, strict=True))
            return np.vstack([again[t] for t in texts])
        return np.vstack([row for row in rows if row is not None])

    def _keys(self, texts: Sequence[str], tenant: str) -> list[str] | None:
        if self._cache is None or not tenant:
            return None
        try:
            return [
                self._cache.key(
                    CacheKind.EMBEDDING, tenant, {"model": self.model, "text": _text_key(t)}
                )
                for t in texts
            ]
        except ValueError:  # not a tenant name: leave the cache alone
            return None

    async def _cached(self, texts: list[str], tenant: str) -> list[Vectors | None]:
        keys = self._keys(texts, tenant)
        if keys is None or self._cache is None:
            return [None] * len(texts)
        entries = await self._cache.get_many(CacheKind.EMBEDDING, keys)
        return [_decode(e) for e in entries]

    async def _store(self, texts: list[str], vectors: list[Vectors], tenant: str) -> None:
        keys = self._keys(texts, tenant)
        if keys is None or self._cache is None:
            return
        entries = {k: _encode(v[0]) for k, v in zip(keys, vectors, strict=True)}
        await self._cache.put_many(CacheKind.EMBEDDING, entries)

    async def _request_all(self, texts: list[str]) -> list[Vectors]:
        gate = asyncio.Semaphore(MAX_IN_FLIGHT)

        async def one(batch: list[str]) -> Vectors:
            async with gate:
                return await self._request(batch)

        batches = [texts[i : i + self._batch] for i in range(0, len(texts), self._batch)]
        # A TaskGroup cancels the other batches as soon as one fails: the failure is what the
        # caller acts on, and the rest would only spend requests.
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(one(b)) for b in batches]
        except BaseExceptionGroup as failed:
            # Callers classify one ApplicationError, not a group: raise the first failure.
            raise failed.exceptions[0] from None
        matrix = np.vstack([t.result() for t in tasks])
        return [matrix[i : i + 1] for i in range(len(texts))]

    async def _request(self, batch: list[str]) -> Vectors:
        assert self._client is not None  # embed() checked it
        self.requests += 1
        self.embedded += len(batch)
        with classifying_openai_errors(secrets=(self._client.api_key,)):
            response = await self._client.embeddings.create(
                model=self.model, input=batch, timeout=self._timeout
            )
        rows = sorted(response.data, key=lambda d: d.index)
        if len(rows) != len(batch):
            raise _malformed(f"{len(rows)} embeddings for {len(batch)} inputs")
        try:
            return _normalised([r.embedding for r in rows])
        except ValueError as err:
            raise _malformed(str(err)) from None


def _malformed(detail: str) -> ApplicationError:
    # A reply of the wrong shape is the endpoint's fault, like a 5xx: another attempt can work.
    return ApplicationError(bounded(f"malformed embeddings reply: {detail}"), type=LLM_TRANSIENT)
