"""``AgentJobs`` refuses malformed jobs before it touches Temporal, naming the field."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from keel.client import AgentJobs, InvalidJobRequest, JobRequest
from keel.client._listing import list_query
from keel.client._validation import validate_request
from keel.workflows.types import MAX_GOAL_CHARS


class Untouchable:
    """Stands in for the Temporal client: any use at all fails the test."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"the Temporal client was used ({name}) for an invalid request")


@pytest.fixture
def jobs() -> AgentJobs:
    return AgentJobs(Untouchable())  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("request_fields", "field"),
    [
        ({"goal": ""}, "goal"),
        ({"goal": "   \n\t"}, "goal"),
        ({"goal": "x" * (MAX_GOAL_CHARS + 1)}, "goal"),
        ({"goal": "hi", "tenant": "acme corp"}, "tenant"),
        ({"goal": "hi", "tenant": "-acme"}, "tenant"),
        ({"goal": "hi", "user": "bob'; DROP"}, "user"),
        ({"goal": "hi", "budget": {"max_steps": 0}}, "budget.max_steps"),
        ({"goal": "hi", "budget": {"max_cost_usd": math.nan}}, "budget.max_cost_usd"),
        ({"goal": "hi", "budget": {"max_cost_usd": math.inf}}, "budget.max_cost_usd"),
        ({"goal": "hi", "budget": {"max_seconds": -1}}, "budget.max_seconds"),
        ({"goal": "hi", "budget": {"max_stepz": 3}}, "budget.max_stepz"),
        ({"goal": "hi", "tools": ["no such"]}, "tools[0]"),
        ({"goal": "hi", "ask_timeout_seconds": math.inf}, "ask_timeout_seconds"),
        ({"goal": "hi", "notify_workflow": "has space"}, "notify_workflow"),
        ({"goal": "hi", "surprise": True}, "surprise"),
        ({}, "goal"),
    ],
)
async def test_malformed_request_is_refused_with_its_field(
    jobs: AgentJobs, request_fields: dict[str, Any], field: str
) -> None:
    with pytest.raises(InvalidJobRequest) as caught:
        await jobs.start(request_fields)
    assert caught.value.field == field
    assert str(caught.value).startswith(f"{field}: ")


async def test_unknown_tool_names_it_and_the_known_ones(jobs: AgentJobs) -> None:
    with pytest.raises(InvalidJobRequest) as caught:
        await jobs.start({"goal": "hi", "tools": ["calculator", "rm_rf"]})
    assert caught.value.field == "tools"
    assert "rm_rf" in caught.value.reason
    assert "calculator" in caught.value.reason and "write_note" in caught.value.reason


async def test_unknown_tool_is_refused_in_a_model_too(jobs: AgentJobs) -> None:
    with pytest.raises(InvalidJobRequest) as caught:
        await jobs.start(JobRequest(goal="hi", tools=["teleport"]))
    assert caught.value.field == "tools"


async def test_missing_docs_dir_is_refused(jobs: AgentJobs, tmp_path: Path) -> None:
    with pytest.raises(InvalidJobRequest) as caught:
        await jobs.start({"goal": "hi", "docs_dir": str(tmp_path / "absent")})
    assert caught.value.field == "docs_dir"
    assert "does not exist" in caught.value.reason


async def test_docs_dir_that_is_a_file_is_refused(jobs: AgentJobs, tmp_path: Path) -> None:
    file = tmp_path / "notes.md"
    file.write_text("hello")
    with pytest.raises(InvalidJobRequest) as caught:
        await jobs.start({"goal": "hi", "docs_dir": str(file)})
    assert caught.value.field == "docs_dir"
    assert "not a directory" in caught.value.reason


@pytest.mark.parametrize(
    "key", ["", "has space", "-leading-dash", "quote'", "slash/key", "k" * 129, "ünïcode"]
)
async def test_bad_request_key_is_refused(jobs: AgentJobs, key: str) -> None:
    with pytest.raises(InvalidJobRequest) as caught:
        await jobs.start({"goal": "hi"}, request_key=key)
    assert caught.value.field == "request_key"


def test_valid_request_passes_and_docs_dir_becomes_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "docs").mkdir()
    monkeypatch.chdir(tmp_path)
    req = validate_request(
        {"goal": "hi", "tools": ["calculator", "search_docs"], "docs_dir": "docs"}
    )
    assert req.docs_dir == str((tmp_path / "docs").resolve())
    assert req.tools == ["calculator", "search_docs"]


@pytest.mark.parametrize(
    ("tenant", "state", "field"),
    [
        ("acme' OR WorkflowType = 'x", None, "tenant"),
        (None, "running' OR '1' = '1", "state"),
        (None, "RUNNING", "state"),
    ],
)
def test_list_filters_cannot_inject_query_syntax(
    tenant: str | None, state: str | None, field: str
) -> None:
    with pytest.raises(InvalidJobRequest) as caught:
        list_query(tenant=tenant, state=state)
    assert caught.value.field == field


def test_list_query_combines_filters() -> None:
    assert list_query(tenant="acme", state="completed") == (
        "WorkflowType = 'AgentLoopWorkflow' AND KeelTenant = 'acme' AND KeelState = 'completed'"
    )


async def test_list_refuses_bad_filter_before_touching_the_client(jobs: AgentJobs) -> None:
    with pytest.raises(InvalidJobRequest):
        await jobs.list_jobs(state="nope")


JOB_FIELDS = st.sampled_from(
    ["goal", "tenant", "user", "tools", "docs_dir", "budget", "mode", "notify_workflow", "x"]
)
ANY_VALUE = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=20), children, max_size=4)
    ),
    max_leaves=12,
)
BUDGET_VALUES = st.dictionaries(
    st.sampled_from(["max_steps", "max_tokens", "max_seconds", "max_cost_usd", "nope"]),
    ANY_VALUE,
    max_size=3,
)


@pytest.mark.property
@given(
    st.dictionaries(JOB_FIELDS, ANY_VALUE | BUDGET_VALUES, max_size=6),
    st.none() | st.text(min_size=1, max_size=40),
)
def test_any_malformed_request_is_refused_with_the_field_at_fault(
    raw: dict[str, Any], goal: str | None
) -> None:
    """Whatever a caller sends, validation answers with a request or a named field."""
    if goal is not None:  # half the cases have a plausible goal, so others fields get checked
        raw["goal"] = goal
    try:
        request = validate_request(raw)
    except InvalidJobRequest as err:
        assert err.field, err
        top = err.field.split(".")[0].split("[")[0]
        assert top in raw or top == "goal", (err.field, raw)  # goal is the one required field
        return
    event("accepted")
    assert isinstance(request, JobRequest)
    assert request.goal == raw["goal"]
