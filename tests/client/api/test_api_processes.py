"""``keel api --workers N``: several processes behind one port share exact rate limits and
report their metrics summed, and ``keel list`` through the API still reads a plain list."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis.asyncio as aioredis
from prometheus_client.parser import text_string_to_metric_families
from temporalio.testing import WorkflowEnvironment

from keel.client.api.keys import ApiKeys
from tests.conftest import free_port, unique, wait_port

PROCESSES = 2


def api_processes(pid: int) -> list[int]:
    """Live API processes the ``keel api`` supervisor ``pid`` spawned (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z" and b"spawn_main" in cmdline:
            found.append(int(stat.parent.name))
    return found


@pytest.fixture(scope="module")
def api_server(
    env: WorkflowEnvironment, redis_url: str
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """``keel api --workers 2`` on one port, jobs pinned to a queue no worker polls."""
    port = free_port()
    proc_env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"} | {
        "TEMPORAL_ADDRESS": env.client.service_client.config.target_host,
        "TEMPORAL_NAMESPACE": env.client.namespace,
        "REDIS_URL": redis_url,
        "KEEL_API_RATE_PER_KEY": "50/10",
        "KEEL_API_RATE_PER_TENANT": "100000/10",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "keel.workers.cli", "api", f"--port={port}",
         f"--workers={PROCESSES}", f"--task-queue={unique('idle')}"],
        env=proc_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_port(port, proc, "keel api --workers")
        yield f"http://127.0.0.1:{port}", proc
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


async def ready(
    base: str, http: httpx.AsyncClient, processes: int, proc: subprocess.Popen[bytes]
) -> None:
    """Wait until every process has connected (each answers /readyz once its startup ran)."""
    for _ in range(200):
        if (
            len(api_processes(proc.pid)) >= processes
            and (await http.get(base + "/readyz")).status_code == 200
        ):
            return
        await asyncio.sleep(0.1)
    raise AssertionError("keel api processes did not become ready")


async def test_processes_share_one_port_exact_limits_and_metrics(
    api_server: tuple[str, subprocess.Popen[bytes]], redis_client: aioredis.Redis
) -> None:
    base, proc = api_server
    key, _ = await ApiKeys(redis_client).create(unique("acme"))
    headers = {"Authorization": f"Bearer {key}"}
    path = "/v1/jobs/agent-job-someone-else:x"  # a 404 decided before any call to Temporal
    async with httpx.AsyncClient(
        timeout=10, limits=httpx.Limits(max_keepalive_connections=0)
    ) as http:
        await ready(base, http, PROCESSES, proc)
        workers = api_processes(proc.pid)
        responses = await asyncio.gather(
            *(http.get(base + path, headers=headers) for _ in range(150))
        )
        codes = [r.status_code for r in responses]
        assert codes.count(404) == 50, codes  # exactly the limit, across the processes
        assert codes.count(429) == 100, [
            (r.status_code, r.text) for r in responses if r.status_code not in (404, 429)
        ]
        # Whichever process answers the scrape, it reports every process's requests.
        scrapes = [(await http.get(base + "/metrics")).text for _ in range(4)]
    assert len(workers) == PROCESSES
    for text in scrapes:
        counts = {
            sample.labels["status"]: sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == "keel_api_requests_total"
            and sample.labels.get("route") == "/v1/jobs/{job_id}"
        }
        assert counts == {"404": 50.0, "429": 100.0}, counts


async def test_keel_list_reads_the_api_page_as_before(
    api_server: tuple[str, subprocess.Popen[bytes]], redis_client: aioredis.Redis
) -> None:
    base, proc = api_server
    tenant = unique("listed")
    key, _ = await ApiKeys(redis_client).create(tenant)
    async with httpx.AsyncClient(timeout=10) as http:
        await ready(base, http, PROCESSES, proc)
        started = await http.post(
            base + "/v1/jobs", json={"goal": "idle"}, headers={"Authorization": f"Bearer {key}"}
        )
    assert started.status_code == 202, started.text
    job_id = started.json()["job_id"]
    env = os.environ | {"KEEL_API_URL": base, "KEEL_API_KEY": key}
    for _ in range(50):
        done = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "keel.workers.cli", "list", "--json"],
            env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        rows = json.loads(done.stdout)
        if rows:
            break
        await asyncio.sleep(0.1)
    assert [row["job_id"] for row in rows] == [job_id]


async def test_sigterm_stops_every_process(
    api_server: tuple[str, subprocess.Popen[bytes]],
) -> None:
    """Last in this module: it stops the module's server."""
    base, proc = api_server
    async with httpx.AsyncClient(timeout=10) as http:
        await ready(base, http, PROCESSES, proc)
    workers = api_processes(proc.pid)
    proc.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(proc.wait, 30) == 0
    assert len(workers) == PROCESSES
    assert not any(Path(f"/proc/{pid}").exists() for pid in workers)
