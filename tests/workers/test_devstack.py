"""``keel demo`` and ``keel dev`` as a user runs them: real processes, state survives restarts,
and a worker killed under ``keel dev`` is started again while the rest of the stack stays up."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

from keel.activities.store import notes_list_key
from keel.workers.commands import _print_stack, console
from keel.workers.devstack import DevStack
from keel.workers.supervisor import port_open
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
    ports = {name: free_port() for name in ("temporal", "ui", "redis", "sim", "codec", "api")}
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
        "--codec-port",
        str(ports["codec"]),
        "--api-port",
        str(ports["api"]),
    ]
    base_env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "REDIS_URL")}

    demo = keel("demo", "--no-stay", *flags, env=base_env)
    output = demo.stdout + demo.stderr
    assert demo.returncode == 0, output
    job_id = re.search(r"(agent-job-default:[0-9a-f]{32})", output)
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
        # The query on a closed job replays it on a worker, which may start polling a little
        # after the server answers (seconds, on a loaded machine): ask until one has.
        while True:
            status = keel("status", job_id.group(1), "--json", env=env, timeout=60)
            if status.returncode == 0 or "no poller seen" not in status.stderr:
                break
            assert time.monotonic() < deadline + 60, status.stderr
            time.sleep(0.5)
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)["state"] == "completed"
        store = redis.Redis(port=ports["redis"], decode_responses=True)
        assert store.llen(notes_list_key("default")) >= 1
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


def worker_pids(parent: int) -> list[int]:
    """PIDs of the ``keel worker`` children of ``parent``, from /proc."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            argv = (stat.parent / "cmdline").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent and b"keel.workers.cli" in argv and b"worker" in argv:
            pids.append(int(stat.parent.name))
    return pids


def wait_for(
    what: str,
    check: Callable[[], Any],
    dev: subprocess.Popen[bytes],
    log: Path,
    timeout: float = 90,
) -> Any:
    """What ``check()`` returns once it is truthy; fails if ``keel dev`` exits first."""
    deadline = time.monotonic() + timeout
    while not (found := check()):
        assert dev.poll() is None, f"keel dev exited while waiting for {what}:\n{log.read_text()}"
        assert time.monotonic() < deadline, f"no {what} after {timeout} s:\n{log.read_text()}"
        time.sleep(0.2)
    return found


def test_dev_restarts_a_killed_worker_and_keeps_the_stack_up(tmp_path: Path) -> None:
    ports = {name: free_port() for name in ("temporal", "ui", "redis", "sim", "codec", "api")}
    state = tmp_path / "state"
    flags = ["--state-dir", str(state)]
    for name, port in ports.items():
        flags += [f"--{name}-port", str(port)]
    base_env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("OPENAI_API_KEY", "REDIS_URL", "KEEL_TASK_QUEUE", "KEEL_TASK_QUEUES")
        and not k.startswith("TEMPORAL_")
    }
    console_log = tmp_path / "dev-console.log"
    with console_log.open("wb") as out:
        dev = subprocess.Popen(
            [sys.executable, "-m", "keel.workers.cli", "dev", *flags],
            env=base_env,
            stdout=subprocess.DEVNULL,
            stderr=out,
        )
    try:
        [first] = wait_for("worker", lambda: worker_pids(dev.pid), dev, console_log)
        assert all(port_open(p) for p in ports.values())  # it starts the worker last
        os.kill(first, signal.SIGKILL)

        restarted = "worker exited with -9; restarted (1)"
        wait_for("restart", lambda: restarted in console_log.read_text(), dev, console_log)
        [second] = wait_for("new worker", lambda: worker_pids(dev.pid), dev, console_log)
        assert second != first
        assert port_open(ports["temporal"]) and port_open(ports["redis"])
        assert restarted in (state / "logs" / "worker.log").read_text()

        # The new worker runs jobs: one submitted now completes.
        env = base_env | {"TEMPORAL_ADDRESS": f"127.0.0.1:{ports['temporal']}"}
        submitted = keel("submit", "Compute 2 + 2 with the calculator", "--json", env=env)
        assert submitted.returncode == 0, submitted.stderr
        job_id = json.loads(submitted.stdout)["job_id"]
        done = keel("result", job_id, "--json", "--timeout", "90", env=env, timeout=120)
        assert done.returncode == 0, done.stderr + console_log.read_text()
        assert json.loads(done.stdout)["outcome"] == "completed"
        assert dev.poll() is None and worker_pids(dev.pid) == [second]

        # Through the stack's HTTP API (the fast path keel dev exports), status and list say
        # what they say straight from Temporal.
        key = (state / "dev-api-key").read_text().strip()
        assert key.startswith("keel_") and key in console_log.read_text()  # printed, once made
        via_api = env | {"KEEL_API_URL": f"http://127.0.0.1:{ports['api']}", "KEEL_API_KEY": key}
        for argv in (["status", job_id, "--json"], ["list", "--json"]):
            direct, fast = keel(*argv, env=env), keel(*argv, env=via_api)
            assert direct.returncode == fast.returncode == 0, direct.stderr + fast.stderr
            assert json.loads(fast.stdout) == json.loads(direct.stdout), argv
        missing = keel("status", "agent-job-nope", "--json", env=via_api)
        assert missing.returncode == 1 and "not found" in missing.stderr
        bad = keel("list", "--state", "sleeping", env=via_api)
        assert bad.returncode == 2 and "state" in bad.stderr
        no_key = keel("list", "--json", env=via_api | {"KEEL_API_KEY": "keel_x_y"})
        assert no_key.returncode == 1 and "refused the key" in no_key.stderr
    finally:
        dev.send_signal(signal.SIGTERM)
        dev.wait(timeout=90)
    assert dev.returncode == 0, console_log.read_text()
    assert not any(port_open(p) for p in ports.values()), "dev left something running"


def test_the_dev_worker_may_fetch_from_the_simulator_only(tmp_path: Path) -> None:
    """Issue 13: http_get in ``keel dev`` reaches neither the UI, Temporal, codec, API nor Redis."""
    stack = DevStack(state_dir=tmp_path, sim_port=free_port())
    assert stack.http_allowed_hosts == f"127.0.0.1:{stack.sim_port}"  # one port, not "*"
    assert DevStack(state_dir=tmp_path, use_simulator=False).http_allowed_hosts == ""
