"""Replay recorded histories of every loop path: a change that breaks determinism fails here.

The histories were recorded by the end-to-end tests (``replay_own_history(..., record_as=...)``
writes one when it is missing). Re-record only on purpose, together with a ``workflow.patched``
change: delete the file and run the test that records it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from temporalio.client import WorkflowHistory
from temporalio.worker import Replayer

from activities.converter import DATA_CONVERTER
from workers.registry import WORKFLOWS

HISTORIES = sorted((Path(__file__).parent / "histories").glob("*.json"))
EXPECTED = {"happy_path", "refine_x2", "budget_exhausted", "ask_answered", "cancelled"}


def test_every_loop_path_has_a_recorded_history() -> None:
    assert {p.stem for p in HISTORIES} >= EXPECTED


@pytest.mark.parametrize("path", HISTORIES, ids=[p.stem for p in HISTORIES])
async def test_replay(path: Path) -> None:
    history = WorkflowHistory.from_json(path.stem, json.loads(path.read_text()))
    replayer = Replayer(workflows=WORKFLOWS, data_converter=DATA_CONVERTER)
    await replayer.replay_workflow(history)
