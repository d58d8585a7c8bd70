"""Which workflow runner a worker uses: unsandboxed unless KEEL_WORKFLOW_SANDBOX asks."""

from __future__ import annotations

import asyncio

import pytest
from temporalio.worker import UnsandboxedWorkflowRunner
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner

from keel.workers.main import run_event_loop, workflow_runner
from keel.workers.settings import WorkerSettings


def test_workers_run_unsandboxed_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KEEL_WORKFLOW_SANDBOX", raising=False)
    assert isinstance(workflow_runner(WorkerSettings()), UnsandboxedWorkflowRunner)


def test_the_sandbox_is_one_setting_away(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEEL_WORKFLOW_SANDBOX", "true")
    assert isinstance(workflow_runner(WorkerSettings()), SandboxedWorkflowRunner)
    assert isinstance(
        workflow_runner(WorkerSettings(workflow_sandbox=False)), UnsandboxedWorkflowRunner
    )


async def _loop_module() -> str:
    return type(asyncio.get_running_loop()).__module__


def test_the_worker_runs_on_uvloop_unless_turned_off() -> None:
    """``KEEL_UVLOOP`` (on by default) picks the worker's event loop; off, asyncio's own."""
    assert run_event_loop(_loop_module(), use_uvloop=True).startswith("uvloop")
    assert run_event_loop(_loop_module(), use_uvloop=False).startswith("asyncio")
