"""The client's contract (``AgentLoop``) and the workflow (``AgentLoopWorkflow``) agree exactly."""

from __future__ import annotations

import typing

from temporalio.workflow import _Definition  # the SDK's own reading of a workflow class

from keel.workflows.agent_loop import AgentLoopWorkflow
from keel.workflows.contract import AgentLoop


def hints(fn: object) -> dict[str, object]:
    return typing.get_type_hints(fn)


def test_same_workflow_type_and_run_signature() -> None:
    contract, impl = (
        _Definition.must_from_class(AgentLoop),
        _Definition.must_from_class(AgentLoopWorkflow),
    )
    assert contract.name == impl.name == "AgentLoopWorkflow"
    assert hints(AgentLoop.run) == hints(AgentLoopWorkflow.run)


def test_every_handler_matches_in_name_and_types() -> None:
    contract, impl = (
        _Definition.must_from_class(AgentLoop),
        _Definition.must_from_class(AgentLoopWorkflow),
    )
    assert set(contract.queries) == set(impl.queries) == {"get_status"}
    assert set(contract.updates) == set(impl.updates) == {"answer", "approve", "reject"}
    assert set(contract.signals) == set(impl.signals) == {"answer_signal"}
    for name in ("get_status", "answer", "answer_signal", "approve", "reject"):
        assert hints(getattr(AgentLoop, name)) == hints(getattr(AgentLoopWorkflow, name)), name


def test_the_contract_does_not_run() -> None:
    import asyncio

    import pytest

    with pytest.raises(TypeError, match="contract"):
        AgentLoop().get_status()
    with pytest.raises(TypeError, match="contract"):
        asyncio.run(AgentLoop().run(None))  # type: ignore[arg-type]


def test_the_session_contract_matches_the_session_workflow() -> None:
    from keel.workflows.contract import Session
    from keel.workflows.session import SessionWorkflow

    contract, impl = (
        _Definition.must_from_class(Session),
        _Definition.must_from_class(SessionWorkflow),
    )
    assert contract.name == impl.name == "SessionWorkflow"
    assert hints(Session.run) == hints(SessionWorkflow.run)
    assert set(contract.queries) == set(impl.queries) == {"get_session"}
    assert set(contract.updates) == set(impl.updates) == {"send_message", "end"}
    for name in ("get_session", "send_message", "end"):
        assert hints(getattr(Session, name)) == hints(getattr(SessionWorkflow, name)), name
