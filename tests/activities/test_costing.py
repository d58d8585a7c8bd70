"""Token counts, cost arithmetic and failed attempts' charges (activities/costing.py)."""

from __future__ import annotations

import asyncio
import base64
import gzip
import importlib.resources
import itertools
import math
import threading
from datetime import timedelta
from typing import Any

import pytest
from temporalio import activity, workflow
from temporalio.client import Client
from temporalio.common import RetryPolicy
from temporalio.exceptions import ApplicationError
from temporalio.worker import Interceptor, UnsandboxedWorkflowRunner, Worker

from keel.activities import costing
from keel.activities.costing import (
    DEFAULT_ENCODING,
    AttemptCharges,
    CarryAttemptCharges,
    Charge,
    charge,
    count_chat_tokens,
    count_tokens,
    encoding_name,
    validate_prices,
    worst_case,
    worst_case_usd,
)
from keel.activities.llm import DEFAULT_PRICES
from keel.activities.types import CHARS_PER_TOKEN
from keel.workflows.policies import HEARTBEAT_TIMEOUT
from tests.conftest import unique

# --- model -> encoding -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("gpt-4o", "o200k_base"),
        ("gpt-4o-mini", "o200k_base"),
        ("gpt-4o-2024-08-06", "o200k_base"),
        ("chatgpt-4o-latest", "o200k_base"),
        ("gpt-4.1-mini-2025-04-14", "o200k_base"),
        ("gpt-4.5-preview", "o200k_base"),
        ("gpt-5-nano", "o200k_base"),
        ("o1", "o200k_base"),
        ("o3-mini", "o200k_base"),
        ("o4-mini-2025-04-16", "o200k_base"),
        ("sim-small", "o200k_base"),
        ("gpt-4", "cl100k_base"),
        ("gpt-4-turbo-2024-04-09", "cl100k_base"),
        ("gpt-4-0613", "cl100k_base"),
        ("gpt-3.5-turbo-16k", "cl100k_base"),
        ("gpt-35-turbo", "cl100k_base"),
        ("text-embedding-3-large", "cl100k_base"),
        ("text-embedding-ada-002", "cl100k_base"),
        # Provider prefixes, fine-tune wrappers and case are not part of the model.
        ("openai/gpt-4o", "o200k_base"),
        ("openrouter/openai/gpt-3.5-turbo", "cl100k_base"),
        ("ft:gpt-4o-mini-2024-07-18:acme::abc123", "o200k_base"),
        ("ft:gpt-3.5-turbo-0125:acme::x", "cl100k_base"),
        ("GPT-4O", "o200k_base"),
    ],
)
def test_models_map_to_their_encodings(model: str, expected: str) -> None:
    assert encoding_name(model) == expected


@pytest.mark.parametrize("model", ["llama-3.1-70b", "my-azure-deployment", "", "gpt2"])
def test_an_unknown_model_gets_the_default_encoding(model: str) -> None:
    # gpt2 is in bpe-openai's map, but its vocabulary is not in the wheel: it would need a
    # download, so it is counted like any unknown model rather than failing.
    assert DEFAULT_ENCODING == "o200k_base"
    assert encoding_name(model) == DEFAULT_ENCODING
    assert count_tokens(model, "hello world") == 2


# --- counts ----------------------------------------------------------------------------------

# Values checked two ways: "hello world" and "tiktoken is great!" are tiktoken's published
# examples, and every value equals a plain byte-pair merge over the shipped vocabulary
# (test_counts_equal_a_reference_byte_pair_merge below).
KNOWN_COUNTS = [
    ("gpt-4o", "hello world", 2),
    ("gpt-4", "hello world", 2),
    ("gpt-4", "tiktoken is great!", 6),
    ("gpt-4o", "我能吞下玻璃而不伤身体。", 11),
    ("gpt-4", "我能吞下玻璃而不伤身体。", 17),
    ("gpt-4o", "こんにちは世界", 2),
    ("gpt-4o", "👍🏽🎉", 5),
    ("gpt-4", "👍🏽🎉", 9),
]


@pytest.mark.parametrize(("model", "text", "expected"), KNOWN_COUNTS)
def test_counts_match_known_values(model: str, text: str, expected: int) -> None:
    assert count_tokens(model, text) == expected


def test_the_chars_per_token_estimate_undercounts_cjk_and_emoji() -> None:
    for text in ["我能吞下玻璃而不伤身体。" * 20, "👍🏽🎉" * 50]:
        estimate = len(text) // CHARS_PER_TOKEN
        exact = count_tokens("gpt-4o", text)
        assert exact > 2 * estimate, (text[:12], exact, estimate)
    # English is where the estimate was calibrated: it overcounts there, as intended.
    english = "The planner reads the observations and decides what to do next. " * 20
    assert count_tokens("gpt-4o", english) < len(english) // CHARS_PER_TOKEN


def _ranks(encoding: str) -> dict[bytes, int]:
    data = importlib.resources.files("bpe_openai.data").joinpath(f"{encoding}.tiktoken.gz")
    with data.open("rb") as raw, gzip.open(raw, "rt") as lines:
        return {
            base64.b64decode(token): int(rank)
            for token, rank in (line.split() for line in lines if line.strip())
        }


def _merge(ranks: dict[bytes, int], piece: str) -> list[int]:
    """Byte-pair encoding as tiktoken defines it: merge the lowest-ranked pair until none is."""
    parts = [bytes([b]) for b in piece.encode()]
    while True:
        pairs = [(ranks.get(a + b), i) for i, (a, b) in enumerate(itertools.pairwise(parts))]
        ranked = [(rank, i) for rank, i in pairs if rank is not None]
        if not ranked:
            return [ranks[p] for p in parts]
        _, i = min(ranked)
        parts[i : i + 2] = [parts[i] + parts[i + 1]]


def test_counts_equal_a_reference_byte_pair_merge() -> None:
    # Each string split by hand the way both encodings pre-split it: a run of letters, a run
    # of punctuation or symbols (emoji are symbols).
    pre_split = {
        "我能吞下玻璃而不伤身体。": ["我能吞下玻璃而不伤身体", "。"],
        "こんにちは世界": ["こんにちは世界"],
        "👍🏽🎉": ["👍🏽🎉"],
        "<|endoftext|>": ["<|", "endoftext", "|>"],
    }
    for model, encoding in [("gpt-4o", "o200k_base"), ("gpt-4", "cl100k_base")]:
        ranks = _ranks(encoding)
        for text, pieces in pre_split.items():
            reference = sum(len(_merge(ranks, piece)) for piece in pieces)
            assert count_tokens(model, text) == reference, (model, text)


@pytest.mark.parametrize("model", ["gpt-4o", "gpt-4"])
def test_special_token_text_is_counted_as_plain_text(model: str) -> None:
    for text in ["<|endoftext|>", "a<|endofprompt|>b", "<|fim_prefix|><|im_start|>"]:
        assert count_tokens(model, text) > 1
    assert count_tokens(model, "<|endoftext|>") == 7


def test_long_text_is_counted_exactly_in_pieces() -> None:
    import bpe_openai

    whole = bpe_openai.get_encoding("o200k_base")  # Up to 1,000,000 characters in one call.
    english = ("Costs are counted in hundred-millionths of a dollar.\nThen rounded up. " * 3000)[
        :200_000
    ]
    assert count_tokens("gpt-4o", english) == len(whole.encode_ordinary(english))
    # An unbroken run of CJK letters has no safe cut: each forced cut may move the count by a
    # token or so, and never by much.
    cjk = "我能吞下玻璃而不伤身体" * 15_000
    exact = len(whole.encode_ordinary(cjk))
    assert abs(count_tokens("gpt-4o", cjk) - exact) <= 2 * (len(cjk) // 50_000)


def test_text_past_the_tokenizers_limits_still_counts() -> None:
    assert count_tokens("gpt-4o", "a" * 2_000_000) == 250_000
    assert count_tokens("gpt-4o", "") == 0


def test_encodings_load_once_whichever_thread_asks_first() -> None:
    costing._loaded.pop("cl100k_base", None)
    costing._count_short.cache_clear()  # a count kept from an earlier test would load nothing
    counts: list[int] = []
    threads = [
        threading.Thread(target=lambda: counts.append(count_tokens("gpt-4", "hello world")))
        for _ in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert counts == [2] * 8
    loaded = costing._loaded["cl100k_base"]
    costing.preload(["gpt-4", "gpt-3.5-turbo"])
    assert costing._loaded["cl100k_base"] is loaded


# --- chat prompts ----------------------------------------------------------------------------


def test_chat_tokens_follow_openais_accounting() -> None:
    system, user = "You verify drafts.", '{"goal": "总结这份文件", "draft": "👍"}'
    messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
    body = sum(count_tokens("gpt-4o", t) for t in ["system", system, "user", user])
    assert count_chat_tokens("gpt-4o", messages) == body + 2 * 3 + 3
    # Text parts count as their text; a name costs one more token.
    parts = [{"role": "user", "content": [{"type": "text", "text": user}], "name": "ops"}]
    expected = sum(count_tokens("gpt-4o", t) for t in ["user", user, "ops"]) + 1 + 3 + 3
    assert count_chat_tokens("gpt-4o", parts) == expected
    assert count_chat_tokens("gpt-4o", [{"role": "assistant", "content": None}]) == 1 + 3 + 3
    assert count_chat_tokens("gpt-4o", []) == 3


def test_chat_parts_that_cannot_be_counted_exactly_are_refused() -> None:
    image = {"type": "image_url", "image_url": {"url": "https://example.test/a.png"}}
    with pytest.raises(ValueError, match="image_url"):
        count_chat_tokens("gpt-4o", [{"role": "user", "content": [image]}])
    with pytest.raises(ValueError, match="tool_calls"):
        count_chat_tokens("gpt-4o", [{"role": "assistant", "tool_calls": [{"id": "1"}]}])


# --- prices ----------------------------------------------------------------------------------


def test_the_default_price_table_is_valid() -> None:
    assert validate_prices(DEFAULT_PRICES) == DEFAULT_PRICES


@pytest.mark.parametrize(
    ("bad", "shown"),
    [
        ((math.nan, 1.0), "nan"),
        ((1.0, math.inf), "inf"),
        ((-0.01, 1.0), "-0.01"),
        ((1.0, -math.inf), "-inf"),
        ((True, 1.0), "True"),
        (("0.4", 1.0), "'0.4'"),
    ],
)
def test_bad_prices_are_refused_naming_the_model_and_value(
    bad: tuple[float, float], shown: str
) -> None:
    with pytest.raises(ValueError) as refused:
        validate_prices({"gpt-4o": (2.5, 10.0), "broken-model": bad})
    assert "'broken-model'" in str(refused.value)
    assert shown in str(refused.value)


def test_integer_and_zero_prices_are_fine() -> None:
    assert validate_prices({"free": (0, 0), "m": (2, 8)}) == {"free": (0.0, 0.0), "m": (2.0, 8.0)}


# --- charges ---------------------------------------------------------------------------------

PRICE = (0.40, 1.60)


def test_reported_usage_is_charged_exactly() -> None:
    charged = charge(PRICE, (1234, 56), reserved_prompt=2000, reserved_completion=500)
    # 1234 x 0.40 + 56 x 1.60 = 583.2 millionths of a dollar: exact in hundred-millionths.
    assert charged == Charge(1234, 56, 0.0005832, estimated=False)


def test_negative_usage_is_clamped_at_zero() -> None:
    assert charge(PRICE, (-5, -1), 100, 100) == Charge(0, 0, 0.0, estimated=False)
    assert charge(PRICE, (10, -1), 100, 100).completion_tokens == 0


def test_missing_usage_is_charged_at_the_reservation() -> None:
    charged = charge(PRICE, None, reserved_prompt=1000, reserved_completion=500)
    assert charged == Charge(1000, 500, 0.0012, estimated=True)
    assert charged == worst_case(PRICE, 1000, 500)


def test_a_missing_half_of_usage_is_charged_at_its_reservation() -> None:
    assert charge(PRICE, (300, None), 1000, 500) == Charge(300, 500, 0.00092, estimated=True)
    assert charge(PRICE, (None, 20), 1000, 500) == Charge(1000, 20, 0.000432, estimated=True)


def test_usage_above_the_reservation_is_still_the_truth() -> None:
    assert charge(PRICE, (5000, 900), 1000, 500).total_tokens == 5900


def test_costs_round_up_to_whole_hundred_millionths_never_down() -> None:
    # One token at $0.075 per million is 7.5 hundred-millionths: charged 8.
    assert charge((0.075, 0.3), (1, 0), 0, 0).cost_usd == 8e-8
    assert charge((0.075, 0.3), (1, 1), 0, 0).cost_usd == 3.8e-7
    # Exact costs gain nothing from float noise (0.15 is not exactly representable).
    assert charge((0.15, 0.60), (7, 3), 0, 0).cost_usd == 2.85e-6
    for prompt in range(0, 2000, 37):
        cost = charge((0.15, 0.6), (prompt, prompt // 3), 0, 0).cost_usd
        true_units = (prompt * 15 + (prompt // 3) * 60) / 1  # price x 100, in units
        assert round(cost * 1e8) == math.ceil(true_units)


def test_worst_case_is_the_prompt_and_every_allowed_completion_token() -> None:
    assert worst_case_usd(PRICE, 1000, 1024) == 0.00203840
    assert worst_case_usd((0.075, 0.3), 1, 0) == 8e-8


def test_charges_refuse_bad_input() -> None:
    with pytest.raises(ValueError, match="negative reservation"):
        charge(PRICE, None, -1, 10)
    with pytest.raises(ValueError, match="nan"):
        charge((math.nan, 1.0), (1, 1), 0, 0)


def test_charges_add_up_in_whole_units() -> None:
    total = sum((Charge(1, 2, 1e-8) for _ in range(10)), Charge())
    assert total == Charge(10, 20, 1e-7, estimated=False)
    assert (Charge(cost_usd=0.1) + Charge(cost_usd=0.2, estimated=True)).cost_usd == 0.3


# --- failed attempts' charges: the record ----------------------------------------------------

WORST = Charge(prompt_tokens=1200, completion_tokens=1024, cost_usd=0.0021184, estimated=True)


def test_outside_an_activity_nothing_was_spent_and_sending_is_local() -> None:
    charges = AttemptCharges.from_activity()
    assert (charges.spent_usd, charges.spent_tokens, charges.attempts) == (0.0, 0, 0)
    charges.sending(WORST)
    assert charges.spent == Charge()  # Earlier attempts only; this one is at risk.
    assert charges.details()["cost_usd"] == WORST.cost_usd
    charges.not_billed()
    assert charges.details()["attempts"] == 0


def test_a_record_round_trips_through_heartbeat_details() -> None:
    first = AttemptCharges()
    first.sending(WORST)
    second = AttemptCharges.from_details([first.details()])
    assert second.spent == WORST and second.attempts == 1
    second.sending(WORST)
    third = AttemptCharges.from_details([second.details()])
    assert third.spent_usd == 0.0042368 and third.spent_tokens == 2 * 2224
    assert third.attempts == 2


@pytest.mark.parametrize(
    "details",
    [
        [],
        ["3 ahead"],
        [{"kind": "something-else", "cost_usd": 5.0}],
        [{"kind": "keel.attempt_charges", "cost_usd": -1.0}],
        [{"kind": "keel.attempt_charges", "cost_usd": "inf"}],
        [{"kind": "keel.attempt_charges"}, "extra"],
    ],
)
def test_details_that_are_not_a_valid_record_charge_nothing(details: list[Any]) -> None:
    assert AttemptCharges.from_details(details).spent == Charge()


# --- failed attempts' charges: through a real Temporal server --------------------------------


@activity.defn
async def scripted_model_call(script: list[str]) -> dict[str, Any]:
    """One attempt does the comma-separated steps of ``script[attempt - 1]``.

    beat: heartbeat without details (as ``heartbeating()`` and the limits' waits do);
    send: ``sending(WORST)``; refused: ``not_billed()``; pause: sleep 0.2 s; wait: sleep 3 s;
    fail: raise a retryable error;
    succeed: return what this attempt saw of the earlier ones.
    """
    info = activity.info()
    charges = AttemptCharges.from_activity()
    for step in script[info.attempt - 1].split(","):
        if step == "beat":
            activity.heartbeat()
        elif step == "send":
            charges.sending(WORST)
        elif step == "refused":
            charges.not_billed()
        elif step == "pause":
            await asyncio.sleep(0.2)
        elif step == "wait":
            await asyncio.sleep(3)
        elif step == "fail":
            raise ApplicationError("model request timed out", type="LLMTransient")
    return {
        "attempt": info.attempt,
        "spent_usd": charges.spent_usd,
        "spent_tokens": charges.spent_tokens,
        "attempts_charged": charges.attempts,
    }


@workflow.defn(sandboxed=False)
class ScriptedCallWorkflow:
    @workflow.run
    async def run(self, script: list[str]) -> dict[str, Any]:
        return await workflow.execute_activity(
            scripted_model_call,
            script,
            start_to_close_timeout=timedelta(seconds=30),
            # Keel's own heartbeat timeout, so the SDK throttles heartbeats as in production:
            # the first at once, later ones at most every 8 s.
            heartbeat_timeout=HEARTBEAT_TIMEOUT,
            retry_policy=RetryPolicy(
                initial_interval=timedelta(milliseconds=50),
                backoff_coefficient=1.0,
                maximum_attempts=len(script),
            ),
        )


async def _run(
    client: Client,
    script: list[str],
    *,
    carry: bool = True,
    watch: list[Any] | None = None,
) -> dict[str, Any]:
    """Run ``script``; with ``watch``, append the pending attempt's details seen after 1 s."""
    queue = unique("costing")
    interceptors: list[Interceptor] = [CarryAttemptCharges()] if carry else []
    async with Worker(
        client,
        task_queue=queue,
        workflows=[ScriptedCallWorkflow],
        activities=[scripted_model_call],
        interceptors=interceptors,
        workflow_runner=UnsandboxedWorkflowRunner(),
        max_cached_workflows=0,
    ):
        handle = await client.start_workflow(
            ScriptedCallWorkflow.run,
            script,
            id=unique("costing-wf"),
            task_queue=queue,
            execution_timeout=timedelta(seconds=60),
        )
        if watch is not None:
            await asyncio.sleep(1)
            pending = (await handle.describe()).raw_description.pending_activities
            watch.append(pending[0].heartbeat_details.payloads if pending else None)
        result: dict[str, Any] = await handle.result()
    assert result["attempt"] == len(script)
    return result


async def test_an_attempt_that_failed_after_sending_is_charged_by_the_next(
    client: Client,
) -> None:
    seen = await _run(client, ["send,fail", "succeed"])
    assert seen["spent_usd"] == WORST.cost_usd
    assert seen["spent_tokens"] == WORST.total_tokens
    assert seen["attempts_charged"] == 1


async def test_the_record_reaches_the_next_attempt_even_when_its_heartbeat_was_throttled(
    client: Client,
) -> None:
    # The bare heartbeat goes out at once; the record 0.2 s later is held by the SDK's
    # throttle (8 s), as the server's view a second in shows, and the attempt fails before the
    # throttle ends: the worker must flush the record with the failure. (Heartbeats made in
    # the same instant never reach the throttle: the SDK sends only the newest of them.)
    watched: list[Any] = []
    seen = await _run(client, ["beat,pause,send,wait,fail", "succeed"], watch=watched)
    assert watched == [[]], "the record was not throttled, so this test proves nothing"
    assert seen["spent_usd"] == WORST.cost_usd
    assert seen["attempts_charged"] == 1


async def test_failed_attempts_add_up_and_refused_ones_cost_nothing(client: Client) -> None:
    # The second attempt fails before it sends or heartbeats: the record stays as it was.
    script = ["send,fail", "fail", "send,refused,fail", "send,fail", "succeed"]
    seen = await _run(client, script)
    assert seen["attempts_charged"] == 2
    assert seen["spent_usd"] == (WORST + WORST).cost_usd
    assert seen["spent_tokens"] == 2 * WORST.total_tokens


async def test_an_attempt_that_never_sent_keeps_the_record_with_the_interceptor(
    client: Client,
) -> None:
    seen = await _run(client, ["send,fail", "beat,fail", "succeed"])
    assert seen["spent_usd"] == WORST.cost_usd
    assert seen["attempts_charged"] == 1


async def test_without_the_interceptor_a_bare_heartbeat_erases_the_record(
    client: Client,
) -> None:
    # Why CarryAttemptCharges must be registered: Temporal keeps only the last details.
    seen = await _run(client, ["send,fail", "beat,fail", "succeed"], carry=False)
    assert seen["spent_usd"] == 0.0
    assert seen["attempts_charged"] == 0
