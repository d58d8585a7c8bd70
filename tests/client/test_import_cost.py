"""The client path stays light: importing it never loads the ``openai`` SDK.

Callers that only submit and watch jobs (an HTTP gateway, a script) should not pay for the model
SDK at import, nor need it installed. Checked in a fresh interpreter, since this test process
has imported everything already.
"""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize("module", ["keel.client", "keel.client.jobs", "keel.client.cli"])
def test_importing_the_client_does_not_import_openai(module: str) -> None:
    code = f"import sys, {module}; print(sorted(m for m in sys.modules if m.startswith('openai')))"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert done.stdout.strip() == "[]", done.stdout
