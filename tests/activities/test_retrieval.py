"""Retriever and the search_corpus activity over real folders of documents."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from keel.activities.errors import DOCS_NOT_FOUND
from keel.activities.retrieval import RetrievalActivities, Retriever
from keel.activities.types import RetrievalQuery


def write(root: Path, rel: str, text: str) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def docs(tmp_path: Path) -> Path:
    write(
        tmp_path,
        "guides/retries.md",
        "---\ntitle: Retry policies\naudience: ops\n---\n"
        "Temporal retries activities with exponential backoff. A retry policy sets the "
        "maximum attempts and the non-retryable error types.",
    )
    write(
        tmp_path,
        "guides/budgets.md",
        "---\naudience: dev\n---\nBudgets cap tokens, cost and wall-clock time for each job.",
    )
    write(tmp_path, "notes/redis.txt", "Redis stores blobs and idempotency records with a TTL.")
    write(tmp_path, "code/policy.py", "# retry policy helpers\nMAX_ATTEMPTS = 5  # retry limit\n")
    write(tmp_path, "image.png", "retry retry retry")  # not an indexed extension
    write(tmp_path, ".git/HEAD", "retry")  # hidden folder, skipped
    return tmp_path


async def test_relevant_doc_ranks_first(docs: Path) -> None:
    hits = await Retriever().search(str(docs), "retry policy backoff", top_k=5)
    assert hits[0].path == "guides/retries.md"
    assert hits[0].doc_id == "guides/retries.md"
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    assert all(h.score > 0 for h in hits)
    assert {h.path for h in hits} <= {"guides/retries.md", "code/policy.py"}
    assert "exponential backoff" in hits[0].snippet
    # Front matter is metadata, not snippet text.
    assert "audience" not in hits[0].snippet
    assert hits[0].metadata == {
        "title": "Retry policies",
        "audience": "ops",
        "path": "guides/retries.md",
        "ext": "md",
        "dir": "guides",
    }


async def test_filters_on_front_matter_and_builtin_metadata(docs: Path) -> None:
    retriever = Retriever()
    hits = await retriever.search(str(docs), "retry", top_k=5, filters={"ext": "py"})
    assert [h.path for h in hits] == ["code/policy.py"]
    hits = await retriever.search(str(docs), "budgets tokens retry", filters={"audience": "dev"})
    assert [h.path for h in hits] == ["guides/budgets.md"]
    hits = await retriever.search(str(docs), "redis", filters={"dir": "notes"})
    assert [h.path for h in hits] == ["notes/redis.txt"]
    assert await retriever.search(str(docs), "retry", filters={"audience": "nobody"}) == []


async def test_filters_apply_before_top_k(tmp_path: Path) -> None:
    # Ten strong matches outside the filter must not crowd out the one weak match inside it.
    for i in range(10):
        write(tmp_path, f"a/doc{i}.md", "retry retry retry retry backoff")
    write(tmp_path, "b/weak.txt", "one retry mention among many other words here")
    hits = await Retriever().search(str(tmp_path), "retry", top_k=1, filters={"dir": "b"})
    assert [h.path for h in hits] == ["b/weak.txt"]


async def test_top_k_is_capped_at_20(tmp_path: Path) -> None:
    for i in range(25):
        write(tmp_path, f"doc{i:02}.md", f"keel document number {i}")
    hits = await Retriever().search(str(tmp_path), "keel document", top_k=100)
    assert len(hits) == 20


async def test_queries_without_known_terms_return_nothing(docs: Path) -> None:
    retriever = Retriever()
    assert await retriever.search(str(docs), "zebra unicorn") == []
    assert await retriever.search(str(docs), "the and of") == []  # stopwords only
    assert await retriever.search(str(docs), "") == []


async def test_tiny_and_empty_folders(tmp_path: Path) -> None:
    retriever = Retriever()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert await retriever.search(str(empty), "anything") == []
    stop = tmp_path / "stop"
    write(stop, "a.md", "the and of")  # no indexable term at all
    assert await retriever.search(str(stop), "the") == []
    single = tmp_path / "single"
    write(single, "one.md", "hello keel")
    hits = await retriever.search(str(single), "keel", top_k=20)
    assert [h.path for h in hits] == ["one.md"]
    assert hits[0].metadata["dir"] == "."


async def test_index_is_cached_and_rebuilt_when_a_file_changes(docs: Path) -> None:
    retriever = Retriever()
    assert await retriever.search(str(docs), "zeppelin") == []
    await retriever.search(str(docs), "retry")
    assert retriever.builds == 1
    changed = docs / "notes/redis.txt"
    changed.write_text("Zeppelin airships float over Redis.", encoding="utf-8")
    st = changed.stat()
    os.utime(changed, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    hits = await retriever.search(str(docs), "zeppelin")
    assert retriever.builds == 2
    assert [h.path for h in hits] == ["notes/redis.txt"]
    write(docs, "new/zeppelin.rst", "Zeppelin zeppelin history.")
    hits = await retriever.search(str(docs), "zeppelin")
    assert retriever.builds == 3
    assert hits[0].path == "new/zeppelin.rst"


async def test_large_files_are_skipped(tmp_path: Path) -> None:
    write(tmp_path, "small.md", "needle")
    write(tmp_path, "big.md", "needle " * 400_000)  # about 2.8 MB
    hits = await Retriever().search(str(tmp_path), "needle")
    assert [h.path for h in hits] == ["small.md"]


async def test_snippet_is_around_the_first_match(tmp_path: Path) -> None:
    write(tmp_path, "long.md", "filler words " * 200 + "the needle is here " + "tail " * 200)
    (hit,) = await Retriever().search(str(tmp_path), "needle")
    assert "needle is here" in hit.snippet
    assert hit.snippet.startswith("…") and hit.snippet.endswith("…")
    assert len(hit.snippet) <= 310


async def test_invalid_utf8_is_read_with_replacement(tmp_path: Path) -> None:
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9 keel latin1 text")
    (hit,) = await Retriever().search(str(tmp_path), "keel")
    assert "\ufffd" in hit.snippet


async def test_missing_folder_is_docs_not_found(tmp_path: Path) -> None:
    with pytest.raises(ApplicationError) as info:
        await Retriever().search(str(tmp_path / "nope"), "retry")
    assert info.value.type == DOCS_NOT_FOUND
    assert info.value.non_retryable


async def test_search_corpus_activity(docs: Path) -> None:
    env = ActivityEnvironment()
    acts = RetrievalActivities(Retriever())
    query = RetrievalQuery(
        job_id="job-1", tenant="acme", docs_dir=str(docs), query="retry backoff", top_k=1
    )
    result = await env.run(acts.search_corpus, query)
    assert [h.path for h in result.hits] == ["guides/retries.md"]
    assert result.attempt == 1
