"""A job explains itself in the Temporal Web UI, read by a real browser.

Starts ``keel codec-server`` and a dev server whose UI uses it, runs jobs, and renders two UI
pages in headless Chromium (``--dump-dom``, which runs the UI's JavaScript until the page
settles): the job's page must show each activity's summary on the timeline and the job's input
and result as JSON (decoded by the codec server from the browser), and the workflow list
filtered with a query on Keel's search attributes must list exactly the job it should.
``scripts/test.sh`` installs Debian's ``chromium`` when it can; without a browser the test is
skipped and says why.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import urllib.parse
from collections.abc import AsyncIterator
from html.parser import HTMLParser

import pytest
from temporalio.testing import WorkflowEnvironment

from keel.client import AgentJobs, JobRequest
from tests.conftest import free_port, start_dev_server, unique, wait_port

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
RENDER_ATTEMPTS = 3
"""The UI loads its data asynchronously; a page missing it is rendered again."""

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed")


class _Text(HTMLParser):
    """The visible text of an HTML document (scripts and styles left out)."""

    def __init__(self) -> None:
        super().__init__()
        self.parts: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag: str, attrs: object) -> None:
        if tag in ("script", "style"):
            self._skip += 1

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style") and self._skip:
            self._skip -= 1

    def handle_data(self, data: str) -> None:
        if not self._skip and data.strip():
            self.parts.append(data.strip())


def page_text(url: str, must_show: list[str]) -> str:
    """Render ``url`` in headless Chromium and return its text once it shows ``must_show``."""
    assert CHROMIUM is not None
    text = ""
    for _ in range(RENDER_ATTEMPTS):
        dom = subprocess.run(
            [
                CHROMIUM,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",  # containers often give /dev/shm only 64 MB
                "--no-first-run",
                "--disable-background-networking",
                "--window-size=1600,1000",
                "--virtual-time-budget=30000",
                "--dump-dom",
                url,
            ],
            capture_output=True,
            text=True,
            timeout=90,
            check=True,
        ).stdout
        parser = _Text()
        parser.feed(dom)
        text = "\n".join(parser.parts)
        if all(s in text for s in must_show):
            return text
    missing = [s for s in must_show if s not in text]
    raise AssertionError(f"{url} never showed {missing}; it showed: {text[-1500:]!r}")


@pytest.fixture(scope="module")
async def ui_env() -> AsyncIterator[tuple[WorkflowEnvironment, str]]:
    """A dev server of its own, with the Web UI on a free port using a codec server."""
    port, codec_port = free_port(), free_port()
    codec = subprocess.Popen(
        [sys.executable, "-m", "keel.workers.cli", "codec-server", f"--port={codec_port}"]
        + [f"--cors-origin=http://{host}:{port}" for host in ("127.0.0.1", "localhost")],
    )
    try:
        wait_port(codec_port, codec, "keel codec-server")
        environment = await start_dev_server(
            f"--ui-codec-endpoint=http://127.0.0.1:{codec_port}", ui=True, ui_port=port
        )
        yield environment, f"http://127.0.0.1:{port}/namespaces/{environment.client.namespace}"
        await environment.shutdown()
    finally:
        codec.terminate()
        codec.wait(timeout=10)


async def test_the_ui_shows_summaries_and_decoded_payloads_and_filters_by_keel_attributes(
    ui_env: tuple[WorkflowEnvironment, str], make_worker
) -> None:
    env, ui = ui_env
    tenant = unique("acme")
    async with make_worker(env.client) as worker:
        jobs = AgentJobs(env.client, task_queue=worker.task_queue)
        done = await jobs.start(JobRequest(goal="What is 6 * 7? use calculator", tenant=tenant))
        await jobs.result(done, timeout=60)
        waiting = await jobs.start(JobRequest(goal="Summarise it [sim: ask]", tenant=tenant))
        for _ in range(100):
            if (await jobs.status(waiting)).state == "waiting_for_input":
                break
            await asyncio.sleep(0.2)
        else:
            raise AssertionError("the second job never asked its question")

        job_page = page_text(
            f"{ui}/workflows/{done}",
            [
                "plan · iteration 1",
                "tool calculator",
                "answer · iteration 1",
                "verify · iteration 1",
                # Input and result are compressed in history; only a decoded payload reads so.
                '"request"',
                '"outcome"',
            ],
        )
        assert done in job_page

        query = f"KeelTenant = '{tenant}' AND KeelState = 'waiting_for_input'"
        listed = page_text(f"{ui}/workflows?query={urllib.parse.quote(query)}", [waiting])
        assert done not in listed
        await jobs.cancel(waiting)
