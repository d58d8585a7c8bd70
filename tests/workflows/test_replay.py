"""Replay recorded histories of every loop path: a change that breaks determinism fails here.

The histories were recorded by the end-to-end tests (``replay_own_history(..., record_as=...)``
writes one when it is missing). Never re-record one that a running job may still match: when a
change alters the commands a run issues, put it behind ``workflow.patched``, keep the old files
under a prefix naming the patch (``before-lean-history.*`` were recorded before the
``lean-history`` patch and must keep replaying while such runs may exist), and record new ones.
A change of payload format is kept the same way: ``plain-payloads.*`` were recorded before
payloads were compressed (``binary/keel-z1``), and must keep reading.
"""

from __future__ import annotations

import base64
import dataclasses
import json
from pathlib import Path

import pytest
from temporalio.client import WorkflowHistory
from temporalio.worker import Replayer, UnsandboxedWorkflowRunner, WorkflowRunner
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner
from temporalio.workflow import NondeterminismError

from activities.converter import DATA_CONVERTER
from workers.registry import WORKFLOWS

HISTORY_DIR = Path(__file__).parent / "histories"
HISTORIES = sorted(HISTORY_DIR.glob("*.json"))
EXPECTED = {"happy_path", "refine_x2", "budget_exhausted", "ask_answered", "cancelled"}
PATCHES = ("before-lean-history", "plain-payloads")
"""Prefixes of histories recorded by older workflow code, or with an older payload format,
that new code must still replay."""
COMPRESSED = base64.b64encode(b"binary/keel-z1").decode()
"""How a compressed payload's encoding reads in a history's JSON."""


def test_every_loop_path_has_a_recorded_history() -> None:
    stems = {p.stem for p in HISTORIES}
    assert stems >= EXPECTED
    for patch in PATCHES:
        assert stems >= {f"{patch}.{name}" for name in EXPECTED}


def test_current_histories_are_lean() -> None:
    """Current histories carry the patch marker, no local activity, compressed payloads."""
    for name in EXPECTED:
        text = (HISTORY_DIR / f"{name}.json").read_text()
        assert '"core_patch"' in text, name
        assert '"core_local_activity"' not in text, name
        assert COMPRESSED in text, name
    for name in EXPECTED:
        old = (HISTORY_DIR / f"before-lean-history.{name}.json").read_text()
        assert '"core_local_activity"' in old, name
        plain = (HISTORY_DIR / f"plain-payloads.{name}.json").read_text()
        assert COMPRESSED not in plain and '"core_patch"' in plain, name


RUNNERS: dict[str, WorkflowRunner] = {
    "sandboxed": SandboxedWorkflowRunner(),
    "unsandboxed": UnsandboxedWorkflowRunner(),  # how `keel worker` runs workflows by default
}


@pytest.mark.parametrize("runner", RUNNERS.values(), ids=list(RUNNERS))
@pytest.mark.parametrize("path", HISTORIES, ids=[p.stem for p in HISTORIES])
async def test_replay(path: Path, runner: WorkflowRunner) -> None:
    history = WorkflowHistory.from_json(path.stem, json.loads(path.read_text()))
    replayer = Replayer(workflows=WORKFLOWS, data_converter=DATA_CONVERTER, workflow_runner=runner)
    await replayer.replay_workflow(history)


async def test_the_patch_is_what_keeps_old_histories_replaying(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without ``workflow.patched("lean-history")``, a pre-patch history no longer replays.

    The replay tests above can fail: code that takes the new branch unconditionally issues
    different commands than a pre-patch run recorded, and the replayer says so.
    """
    from workflows import agent_loop

    name = "before-lean-history.happy_path"
    history = WorkflowHistory.from_json(
        name, json.loads((HISTORY_DIR / f"{name}.json").read_text())
    )
    monkeypatch.setattr(agent_loop.workflow, "patched", lambda _patch_id: True)
    replayer = Replayer(
        workflows=WORKFLOWS,
        data_converter=DATA_CONVERTER,
        workflow_runner=UnsandboxedWorkflowRunner(),
    )
    with pytest.raises(NondeterminismError):
        await replayer.replay_workflow(history)


async def test_compressed_histories_need_the_codec() -> None:
    """Replay decodes every payload: without Keel's codec a current history cannot be read."""
    history = WorkflowHistory.from_json(
        "happy_path", json.loads((HISTORY_DIR / "happy_path.json").read_text())
    )
    no_codec = dataclasses.replace(DATA_CONVERTER, payload_codec=None)
    replayer = Replayer(
        workflows=WORKFLOWS, data_converter=no_codec, workflow_runner=UnsandboxedWorkflowRunner()
    )
    result = await replayer.replay_workflow(history, raise_on_replay_failure=False)
    assert "Unknown payload encoding binary/keel-z1" in str(result.replay_failure)
