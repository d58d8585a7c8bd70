"""The data converter: compact pydantic JSON, compressed by CompressionCodec where it pays."""

from __future__ import annotations

import base64
import hashlib
import json
import zlib

import pytest
from hypothesis import given
from hypothesis import strategies as st
from temporalio.api.common.v1 import Payload

from keel.activities.converter import (
    _ZDICT_V1,
    DATA_CONVERTER,
    CompressionCodec,
    compress_payload,
    decompress_payload,
)
from keel.activities.types import Observation, Plan, PlanResult, PlanStep, ToolCall, Usage
from keel.workflows.types import AgentLoopInput, JobRequest, JobResult, JobUsage

JSON = b"json/plain"
Z1 = b"binary/keel-z1"

MODELS = [
    JobRequest(goal="Compute 2 + 2 with calculator", tenant="acme", tools=["calculator"]),
    AgentLoopInput(request=JobRequest(goal="Summarise the docs", tenant="acme")),
    PlanResult(
        plan=Plan(
            decision="act",
            rationale="Two calculations.",
            steps=[
                PlanStep(id=f"s{i}", kind="tool", tool="calculator", args={"expression": "2+2"})
                for i in (1, 2)
            ],
        ),
        usage=Usage(prompt_tokens=406, completion_tokens=170, cost_usd=0.0004),
    ),
    ToolCall(
        tenant="acme",
        step_key="0:s1",
        tool="calculator",
        args={"expression": "6*7"},
        allowed_tools=["calculator"],
    ),
    JobResult(
        job_id="agent-job-1",
        outcome="completed",
        answer="6 * 7 = 42",
        verified=True,
        usage=JobUsage(
            tokens=1079,
            prompt_tokens=857,
            completion_tokens=222,
            cost_usd=0.0007,
            steps=7,
            tool_calls=4,
        ),
        iterations=1,
    ),
]


@pytest.mark.parametrize("value", MODELS, ids=lambda m: type(m).__name__)
async def test_models_are_compressed_smaller_and_read_back(value: object) -> None:
    [plain] = DATA_CONVERTER.payload_converter.to_payloads([value])
    [encoded] = await DATA_CONVERTER.encode([value])
    assert encoded.metadata["encoding"] == Z1
    assert encoded.ByteSize() < plain.ByteSize()
    assert (await DATA_CONVERTER.decode([encoded], [type(value)]))[0] == value
    assert decompress_payload(encoded) == plain


async def test_strings_stay_readable_for_the_ui() -> None:
    # Summaries and details are strings: operators read them without a codec server.
    summary = "plan · iteration 1"
    [encoded] = await DATA_CONVERTER.encode([summary * 20])
    assert encoded.metadata["encoding"] == JSON
    assert json.loads(encoded.data) == summary * 20


def test_a_payload_compression_would_not_shrink_is_kept() -> None:
    tiny = Payload(metadata={"encoding": JSON}, data=b'{"q":"Zr9"}')
    assert compress_payload(tiny) is tiny


def test_payloads_the_codec_does_not_own_pass_through() -> None:
    tagged = Payload(metadata={"encoding": JSON, "messageType": b"x"}, data=b'{"a":' + b"1" * 99)
    other = Payload(metadata={"encoding": b"binary/encrypted"}, data=b"\x00" * 200)
    array = Payload(metadata={"encoding": JSON}, data=b"[" + b"1," * 200 + b"1]")
    for payload in (tagged, other, array):
        assert compress_payload(payload) is payload
        assert decompress_payload(payload) is payload


async def test_histories_written_before_the_codec_still_read() -> None:
    observation = Observation(step_id="s1", kind="tool", name="calculator", content="4")
    [old] = DATA_CONVERTER.payload_converter.to_payloads([observation])
    assert (await CompressionCodec().decode([old])) == [old]
    assert (await DATA_CONVERTER.decode([old], [Observation])) == [observation]


def test_the_wire_format_is_frozen() -> None:
    # Histories hold binary/keel-z1 payloads for as long as they are kept: the dictionary and
    # the meaning of these bytes never change. A new dictionary needs a new encoding name.
    assert hashlib.sha256(_ZDICT_V1).hexdigest() == (
        "9a5f86f80892955aa05585ccdd6059b7d593d204f0c134ca9d004c0f57c4db8a"
    )
    recorded = base64.b64decode("QzIhMTkXFIVQc8IzEksUMosVzBS0FMztUUtJIx1sJhsaGJnUAgA=")
    decoded = decompress_payload(Payload(metadata={"encoding": Z1}, data=recorded))
    assert decoded.metadata["encoding"] == JSON
    assert json.loads(decoded.data) == {
        "tenant": "acme",
        "goal": "What is 6 * 7?",
        "iteration": 2,
        "max_output_tokens": 1024,
    }


def test_corrupt_data_is_an_error_not_garbage() -> None:
    with pytest.raises(zlib.error):
        decompress_payload(Payload(metadata={"encoding": Z1}, data=b"not zlib at all"))


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=6) | st.dictionaries(st.text(max_size=12), children, max_size=6)
    ),
    max_leaves=40,
)


@pytest.mark.property
@given(st.dictionaries(st.text(max_size=20), JSON_VALUES, max_size=10))
def test_any_json_object_survives_the_codec_unchanged(obj: dict[str, object]) -> None:
    original = Payload(metadata={"encoding": JSON}, data=json.dumps(obj).encode())
    encoded = compress_payload(original)
    if encoded is not original:
        assert encoded.metadata["encoding"] == Z1
        assert len(encoded.data) + len(Z1) < len(original.data) + len(JSON)
    assert decompress_payload(encoded) == original


@pytest.mark.property
@given(
    st.dictionaries(st.text(min_size=1, max_size=12), st.binary(max_size=20), max_size=3),
    st.binary(max_size=300),
)
def test_any_other_payload_passes_through_both_ways(
    metadata: dict[str, bytes], data: bytes
) -> None:
    if metadata.get("encoding") == Z1:
        metadata["encoding"] = b"binary/other"
    original = Payload(metadata=metadata, data=data)
    assert decompress_payload(compress_payload(original)) == original
