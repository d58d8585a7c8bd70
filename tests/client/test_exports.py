"""The public surface of ``client``: every exported name exists and the errors form the tree."""

from __future__ import annotations

import inspect

import pytest
from pydantic import ValidationError

import keel.client as client
from keel.client import errors
from keel.workflows.types import JobRequest


def test_every_name_in_all_is_exported() -> None:
    for name in client.__all__:
        assert hasattr(client, name), name
    assert sorted(client.__all__) == client.__all__


def test_all_names_the_documented_api() -> None:
    documented = {
        "AgentJobs",
        "connect",
        "JobRequest",
        "Budget",
        "JobStatus",
        "JobResult",
        "HumanInput",
        "JobSummary",
        "AgentJobError",
        "JobNotFound",
        "JobFailed",
        "InputRejected",
        "InvalidJobRequest",
        "JobTimeout",
        "ConnectionFailed",
        "KeelClientPlugin",
    }
    assert set(client.__all__) == documented


def test_exports_load_lazily_and_unknown_names_fail_clearly() -> None:
    import subprocess
    import sys

    code = (
        "import sys, keel.client as c; before = 'temporalio.client' in sys.modules; "
        "c.AgentJobs; print(before, 'temporalio.client' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["False", "True"]
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        client.Nope  # noqa: B018


def test_every_error_is_exported() -> None:
    defined = {
        name
        for name, obj in inspect.getmembers(errors, inspect.isclass)
        if issubclass(obj, Exception) and obj.__module__ == errors.__name__
    }
    assert defined <= set(client.__all__)


@pytest.mark.parametrize(
    "cls",
    [
        client.JobNotFound,
        client.JobFailed,
        client.InputRejected,
        client.InvalidJobRequest,
        client.JobTimeout,
        client.ConnectionFailed,
    ],
)
def test_errors_derive_directly_from_agent_job_error(cls: type[Exception]) -> None:
    assert cls.__bases__ == (client.AgentJobError,)
    assert cls.__name__ in (errors.__doc__ or "")  # the module docstring draws the tree


def test_agent_job_error_is_the_root() -> None:
    assert client.AgentJobError.__bases__ == (Exception,)


def test_error_attributes() -> None:
    failed = client.JobFailed("agent-job-1", "LLMAuthFailed", "bad key")
    assert (failed.job_id, failed.cause_type, failed.reason) == (
        "agent-job-1",
        "LLMAuthFailed",
        "bad key",
    )
    assert "LLMAuthFailed" in str(failed)
    assert client.JobNotFound("agent-job-2").job_id == "agent-job-2"
    assert client.InputRejected("agent-job-3", "no question is pending").reason.startswith("no")
    assert client.JobTimeout("agent-job-4", 2.5).timeout == 2.5
    unreachable = client.ConnectionFailed("localhost:7233", "connection refused")
    assert "localhost:7233" in str(unreachable) and "keel dev" in str(unreachable)


def test_invalid_job_request_from_validation_error_names_a_dotted_field() -> None:
    with pytest.raises(ValidationError) as caught:
        JobRequest.model_validate({"goal": "x", "budget": {"max_steps": 0}})
    err = client.InvalidJobRequest.from_validation_error(caught.value)
    assert err.field == "budget.max_steps"
    assert str(err).startswith("budget.max_steps: ")


def test_invalid_job_request_renders_list_indices() -> None:
    with pytest.raises(ValidationError) as caught:
        JobRequest.model_validate({"goal": "x", "tools": ["calculator", "bad tool"]})
    err = client.InvalidJobRequest.from_validation_error(caught.value)
    assert err.field == "tools[1]"
    assert not err.reason.startswith("Value error")


def test_invalid_job_request_counts_further_errors() -> None:
    with pytest.raises(ValidationError) as caught:
        JobRequest.model_validate({"goal": "", "tenant": "a b"})
    err = client.InvalidJobRequest.from_validation_error(caught.value)
    assert err.field == "goal" and "1 more error" in err.reason
