"""Every payload Keel writes is bounded (issue 16): retrieval hits, model replies, error text,
and the codec's refusal of a payload over Temporal's limit."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from temporalio.api.common.v1 import Payload
from temporalio.converter import ActivitySerializationContext
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from keel.activities import errors
from keel.activities.answer_tokens import AnswerTokens, DraftTokens
from keel.activities.converter import (
    DATA_CONVERTER,
    MAX_ENCODED_BYTES,
    KeelCodec,
    keel_data_converter,
)
from keel.activities.encryption import PAYLOAD_TOO_LARGE
from keel.activities.llm import _collect
from keel.activities.payload_store import PayloadStoreSettings
from keel.activities.retrieval import (
    HIT_METADATA_BYTES,
    MAX_RESULT_BYTES,
    RetrievalActivities,
    Retriever,
)
from keel.activities.types import RetrievalQuery
from tests.conftest import unique


def front_matter_doc(path: Path, words: str) -> None:
    """A document whose front matter is 1.5 MB: one huge value and thousands of keys."""
    keys = "".join(f"k{i}: {'v' * 100}\n" for i in range(5_000))
    path.write_text(f"---\ntitle: {words}\nhuge: {'x' * 1_000_000}\n{keys}---\n{words}\n")


async def test_front_matter_cannot_blow_up_a_search_result(tmp_path: Path) -> None:
    front_matter_doc(tmp_path / "a.md", "retry policy backoff")
    front_matter_doc(tmp_path / "b.md", "retry budget backoff")
    assert sum(p.stat().st_size for p in tmp_path.iterdir()) > 3_000_000
    acts = RetrievalActivities(Retriever())
    query = RetrievalQuery(tenant="t", docs_dir=str(tmp_path), query="retry backoff", top_k=5)

    result = await ActivityEnvironment().run(acts.search_corpus, query)

    assert sorted(h.path for h in result.hits) == ["a.md", "b.md"]
    assert len(result.model_dump_json()) < MAX_RESULT_BYTES
    for hit in result.hits:
        meta = hit.metadata
        # The built-in keys always survive, ahead of front matter.
        assert meta["path"] == hit.path and meta["ext"] == "md" and meta["dir"] == "."
        assert meta["title"].startswith("retry")
        assert sum(len(k) + len(v) for k, v in meta.items()) <= HIT_METADATA_BYTES
        assert len(meta["huge"]) == 256 and meta["huge"].endswith("…")
    # Filters still see the documents' full metadata; only what hits carry is cut.
    hits = await Retriever().search(
        str(tmp_path), "retry", filters={"title": "retry budget backoff"}
    )
    assert [h.path for h in hits] == ["b.md"]


def test_bounded_cuts_and_redacts_foreign_text() -> None:
    text = "upstream said: " + "sk-abcdefghijkl " + "z" * 5_000
    out = errors.bounded(text)
    assert len(out) <= errors.MAX_MESSAGE_CHARS
    assert "sk-abcdefghijkl" not in out and errors.REDACTED in out
    assert out.endswith(f"({len(errors.redact(text))} chars)")
    assert errors.bounded("short") == "short"


def test_vendor_errors_are_bounded() -> None:
    err = errors.classify_http_status(
        502,
        "<html>" + "gateway " * 10_000,
        transient_type=errors.LLM_TRANSIENT,
        rate_limited_type=errors.LLM_RATE_LIMITED,
        rejected_type=errors.LLM_REJECTED,
        auth_type=errors.LLM_AUTH,
    )
    assert len(err.message) <= errors.MAX_MESSAGE_CHARS and err.message.startswith("HTTP 502")


async def chunks(pieces: int, size: int) -> AsyncIterator[object]:
    for _ in range(pieces):
        yield {"choices": [{"delta": {"content": "a" * size}}]}
    yield {"choices": [{"delta": {}, "finish_reason": "stop"}]}


async def test_a_streamed_reply_past_the_cap_is_refused(redis_client: aioredis.Redis) -> None:
    tokens = AnswerTokens(redis_client)
    # Under the cap: read whole.
    draft = DraftTokens(tokens, unique("job"), iteration=0, attempt=1)
    done = await _collect(chunks(4, 1_000), draft)
    assert done.choices[0].message.content == "a" * 4_000
    with pytest.raises(ApplicationError) as caught:
        draft = DraftTokens(tokens, unique("job"), iteration=0, attempt=1)
        await _collect(chunks(1_000, 64 * 1024), draft)
    assert caught.value.type == errors.LLM_RESPONSE_TOO_LARGE
    assert caught.value.non_retryable


def big_json(chars: int) -> Payload:
    """An incompressible JSON string payload of about ``chars`` bytes."""
    return Payload(
        metadata={"encoding": b"json/plain"}, data=f'"{os.urandom(chars // 2).hex()}"'.encode()
    )


async def test_the_codec_refuses_a_payload_over_temporals_limit_naming_its_owner() -> None:
    context = ActivitySerializationContext(
        namespace="default",
        workflow_id="agent-job-acme:k1",
        workflow_type="AgentLoopWorkflow",
        activity_type="search_corpus",
        activity_id="7",
        activity_task_queue="q",
        is_local=False,
    )
    codec = KeelCodec().with_context(context)
    [fits] = await codec.encode([big_json(1_000_000)])
    assert fits.ByteSize() < MAX_ENCODED_BYTES
    with pytest.raises(ApplicationError) as caught:
        await codec.encode([big_json(3_000_000)])
    err = caught.value
    assert err.type == PAYLOAD_TOO_LARGE and err.non_retryable
    assert "'search_corpus'" in err.message and "agent-job-acme:k1" in err.message
    assert "3000" in err.message and str(MAX_ENCODED_BYTES) in err.message
    # The context-free codec is untouched by ``with_context`` and names no owner.
    with pytest.raises(ApplicationError, match="PayloadTooLarge: a payload is"):
        await KeelCodec().encode([big_json(3_000_000)])


async def test_with_the_payload_store_the_cap_is_what_a_reader_inflates() -> None:
    store = PayloadStoreSettings(url="redis://127.0.0.1:1/0")
    converter = keel_data_converter(payload_store=store)
    assert converter is not DATA_CONVERTER and converter.external_storage is not None
    codec = converter.payload_codec
    assert isinstance(codec, KeelCodec)
    [stored] = await codec.encode([big_json(3_000_000)])  # would go to Redis by reference
    assert stored.ByteSize() > MAX_ENCODED_BYTES
    # A JSON object over the inflation cap is refused before compression: no reader could
    # inflate it, however well it compresses.
    huge_object = Payload(
        metadata={"encoding": b"json/plain"}, data=b'{"a":"' + b"a" * 5_000_000 + b'"}'
    )
    with pytest.raises(ApplicationError, match="before compression") as caught:
        await codec.encode([huge_object])
    assert caught.value.type == PAYLOAD_TOO_LARGE


def test_the_store_is_off_unless_turned_on() -> None:
    assert PayloadStoreSettings.from_env({}) is None
    assert PayloadStoreSettings.from_env({"KEEL_PAYLOAD_STORE": "off"}) is None
    on = PayloadStoreSettings.from_env(
        {
            "KEEL_PAYLOAD_STORE": "on",
            "REDIS_URL": "redis://r:6379/2",
            "KEEL_PAYLOAD_STORE_TTL": "60",
        }
    )
    assert on == PayloadStoreSettings(url="redis://r:6379/2", ttl_seconds=60)
    with pytest.raises(ValueError, match="KEEL_PAYLOAD_STORE_THRESHOLD"):
        PayloadStoreSettings.from_env(
            {"KEEL_PAYLOAD_STORE": "on", "KEEL_PAYLOAD_STORE_THRESHOLD": "0"}
        )
