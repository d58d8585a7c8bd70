"""The process supervisor behind ``keel dev`` and ``keel bench``, with tiny real child processes.

Each child is a short Python script: it may listen on a port (so the supervisor knows it is up),
note its SIGTERM in a shared file (so the stop order shows), ignore SIGTERM, or exit at once.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from keel.workers.supervisor import PortInUse, RestartPolicy, Supervisor, free_port, port_open

CHILD = """
import pathlib, signal, socket, sys, time
name, port, notes, lifetime, on_term = sys.argv[1:6]
def stop(*_):
    time.sleep(0.5 if on_term == "linger" else 0)
    with pathlib.Path(notes).open("a") as f:
        f.write(name + "\\n")
    sys.exit(0)
signal.signal(signal.SIGTERM, signal.SIG_IGN if on_term == "ignore" else stop)
if int(port):
    listener = socket.socket()
    listener.bind(("127.0.0.1", int(port)))
    listener.listen()
deadline = time.monotonic() + float(lifetime)
while time.monotonic() < deadline:
    time.sleep(0.02)
sys.exit(3)
"""
"""A child that installs its SIGTERM handler (note its name in ``notes`` and exit 0, the same half
a second later, or ignore it), listens when given a port, lives ``lifetime`` seconds, exits 3."""
FAST = RestartPolicy(max_restarts=3, window_seconds=60.0, backoff_seconds=0.01)


def child(
    name: str, notes: Path, *, port: int = 0, lifetime: float = 60.0, on_term: str = "note"
) -> list[str]:
    return [sys.executable, "-c", CHILD, name, str(port), str(notes), str(lifetime), on_term]


def poll_until(sup: Supervisor, done: Callable[[str | None], bool]) -> str | None:
    """Poll as ``keel dev`` does until ``done(what the poll said)`` holds; return what it said."""
    deadline = time.monotonic() + 30
    while not done(dead := sup.poll()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)
    return dead


def test_children_stop_newest_first_each_after_the_next_has_exited(tmp_path: Path) -> None:
    # The newest child takes half a second to exit: signalled together, the others would
    # note their SIGTERM before it does.
    notes = tmp_path / "terminated.txt"
    with Supervisor(tmp_path / "logs") as sup:
        for name, on_term in (("server", "note"), ("cache", "note"), ("worker", "linger")):
            port = free_port()
            sup.start(name, child(name, notes, port=port, on_term=on_term), port=port)
            assert port_open(port)
        procs = [sup.process(name) for name in ("server", "cache", "worker")]
    assert notes.read_text().split() == ["worker", "cache", "server"]
    assert [p.returncode for p in procs] == [0, 0, 0]


def test_a_child_that_ignores_sigterm_is_killed_after_the_timeout(tmp_path: Path) -> None:
    port = free_port()
    sup = Supervisor(tmp_path, stop_timeout=0.5)
    proc = sup.start("stubborn", child("s", tmp_path / "n", port=port, on_term="ignore"), port=port)
    started = time.monotonic()
    sup.stop_all()
    assert proc.returncode == -signal.SIGKILL
    assert 0.4 < time.monotonic() - started < 10


def test_a_killed_restartable_child_is_restarted_and_says_so(tmp_path: Path) -> None:
    said: list[str] = []
    with Supervisor(tmp_path, notify=said.append) as sup:
        sup.start("server", child("server", tmp_path / "n"))
        first = sup.start("worker", child("worker", tmp_path / "n"), restart=FAST)
        os.kill(first.pid, signal.SIGKILL)
        assert poll_until(sup, lambda _: sup.restarts("worker") == 1) is None
        second = sup.process("worker")
        assert second.pid != first.pid and second.poll() is None
        assert said == ["worker exited with -9; restarted (1)"]
        assert sup.process("server").poll() is None
        record = json.loads((tmp_path / "worker.log").read_text().splitlines()[-1])
        assert record["event"] == said[0] and record["exit_code"] == -9

        os.kill(sup.process("server").pid, signal.SIGKILL)  # not restartable: the owner's call
        assert poll_until(sup, lambda dead: dead is not None) == "server"


def test_restarts_stop_at_the_cap_within_the_window(tmp_path: Path) -> None:
    said: list[str] = []
    with Supervisor(tmp_path, notify=said.append) as sup:
        sup.start("crashy", child("crashy", tmp_path / "n", lifetime=0), restart=FAST)
        assert poll_until(sup, lambda dead: dead is not None) == "crashy"
        assert sup.restarts("crashy") == 3
        assert said == [
            "crashy exited with 3; restarted (1)",
            "crashy exited with 3; restarted (2)",
            "crashy exited with 3; restarted (3)",
            "crashy exited with 3 after 3 restarts in 60 s; giving up",
        ]
        assert sup.poll() == "crashy"  # and it stays given up, without saying so again
        assert len(said) == 4


def test_restarts_older_than_the_window_do_not_count(tmp_path: Path) -> None:
    # Each run lives at least 0.5 s, longer than the window, so the one restart allowed within
    # the window is never used up.
    policy = RestartPolicy(max_restarts=1, window_seconds=0.3, backoff_seconds=0.01)
    with Supervisor(tmp_path) as sup:
        sup.start("flaky", child("flaky", tmp_path / "n", lifetime=0.5), restart=policy)
        deadline = time.monotonic() + 30
        while sup.restarts("flaky") < 3:
            assert sup.poll() is None
            assert time.monotonic() < deadline
            time.sleep(0.02)


def test_a_child_that_never_listens_fails_naming_its_log(tmp_path: Path) -> None:
    sup = Supervisor(tmp_path / "logs", start_timeout=0.5)
    with pytest.raises(RuntimeError, match=r"mute did not start; see .*logs/mute\.log"):
        sup.start("mute", child("mute", tmp_path / "n"), port=free_port())
    with pytest.raises(RuntimeError, match=r"quitter did not start; see .*quitter\.log"):
        sup.start("quitter", child("quitter", tmp_path / "n", lifetime=0), port=free_port())
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(PortInUse, match=f"port {port} for late is already in use"):
            sup.start("late", child("late", tmp_path / "n"), port=port)
    sup.stop_all()
