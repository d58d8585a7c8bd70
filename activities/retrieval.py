"""Hybrid retrieval over a job's documents (BM25 and dense vectors, fused), and ``search_corpus``.

Owns reading a folder of text documents, their metadata (path, extension, folder and an
optional ``---`` front-matter block), the in-process index of each folder and ranked, filtered
search. An index holds a BM25 index (``bm25s``, English stopwords) and, once a dense or hybrid
search has asked for them, the documents' embedding vectors (numpy, from ``Embedder``). Indexes
are cached per folder and rebuilt when any file's path, mtime or size changes; the digest of
those is the index version (``RetrievalResult.index_version``), and documents are embedded once
per version, by one run that concurrent searches share.

Ranking (``RetrievalQuery.mode``):

- ``bm25``: BM25 scores (the score of a hit is its BM25 score).
- ``dense``: cosine similarity between the query's and each document's vector (the score).
- ``hybrid``: both rankings, each cut to its best ``FUSION_DEPTH``, fused by reciprocal rank
  fusion, ``sum 1 / (RRF_K + rank)`` with RRF_K = 60, scaled so a document first in both
  rankings scores 1.0 (one first in one ranking only scores 0.5).

Filters remove documents before any ranking, and at most MAX_TOP_K hits come back. A document
is embedded as one unit: its title and the first ``EMBED_CHARS`` characters of its body
(passage-level chunking is left out; BM25 still reads the whole text). The optional rerank is
maximal marginal relevance (``_mmr``). When the embeddings endpoint fails, or the documents'
vectors are not ready in time, a search degrades to BM25 and says so in ``degraded``.

Searches are reads: their results are memoized in workflow history, so they need no
idempotency key. The retrieval top-k cache (``CacheKind.RETRIEVAL``) keeps a search's hits per
tenant, corpus, index version, query, filters, k, mode and rerank; a hit returns the same hits
with ``cached=True``, recorded in history like a miss. Degraded results are never cached. Not
workflow code: this module reads the file system and calls the embeddings endpoint.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import bm25s
import numpy as np
import numpy.typing as npt
import structlog
from pydantic import ValidationError
from temporalio import activity
from temporalio.exceptions import ApplicationError

from keel.activities._heartbeat import heartbeating
from keel.activities.cache import CacheKind, KeelCache, normalize_text
from keel.activities.corpora import Corpora, corpus_name
from keel.activities.embeddings import Embedder, Vectors
from keel.activities.errors import CORPUS_TOO_LARGE, DOCS_NOT_FOUND
from keel.activities.types import RetrievalHit, RetrievalMode, RetrievalQuery, RetrievalResult

__all__ = [
    "DOC_EXTENSIONS",
    "EMBED_CHARS",
    "HIT_METADATA_BYTES",
    "MAX_DOC_BYTES",
    "MAX_RESULT_BYTES",
    "MAX_TOP_K",
    "RRF_K",
    "RetrievalActivities",
    "Retriever",
    "index_version",
]

DOC_EXTENSIONS = frozenset({".md", ".txt", ".rst", ".json", ".py", ".html"})
"""File extensions that are indexed; everything else in the folder is ignored."""
MAX_DOC_BYTES = 2 * 1024 * 1024
"""Files larger than this are skipped."""
MAX_INDEX_FILES = 5_000
"""Most documents one index holds: a folder with more is refused, not half-indexed."""
MAX_INDEX_BYTES = 100 * 1024 * 1024
"""Most bytes of documents one index reads."""
MAX_TOP_K = 20
"""Most hits one search returns."""
SNIPPET_CHARS = 300
"""Approximate length of a hit's snippet."""
EMBED_CHARS = 2_000
"""Characters of a document's body that are embedded (after its title): about 500 tokens, so
a batch of 128 stays far inside an embeddings request's token limit."""
HIT_METADATA_KEYS = 16
"""Most metadata entries one hit carries (``path``, ``ext`` and ``dir`` first, then front-matter
keys in file order): front matter can hold anything, and a hit travels through history."""
HIT_METADATA_KEY_CHARS = 64
"""Longest metadata key a hit carries; longer keys are left out."""
HIT_METADATA_VALUE_CHARS = 256
"""Longest metadata value a hit carries; longer values are cut and end in ``…``."""
HIT_METADATA_BYTES = 2_048
"""Most UTF-8 bytes of one hit's metadata (keys and values); entries past it are left out."""
MAX_RESULT_BYTES = 128 * 1024
"""Most UTF-8 bytes of one ``search_corpus`` result's JSON: MAX_TOP_K hits within the caps above
stay far below it, and a result over it (a corpus of very long paths) loses its lowest hits. It
keeps the result far under Temporal's 2 MB payload limit (and under the 256 KB threshold above
which the payload store takes a payload out of history)."""
RRF_K = 60
"""Reciprocal rank fusion's constant (Cormack et al., 2009): damps the weight of the top ranks
so that agreement between rankings counts more than one ranking's first place."""
FUSION_DEPTH = 100
"""How deep into each ranking fusion looks."""
RERANK_LAMBDA = 0.7
"""Maximal marginal relevance's trade-off: 1.0 is relevance alone, 0.0 novelty alone."""
RERANK_POOL = 3
"""The rerank re-orders the best ``RERANK_POOL * top_k`` candidates."""
EMBED_WAIT_SECONDS = 40.0
"""How long a search waits for its documents' vectors before it ranks by BM25 alone (and the
embedding run goes on for later searches): inside the retrieval activity's 60 s attempt."""
RANKING_VERSION = "1"
"""Part of every retrieval cache key: bump it when ranking code changes what a search returns,
so hits ranked by the old code are not served."""
_MAX_CACHED_FOLDERS = 32

_log = structlog.get_logger(__name__)

Signature = tuple[tuple[str, int, int], ...]
"""(relative path, mtime_ns, size) of every indexed file, sorted by path."""


@dataclass(frozen=True)
class _Doc:
    path: str
    text: str
    metadata: dict[str, str]


@dataclass
class _Dense:
    """An index's document vectors: computed at most once per index version."""

    vectors: Vectors | None = None
    run: asyncio.Task[Vectors] | None = None
    """The embedding run in progress, shared by every search that waits for it."""


@dataclass(frozen=True)
class _Index:
    signature: Signature
    docs: list[_Doc]
    bm25: bm25s.BM25 | None
    """None when no document has an indexable term."""
    version: str
    dense: _Dense = field(default_factory=_Dense)


class _DenseUnavailable(Exception):
    """Dense ranking cannot be done for this search; the message says why."""


def index_version(signature: Signature) -> str:
    """The version of an index: a digest of its files' paths, mtimes and sizes.

    The folder's own path is left out, so workers that mount the same files at different paths
    share retrieval cache entries; a copy whose every path, mtime and size matches is taken to
    hold the same text.
    """
    raw = json.dumps(signature, separators=(",", ":")).encode("utf-8")
    return hashlib.sha256(raw).hexdigest()[:24]


def _tokenize(texts: list[str]) -> list[list[str]]:
    tokens: list[list[str]] = bm25s.tokenize(
        texts, stopwords="en", return_ids=False, show_progress=False
    )
    return tokens


def _scan(
    folder: Path,
    stop: threading.Event | None = None,
    max_files: int = MAX_INDEX_FILES,
    max_bytes: int = MAX_INDEX_BYTES,
) -> list[tuple[Path, str, int, int]]:
    """Indexable files under ``folder`` as (absolute path, relative path, mtime_ns, size).

    Raises:
        ApplicationError: ``CORPUS_TOO_LARGE`` (non-retryable) past ``max_files`` documents
            or ``max_bytes`` of them.
        InterruptedError: When ``stop`` is set (the activity was cancelled) mid-scan.
    """
    found = []
    total = 0
    for root, dirs, files in os.walk(folder):
        if stop is not None and stop.is_set():
            raise InterruptedError("scan cancelled")
        # Hidden folders (.git, .venv) are tooling, not documents.
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in files:
            path = Path(root, name)
            if name.startswith(".") or path.suffix.lower() not in DOC_EXTENSIONS:
                continue
            try:
                st = path.stat()
            except OSError:
                continue
            if st.st_size <= MAX_DOC_BYTES:
                total += st.st_size
                found.append(
                    (path, path.relative_to(folder).as_posix(), st.st_mtime_ns, st.st_size)
                )
                if len(found) > max_files or total > max_bytes:
                    raise ApplicationError(
                        f"documents over the index's bounds ({max_files} files, {max_bytes} bytes)",
                        type=CORPUS_TOO_LARGE,
                        non_retryable=True,
                    )
    return sorted(found, key=lambda f: f[1])


def _split_front_matter(text: str) -> tuple[dict[str, str], str]:
    """Parse a leading ``---`` block of ``key: value`` lines; return (metadata, body)."""
    lines = text.splitlines(keepends=True)
    if not lines or lines[0].strip() != "---":
        return {}, text
    for end in range(1, len(lines)):
        if lines[end].strip() == "---":
            meta = {}
            for line in lines[1:end]:
                key, sep, value = line.partition(":")
                if sep and key.strip():
                    meta[key.strip()] = value.strip().strip("\"'")
            return meta, "".join(lines[end + 1 :])
    return {}, text


def _load(folder: Path, files: list[tuple[Path, str, int, int]]) -> list[_Doc]:
    docs = []
    for path, rel, _, _ in files:
        try:
            raw = path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        front, body = _split_front_matter(raw)
        parent = Path(rel).parent.as_posix()
        # Built-in keys win over front matter so ``ext`` and ``dir`` filters stay reliable.
        meta = {**front, "path": rel, "ext": path.suffix.lower().lstrip("."), "dir": parent}
        docs.append(_Doc(path=rel, text=body, metadata=meta))
    return docs


def _build(folder: Path, signature: Signature, files: list[tuple[Path, str, int, int]]) -> _Index:
    docs = _load(folder, files)
    version = index_version(signature)
    corpus = _tokenize([f"{d.metadata.get('title', '')}\n{d.text}" for d in docs])
    if not any(corpus):
        # bm25s cannot index a corpus without a single term; dense ranking may still work.
        return _Index(signature, docs, None, version)
    bm25 = bm25s.BM25()
    bm25.index(corpus, show_progress=False)
    return _Index(signature, docs, bm25, version)


def _embed_text(doc: _Doc) -> str:
    """What represents ``doc`` in vector space: its title and the start of its body."""
    parts = (doc.metadata.get("title", ""), " ".join(doc.text[:EMBED_CHARS].split()))
    # Endpoints refuse an empty input; a document without words is represented by its path.
    return "\n".join(p for p in parts if p.strip()) or doc.path


def _snippet(text: str, terms: list[str]) -> str:
    """About SNIPPET_CHARS characters around the first query term, or the start of the text."""
    start = 0
    if terms:
        pattern = r"\b(?:" + "|".join(re.escape(t) for t in terms) + r")"
        match = re.search(pattern, text, flags=re.IGNORECASE)
        if match:
            start = max(0, match.start() - SNIPPET_CHARS // 3)
    piece = " ".join(text[start : start + SNIPPET_CHARS].split())
    prefix = "…" if start > 0 else ""
    suffix = "…" if start + SNIPPET_CHARS < len(text) else ""
    return f"{prefix}{piece}{suffix}"


def _allowed(docs: list[_Doc], filters: dict[str, str]) -> npt.NDArray[np.bool_]:
    return np.array(
        [all(d.metadata.get(k) == v for k, v in filters.items()) for d in docs], dtype=bool
    )


def _order(scores: npt.NDArray[np.float64], depth: int) -> npt.NDArray[np.intp]:
    """Indexes of the positive scores, best first (ties by document order), at most ``depth``."""
    order = np.argsort(-scores, kind="stable")[:depth]
    return order[scores[order] > 0.0]


def _fuse(*rankings: npt.NDArray[np.intp], n: int) -> npt.NDArray[np.float64]:
    """Reciprocal rank fusion of ``rankings`` over ``n`` documents, scaled to (0, 1]."""
    fused = np.zeros(n, dtype=np.float64)
    for ranking in rankings:
        fused[ranking] += 1.0 / (RRF_K + 1 + np.arange(len(ranking)))
    return fused / (len(rankings) / (RRF_K + 1))


def _mmr(
    pool: npt.NDArray[np.intp], scores: npt.NDArray[np.float64], vectors: Vectors, k: int
) -> list[int]:
    """Maximal marginal relevance (Carbonell and Goldstein, 1998) over the candidates ``pool``.

    Picks, one at a time, the candidate with the best ``RERANK_LAMBDA * relevance -
    (1 - RERANK_LAMBDA) * (its highest cosine with a hit already picked)``, relevance being the
    score scaled by the pool's best. The best hit stays first; a near-duplicate of a hit
    already picked drops below a slightly less relevant document that adds something new, so
    a planner's context is not spent twice on one passage. Cheap: no model call, only the
    vectors the index already holds (one pool-by-pool product, at most 60 by 60).
    """
    relevance = scores[pool] / max(float(scores[pool].max()), 1e-12)
    sims = vectors[pool] @ vectors[pool].T
    picked: list[int] = []
    redundancy = np.full(len(pool), -np.inf)
    left = np.ones(len(pool), dtype=bool)
    while len(picked) < min(k, len(pool)):
        penalty = np.where(np.isfinite(redundancy), redundancy, 0.0)
        value = RERANK_LAMBDA * relevance - (1 - RERANK_LAMBDA) * penalty
        best = int(np.argmax(np.where(left, value, -np.inf)))
        picked.append(best)
        left[best] = False
        redundancy = np.maximum(redundancy, sims[best])
    return [int(pool[i]) for i in picked]


@dataclass(frozen=True)
class _Ranking:
    """One search's inputs to ``_ranked``, all computed before it runs in a thread."""

    query: str
    top_k: int
    filters: dict[str, str]
    mode: RetrievalMode
    rerank: bool
    query_vector: Vectors | None
    doc_vectors: Vectors | None


def _ranked(index: _Index, r: _Ranking) -> list[RetrievalHit]:
    """Rank ``index``'s documents for ``r`` (CPU only: run it off the event loop)."""
    n = len(index.docs)
    terms = _tokenize([r.query])[0]
    allowed = _allowed(index.docs, r.filters)
    # Filters are applied to every document before ranking, so a selective filter still returns
    # up to top_k hits instead of whatever survived from an unfiltered top_k.
    bm25 = np.zeros(n, dtype=np.float64)
    if r.mode != "dense" and index.bm25 is not None and terms:
        bm25 = np.where(allowed, np.asarray(index.bm25.get_scores(terms), dtype=np.float64), 0.0)
    cosine = np.zeros(n, dtype=np.float64)
    if r.mode != "bm25" and r.query_vector is not None and r.doc_vectors is not None:
        raw = (r.doc_vectors @ r.query_vector[0]).astype(np.float64)
        cosine = np.where(allowed, raw, 0.0)
    if r.mode == "bm25":
        scores = bm25
    elif r.mode == "dense":
        scores = cosine
    else:
        scores = _fuse(_order(bm25, FUSION_DEPTH), _order(cosine, FUSION_DEPTH), n=n)
    pool = _order(scores, RERANK_POOL * r.top_k if r.rerank else r.top_k)
    if r.rerank and r.doc_vectors is not None and len(pool):
        chosen = _mmr(pool, scores, r.doc_vectors, r.top_k)
    else:
        chosen = [int(i) for i in pool[: r.top_k]]
    return [
        RetrievalHit(
            doc_id=index.docs[i].path,
            path=index.docs[i].path,
            score=round(float(scores[i]), 4),
            snippet=_snippet(index.docs[i].text, terms),
            metadata=bounded_metadata(index.docs[i].metadata),
        )
        for i in chosen
    ]


_BUILTIN_KEYS = ("path", "ext", "dir")


def bounded_metadata(metadata: dict[str, str]) -> dict[str, str]:
    """``metadata`` within the hit caps: HIT_METADATA_KEYS entries, HIT_METADATA_BYTES in all.

    The built-in keys come first so the filters' keys always survive; then front-matter keys in
    file order. Keys over HIT_METADATA_KEY_CHARS are left out, values over
    HIT_METADATA_VALUE_CHARS are cut. Filters still match the full values: only what a hit
    carries into history is cut.

    Args:
        metadata: A document's metadata as loaded.

    Returns:
        The metadata a hit carries.
    """
    order = [k for k in _BUILTIN_KEYS if k in metadata]
    order += [k for k in metadata if k not in _BUILTIN_KEYS]
    kept: dict[str, str] = {}
    used = 0
    for key in order:
        if len(kept) >= HIT_METADATA_KEYS:
            break
        if len(key) > HIT_METADATA_KEY_CHARS:
            continue
        value = metadata[key]
        if len(value) > HIT_METADATA_VALUE_CHARS:
            value = value[: HIT_METADATA_VALUE_CHARS - 1] + "…"
        size = len(key.encode()) + len(value.encode())
        if used + size > HIT_METADATA_BYTES:
            continue
        kept[key] = value
        used += size
    return kept


def bounded_result(result: RetrievalResult) -> RetrievalResult:
    """``result`` with every hit's metadata bounded and at most MAX_RESULT_BYTES in all.

    Applied to every result ``search_corpus`` returns, cached ones too: the retrieval cache may
    hold hits stored before the caps existed.

    Args:
        result: A search's result.

    Returns:
        The result as it may enter history; its lowest hits dropped when it is still too large.
    """
    hits = [h.model_copy(update={"metadata": bounded_metadata(h.metadata)}) for h in result.hits]
    sizes = [len(h.model_dump_json().encode()) for h in hits]
    # What the result holds besides its hits (mode, version, flags), with room to spare.
    budget = MAX_RESULT_BYTES - 1024
    while hits and sum(sizes) > budget:
        hits.pop()
        sizes.pop()
    return result.model_copy(update={"hits": hits})


class Retriever:
    """Hybrid search over document folders, with one cached index per folder.

    Safe to share between concurrent activities on one event loop: builds of the same folder
    are serialized, indexing and ranking run in threads so they do not block the worker's
    loop, and the documents of an index version are embedded by one run that every search
    waiting for them shares.
    """

    def __init__(
        self,
        max_cached_folders: int = _MAX_CACHED_FOLDERS,
        corpora: Corpora | None = None,
        *,
        max_files: int = MAX_INDEX_FILES,
        max_bytes: int = MAX_INDEX_BYTES,
        embedder: Embedder | None = None,
        cache: KeelCache | None = None,
        embed_wait_seconds: float = EMBED_WAIT_SECONDS,
    ) -> None:
        """Bind the retriever to the worker's corpora, embedder and caches.

        Args:
            max_cached_folders: Indexes kept in memory, least recently used dropped first.
            corpora: The corpus names jobs may search; none when None.
            max_files: Most documents one index holds.
            max_bytes: Most bytes of documents one index reads.
            embedder: Vectors for dense and hybrid ranking; None (or one without a model):
                BM25 only.
            cache: The retrieval top-k cache (``CacheKind.RETRIEVAL``); None: none.
            embed_wait_seconds: How long a search waits for its documents' vectors.
        """
        self._corpora = corpora or Corpora()
        self._bounds = (max_files, max_bytes)
        self._indexes: OrderedDict[str, _Index] = OrderedDict()
        self._locks: dict[str, asyncio.Lock] = {}
        self._max_cached = max_cached_folders
        self._embedder = embedder if embedder is not None and embedder.enabled else None
        self._cache = cache
        self._embed_wait = embed_wait_seconds
        self.builds = 0
        """How many indexes this retriever has built (tests use it to observe caching)."""
        self.doc_embeddings = 0
        """How many times it embedded an index's documents (once per index version)."""

    @property
    def default_mode(self) -> RetrievalMode:
        """The mode of a search that names none: hybrid with an embedding model, else BM25."""
        return "hybrid" if self._embedder is not None else "bm25"

    async def search(
        self,
        docs_dir: str,
        query: str,
        top_k: int = 5,
        filters: dict[str, str] | None = None,
        *,
        tenant: str = "",
        mode: RetrievalMode | None = None,
        rerank: bool = False,
        cache: bool = True,
    ) -> list[RetrievalHit]:
        """The hits of ``retrieve`` (same arguments), for callers that need nothing else."""
        result = await self.retrieve(
            docs_dir, query, top_k, filters, tenant=tenant, mode=mode, rerank=rerank, cache=cache
        )
        return result.hits

    async def retrieve(
        self,
        docs_dir: str,
        query: str,
        top_k: int = 5,
        filters: dict[str, str] | None = None,
        *,
        tenant: str = "",
        mode: RetrievalMode | None = None,
        rerank: bool = False,
        cache: bool = True,
    ) -> RetrievalResult:
        """Rank the documents against ``query``.

        Args:
            docs_dir: The job's documents: ``corpus:NAME`` (a corpus of ``tenant``'s or a
                shared one, from the worker's configuration), or a folder on the worker (only
                operators can start such jobs; see ``keel.client``).
            query: Search text.
            top_k: Most hits to return; capped at MAX_TOP_K.
            filters: Metadata equality filters (``path``, ``ext``, ``dir``, front-matter keys).
            tenant: Whose corpora ``corpus:NAME`` is looked up among, and whose caches are
                read and written (none when empty).
            mode: ``hybrid``, ``bm25`` or ``dense``; None: ``default_mode``.
            rerank: Re-order the best candidates by maximal marginal relevance.
            cache: Whether the retrieval cache may serve this search and store its hits.

        Returns:
            Hits with a positive score, best first (in MMR order with ``rerank``), the mode
            that ranked them, the index version, and ``cached`` or ``degraded`` when so.

        Raises:
            ApplicationError: ``DOCS_NOT_FOUND`` (non-retryable) if the folder does not exist
                or the corpus is not one the tenant may search; ``CORPUS_TOO_LARGE`` past the
                index's bounds.
        """
        index = await self._index(self._folder(docs_dir, tenant))
        wanted = mode or self.default_mode
        top_k = max(1, min(top_k, MAX_TOP_K))
        filters = dict(filters or {})
        parts = {
            "ranking": RANKING_VERSION,
            "corpus": docs_dir,
            "index": index.version,
            # Whitespace collapsed, case kept: an embedding model may tell "US" from "us".
            "query": normalize_text(query, "whitespace"),
            "filters": filters,
            "k": top_k,
            "mode": wanted,
            "rerank": rerank,
            "embedding_model": self._embedder.model if self._embedder else "",
        }
        key = self._cache_key(tenant, parts) if cache else None
        if key is not None and (hit := await self._cached(key)) is not None:
            _log.info("retrieval.cache_hit", hits=len(hit.hits), index_version=index.version)
            return hit
        result = await self._search(index, query, top_k, filters, wanted, rerank, tenant)
        if key is not None:
            result.cached = False  # looked up and missed: the job counts it
        if key is not None and self._cache is not None and result.degraded is None:
            # A degraded result is not what the search asked for: the next search tries again.
            await self._cache.put(CacheKind.RETRIEVAL, key, result.model_dump(mode="json"))
        return result

    def _folder(self, docs_dir: str, tenant: str) -> str:
        if (name := corpus_name(docs_dir)) is None:
            return docs_dir
        folder = self._corpora.resolve(tenant, name)
        if folder is None:  # another tenant's corpus reads exactly like a missing one
            raise ApplicationError(
                f"no corpus named {name!r}", type=DOCS_NOT_FOUND, non_retryable=True
            )
        return folder

    def _cache_key(self, tenant: str, parts: dict[str, Any]) -> str | None:
        if self._cache is None or not tenant or not self._cache.enabled(CacheKind.RETRIEVAL):
            return None
        try:
            return self._cache.key(CacheKind.RETRIEVAL, tenant, parts)
        except ValueError:  # not a tenant name: search without the cache
            return None

    async def _cached(self, key: str) -> RetrievalResult | None:
        assert self._cache is not None  # _cache_key checked it
        entry = await self._cache.get(CacheKind.RETRIEVAL, key)
        if entry is None:
            return None
        try:
            return RetrievalResult.model_validate(entry).model_copy(update={"cached": True})
        except ValidationError:  # an entry written by other code: a miss
            return None

    async def _search(
        self,
        index: _Index,
        query: str,
        top_k: int,
        filters: dict[str, str],
        mode: RetrievalMode,
        rerank: bool,
        tenant: str,
    ) -> RetrievalResult:
        result = RetrievalResult(mode=mode, index_version=index.version)
        if not index.docs or not query.strip():
            return result
        query_vector = doc_vectors = None
        if mode != "bm25" or rerank:
            try:
                query_vector, doc_vectors = await self._vectors(index, query, tenant)
            except _DenseUnavailable as why:
                used = "bm25" if mode != "bm25" else mode
                note = f"{why}; ranked by BM25" + (" without rerank" if rerank else "")
                _log.warning("retrieval.degraded", asked=mode, reason=str(why))
                result = result.model_copy(update={"mode": used, "degraded": note})
                mode = used
        ranking = _Ranking(query, top_k, filters, mode, rerank, query_vector, doc_vectors)
        hits = await asyncio.to_thread(_ranked, index, ranking)
        return result.model_copy(update={"hits": hits})

    async def _vectors(self, index: _Index, query: str, tenant: str) -> tuple[Vectors, Vectors]:
        """The query's vector and the documents' (embedding them if this version has none).

        Raises:
            _DenseUnavailable: No embedding model, the endpoint failed (its classified error,
                retryable or not, is logged), or the documents' vectors were not ready in time.
        """
        if self._embedder is None:
            raise _DenseUnavailable("no embedding model is configured on this worker")
        try:
            query_vector = await self._embedder.embed([query], tenant=tenant)
            docs = await self._doc_vectors(index, tenant)
        except ApplicationError as err:
            _log.warning(
                "retrieval.embeddings_failed",
                error_type=err.type,
                retryable=not err.non_retryable,
            )
            raise _DenseUnavailable(f"the embeddings endpoint failed ({err.type})") from None
        if docs.shape[1] != query_vector.shape[1]:
            raise _DenseUnavailable("the documents' vectors are of another embedding model")
        return query_vector, docs

    async def _doc_vectors(self, index: _Index, tenant: str) -> Vectors:
        dense = index.dense
        if dense.vectors is not None:
            return dense.vectors
        if dense.run is None:
            dense.run = asyncio.create_task(self._embed_docs(index, tenant))
            dense.run.add_done_callback(_forget_failure)
        try:
            # Shielded: a search that is cancelled or stops waiting leaves the run going for
            # the others and for the next search of this index version.
            return await asyncio.wait_for(asyncio.shield(dense.run), self._embed_wait)
        except TimeoutError:
            raise _DenseUnavailable("the documents are still being embedded") from None

    async def _embed_docs(self, index: _Index, tenant: str) -> Vectors:
        assert self._embedder is not None  # _vectors checked it
        try:
            # Scoped by the tenant whose search started the run: its cache entries are read and
            # written, and a search of another tenant on this worker reuses the vectors in
            # memory, as it reuses the BM25 index.
            vectors = await self._embedder.embed(
                [_embed_text(d) for d in index.docs], tenant=tenant
            )
        except BaseException:
            index.dense.run = None  # the next search starts a new run
            raise
        index.dense.vectors = vectors
        self.doc_embeddings += 1
        _log.info("retrieval.embedded", docs=len(index.docs), index_version=index.version)
        return vectors

    async def _index(self, docs_dir: str) -> _Index:
        folder = Path(docs_dir).expanduser().resolve()
        if not folder.is_dir():
            raise ApplicationError(
                f"document folder not found: {docs_dir}", type=DOCS_NOT_FOUND, non_retryable=True
            )
        key = str(folder)
        async with self._locks.setdefault(key, asyncio.Lock()):
            stop = threading.Event()
            try:
                files = await asyncio.to_thread(_scan, folder, stop, *self._bounds)
            except asyncio.CancelledError:
                stop.set()  # the scan's thread stops at its next folder
                raise
            signature: Signature = tuple((rel, mtime, size) for _, rel, mtime, size in files)
            cached = self._indexes.get(key)
            if cached is not None and cached.signature == signature:
                self._indexes.move_to_end(key)
                return cached
            index = await asyncio.to_thread(_build, folder, signature, files)
            self.builds += 1
            _log.info("retrieval.indexed", folder=key, docs=len(index.docs), version=index.version)
            self._indexes[key] = index
            self._indexes.move_to_end(key)
            while len(self._indexes) > self._max_cached:
                self._indexes.popitem(last=False)
            return index


def _forget_failure(run: asyncio.Task[Vectors]) -> None:
    # Mark a failed run's exception as retrieved: every search that waited has already seen
    # it, and asyncio would otherwise log "exception was never retrieved" for a run nobody
    # awaited to the end.
    if not run.cancelled():
        run.exception()


class RetrievalActivities:
    """The retrieval activity, bound to one shared Retriever."""

    def __init__(self, retriever: Retriever) -> None:
        self._retriever = retriever

    @activity.defn(name="search_corpus")
    async def search_corpus(self, q: RetrievalQuery) -> RetrievalResult:
        """Search the job's documents.

        Args:
            q: Corpus or folder, query, top_k, metadata filters, mode, rerank and cache.

        Returns:
            The ranked hits, how they were ranked, and the attempt that produced them.

        Raises:
            ApplicationError: ``DOCS_NOT_FOUND`` if the folder does not exist on this worker.
        """
        job_id = q.job_id or activity.info().workflow_id
        with structlog.contextvars.bound_contextvars(job_id=job_id, tenant=q.tenant):
            async with heartbeating():
                result = await self._retriever.retrieve(
                    q.docs_dir,
                    q.query,
                    q.top_k,
                    q.filters,
                    tenant=q.tenant,
                    mode=q.mode,
                    rerank=q.rerank,
                    cache=q.cache,
                )
            _log.info(
                "retrieval.searched",
                hits=len(result.hits),
                mode=result.mode,
                cached=result.cached,
                degraded=result.degraded is not None,
            )
        return bounded_result(result).model_copy(update={"attempt": activity.info().attempt})
