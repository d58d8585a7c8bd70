"""``keel demo`` and ``keel dev`` as a user runs them: real processes, state survives restarts."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import redis

from keel.workers.cli import _print_stack, console
from keel.workers.devstack import DevStack, port_open
from tests.conftest import free_port


def keel(*args: str, env: dict[str, str] | None = None, timeout: float = 180):  # type: ignore[no-untyped-def]
    return subprocess.run(
        [sys.executable, "-m", "keel.workers.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def test_demo_then_dev_restart_keeps_jobs_and_notes(tmp_path: Path) -> None:
    ports = {name: free_port() for name in ("temporal", "ui", "redis", "sim")}
    flags = [
        "--state-dir",
        str(tmp_path / "state"),
        "--temporal-port",
        str(ports["temporal"]),
        "--ui-port",
        str(ports["ui"]),
        "--redis-port",
        str(ports["redis"]),
        "--sim-port",
        str(ports["sim"]),
    ]
    base_env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "REDIS_URL")}

    demo = keel("demo", "--no-stay", *flags, env=base_env)
    output = demo.stdout + demo.stderr
    assert demo.returncode == 0, output
    job_id = re.search(r"(agent-job-[0-9a-f]{32})", output)
    assert job_id, output
    assert f"http://127.0.0.1:{ports['ui']}" in output
    assert "completed" in output
    assert not any(port_open(p) for p in ports.values()), "demo left something running"

    # Restart the stack on the same state: the job and its note are still there.
    dev = subprocess.Popen(
        [sys.executable, "-m", "keel.workers.cli", "dev", *flags],
        env=base_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while not all(port_open(p) for p in (ports["temporal"], ports["redis"])):
            assert time.monotonic() < deadline and dev.poll() is None
            time.sleep(0.2)
        env = base_env | {"TEMPORAL_ADDRESS": f"127.0.0.1:{ports['temporal']}"}
        status = keel("status", job_id.group(1), "--json", env=env, timeout=60)
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)["state"] == "completed"
        store = redis.Redis(port=ports["redis"], decode_responses=True)
        assert store.llen("keel:notes:default") >= 1
        store.close()
    finally:
        dev.send_signal(signal.SIGTERM)
        dev.wait(timeout=60)
    assert dev.returncode == 0
    assert not any(port_open(p) for p in ports.values()), "dev left something running"


def test_the_stack_banner_never_shows_a_redis_password(tmp_path: Path) -> None:
    own = DevStack(state_dir=tmp_path, redis_url="redis://:hunter2-pass@redis.internal:6380/0")
    started = DevStack(state_dir=tmp_path, redis_port=6390)
    with console.capture() as shown:
        _print_stack(own)
    assert "redis.internal:6380/0" in shown.get() and "hunter2" not in shown.get()
    with console.capture() as shown:
        _print_stack(started)
    assert "export REDIS_URL=redis://127.0.0.1:6390/0" in shown.get()
