"""Lexical retrieval over a job's document folder, and the ``search_corpus`` activity.

Owns reading a folder of text documents, their metadata (path, extension, folder and an
optional ``---`` front-matter block), a BM25 index over them (``bm25s``, English stopwords) and
ranked, filtered search. Indexes are cached in-process per folder and rebuilt when any file's
path, mtime or size changes. Searches are reads: their results are memoized in workflow history,
so they need no idempotency key. Not workflow code: this module reads the file system.
"""

from __future__ import annotations

import asyncio
import os
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import bm25s
import numpy as np
import structlog
from temporalio import activity
from temporalio.exceptions import ApplicationError

from keel.activities._heartbeat import heartbeating
from keel.activities.corpora import Corpora, corpus_name
from keel.activities.errors import CORPUS_TOO_LARGE, DOCS_NOT_FOUND
from keel.activities.types import RetrievalHit, RetrievalQuery, RetrievalResult

__all__ = ["DOC_EXTENSIONS", "MAX_DOC_BYTES", "MAX_TOP_K", "RetrievalActivities", "Retriever"]

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
_MAX_CACHED_FOLDERS = 32

_log = structlog.get_logger(__name__)

Signature = tuple[tuple[str, int, int], ...]
"""(relative path, mtime_ns, size) of every indexed file, sorted by path."""


@dataclass(frozen=True)
class _Doc:
    path: str
    text: str
    metadata: dict[str, str]


@dataclass(frozen=True)
class _Index:
    signature: Signature
    docs: list[_Doc]
    bm25: bm25s.BM25 | None
    """None when no document has an indexable term."""


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
    corpus = _tokenize([f"{d.metadata.get('title', '')}\n{d.text}" for d in docs])
    if not any(corpus):
        # bm25s cannot index a corpus without a single term, and nothing could match anyway.
        return _Index(signature, docs, None)
    bm25 = bm25s.BM25()
    bm25.index(corpus, show_progress=False)
    return _Index(signature, docs, bm25)


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


def _rank(index: _Index, query: str, top_k: int, filters: dict[str, str]) -> list[RetrievalHit]:
    if index.bm25 is None:
        return []
    terms = _tokenize([query])[0]
    if not terms:
        return []
    scores = np.asarray(index.bm25.get_scores(terms), dtype=np.float64)
    # Filters are applied to every document before ranking, so a selective filter still returns
    # up to top_k hits instead of whatever survived from an unfiltered top_k.
    for i, doc in enumerate(index.docs):
        if any(doc.metadata.get(k) != v for k, v in filters.items()):
            scores[i] = 0.0
    order = np.argsort(-scores, kind="stable")[:top_k]
    return [
        RetrievalHit(
            doc_id=index.docs[i].path,
            path=index.docs[i].path,
            score=round(float(scores[i]), 4),
            snippet=_snippet(index.docs[i].text, terms),
            metadata=index.docs[i].metadata,
        )
        for i in order
        if scores[i] > 0.0
    ]


class Retriever:
    """BM25 search over document folders, with one cached index per folder.

    Safe to share between concurrent activities on one event loop: builds of the same folder
    are serialized, and indexing runs in a thread so it does not block the worker's loop.
    """

    def __init__(
        self,
        max_cached_folders: int = _MAX_CACHED_FOLDERS,
        corpora: Corpora | None = None,
        *,
        max_files: int = MAX_INDEX_FILES,
        max_bytes: int = MAX_INDEX_BYTES,
    ) -> None:
        self._corpora = corpora or Corpora()
        self._bounds = (max_files, max_bytes)
        self._indexes: OrderedDict[str, _Index] = OrderedDict()
        self._locks: dict[str, asyncio.Lock] = {}
        self._max_cached = max_cached_folders
        self.builds = 0
        """How many indexes this retriever has built (tests use it to observe caching)."""

    async def search(
        self,
        docs_dir: str,
        query: str,
        top_k: int = 5,
        filters: dict[str, str] | None = None,
        *,
        tenant: str = "",
    ) -> list[RetrievalHit]:
        """Rank the documents against ``query``.

        Args:
            docs_dir: The job's documents: ``corpus:NAME`` (a corpus of ``tenant``'s or a
                shared one, from the worker's configuration), or a folder on the worker (only
                operators can start such jobs; see ``keel.client``).
            query: Search text.
            top_k: Most hits to return; capped at MAX_TOP_K.
            filters: Metadata equality filters (``path``, ``ext``, ``dir``, front-matter keys).
            tenant: Whose corpora ``corpus:NAME`` is looked up among.

        Returns:
            Hits with a positive score, best first; empty when nothing matches.

        Raises:
            ApplicationError: ``DOCS_NOT_FOUND`` (non-retryable) if the folder does not exist
                or the corpus is not one the tenant may search; ``CORPUS_TOO_LARGE`` past the
                index's bounds.
        """
        if (name := corpus_name(docs_dir)) is not None:
            folder = self._corpora.resolve(tenant, name)
            if folder is None:  # another tenant's corpus reads exactly like a missing one
                raise ApplicationError(
                    f"no corpus named {name!r}", type=DOCS_NOT_FOUND, non_retryable=True
                )
            docs_dir = folder
        index = await self._index(docs_dir)
        top_k = max(1, min(top_k, MAX_TOP_K))
        return await asyncio.to_thread(_rank, index, query, top_k, dict(filters or {}))

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
            _log.info("retrieval.indexed", folder=key, docs=len(index.docs))
            self._indexes[key] = index
            self._indexes.move_to_end(key)
            while len(self._indexes) > self._max_cached:
                self._indexes.popitem(last=False)
            return index


class RetrievalActivities:
    """The retrieval activity, bound to one shared Retriever."""

    def __init__(self, retriever: Retriever) -> None:
        self._retriever = retriever

    @activity.defn(name="search_corpus")
    async def search_corpus(self, q: RetrievalQuery) -> RetrievalResult:
        """Search the job's documents.

        Args:
            q: Folder, query, top_k and metadata filters.

        Returns:
            The ranked hits and the attempt that produced them.

        Raises:
            ApplicationError: ``DOCS_NOT_FOUND`` if the folder does not exist on this worker.
        """
        job_id = q.job_id or activity.info().workflow_id
        with structlog.contextvars.bound_contextvars(job_id=job_id, tenant=q.tenant):
            async with heartbeating():
                hits = await self._retriever.search(
                    q.docs_dir, q.query, q.top_k, q.filters, tenant=q.tenant
                )
            _log.info("retrieval.searched", hits=len(hits))
        return RetrievalResult(hits=hits, attempt=activity.info().attempt)
