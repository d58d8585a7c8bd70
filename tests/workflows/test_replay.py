"""Replay recorded histories of every loop path: a change that breaks determinism fails here.

The histories were recorded by the end-to-end tests (``replay_own_history(..., record_as=...)``
writes one when it is missing). Never re-record one that a running job may still match: when a
change alters the commands a run issues, put it behind ``workflow.patched("short-id")``, keep
the old files under a prefix naming the patch (``before-short-id.happy_path.json``), add the
prefix to ``PATCHES``, and record new ones. The test then replays both sets, so the old branch
stays until the patch is retired (README, "Rolling out a new worker build").
"""

from __future__ import annotations

import base64
import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
from temporalio.api.common.v1 import Payload
from temporalio.client import WorkflowHistory
from temporalio.worker import Replayer, UnsandboxedWorkflowRunner, WorkflowRunner
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner
from temporalio.workflow import NondeterminismError

from keel.activities.converter import DATA_CONVERTER, decompress_payload
from keel.workers.registry import WORKFLOWS

HISTORY_DIR = Path(__file__).parent / "histories"
HISTORIES = sorted(HISTORY_DIR.glob("*.json"))
EXPECTED = {"happy_path", "refine_x2", "budget_exhausted", "ask_answered", "cancelled"}
PATCHES: tuple[str, ...] = ()
"""Prefixes of histories recorded by older workflow code that new code must still replay.
Empty: Keel 0.1 has no patch. The ten added while it was built (``router-first``,
``preview-commit`` and the rest) were retired with their old branches before the first release,
as ``lean-history`` was, when no job outside the tests had run them."""
COMPRESSED = base64.b64encode(b"binary/keel-z1").decode()
"""How a compressed payload's encoding reads in a history's JSON."""

RUNNERS: dict[str, WorkflowRunner] = {
    "sandboxed": SandboxedWorkflowRunner(),
    "unsandboxed": UnsandboxedWorkflowRunner(),  # how `keel worker` runs workflows by default
}


def load(name: str, data: dict[str, Any] | None = None) -> WorkflowHistory:
    path = HISTORY_DIR / f"{name}.json"
    data = dict(data or json.loads(path.read_text()))
    # A session derives its turns' IDs from its own: replay it under the ID it ran with.
    workflow_id = data.pop("keel_workflow_id", name)
    return WorkflowHistory.from_json(workflow_id, data)


def replayer(runner: WorkflowRunner | None = None, **overrides: Any) -> Replayer:
    converter = dataclasses.replace(DATA_CONVERTER, **overrides)
    return Replayer(
        workflows=WORKFLOWS,
        data_converter=converter,
        workflow_runner=runner or UnsandboxedWorkflowRunner(),
    )


def test_every_loop_path_has_a_recorded_history() -> None:
    stems = {p.stem for p in HISTORIES}
    assert stems >= EXPECTED
    for patch in PATCHES:
        assert stems >= {f"{patch}.{name}" for name in EXPECTED}


def test_current_histories_are_lean() -> None:
    """No patch marker anywhere; a job's loop has no local activity, and compressed payloads."""
    for path in HISTORIES:
        assert '"core_patch"' not in path.read_text(), path.stem
    for name in EXPECTED:
        text = (HISTORY_DIR / f"{name}.json").read_text()
        assert '"core_local_activity"' not in text, name
        assert COMPRESSED in text, name


@pytest.mark.parametrize("runner", RUNNERS.values(), ids=list(RUNNERS))
@pytest.mark.parametrize("path", HISTORIES, ids=[p.stem for p in HISTORIES])
async def test_replay(path: Path, runner: WorkflowRunner) -> None:
    await replayer(runner).replay_workflow(load(path.stem))


async def test_a_changed_command_sequence_fails_replay(monkeypatch: pytest.MonkeyPatch) -> None:
    """The replay test can fail: code that schedules the same calls differently is caught.

    The happy path ran its two tool calls together; with one call per wave the workflow would
    schedule the second only after the first finished, which its history contradicts.
    """
    from keel.workflows import _acting

    monkeypatch.setattr(_acting, "MAX_PARALLEL", 1)
    with pytest.raises(NondeterminismError):
        await replayer().replay_workflow(load("happy_path"))


def _decompressed(node: Any) -> Any:
    """A history's JSON with every compressed payload written as plain JSON instead."""
    if isinstance(node, list):
        return [_decompressed(item) for item in node]
    if not isinstance(node, dict):
        return node
    if node.get("metadata", {}).get("encoding") == COMPRESSED:
        payload = Payload(metadata={"encoding": b"binary/keel-z1"})
        payload.data = base64.b64decode(node["data"])
        plain = decompress_payload(payload)
        return {
            "metadata": {"encoding": base64.b64encode(plain.metadata["encoding"]).decode()},
            "data": base64.b64encode(plain.data).decode(),
        }
    return {key: _decompressed(value) for key, value in node.items()}


@pytest.mark.parametrize("name", sorted(EXPECTED))
async def test_histories_with_plain_payloads_still_replay(name: str) -> None:
    """Jobs recorded before payloads were compressed (``json/plain``) read as before."""
    plain = _decompressed(json.loads((HISTORY_DIR / f"{name}.json").read_text()))
    assert COMPRESSED not in json.dumps(plain)
    await replayer().replay_workflow(load(name, plain))


async def test_compressed_histories_need_the_codec() -> None:
    """Replay decodes every payload: without Keel's codec a current history cannot be read."""
    result = await replayer(payload_codec=None).replay_workflow(
        load("happy_path"), raise_on_replay_failure=False
    )
    assert "Unknown payload encoding binary/keel-z1" in str(result.replay_failure)
