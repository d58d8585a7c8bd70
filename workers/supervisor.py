"""Child processes started by name, restarted when they may be, and stopped newest first.

``keel dev`` (``workers.devstack``) and ``keel bench`` (``workers.bench.stack``) run their servers
and workers through one ``Supervisor``. Each child writes its output to ``<log_dir>/<name>.log``;
a child given a port counts as started once it accepts connections there. A child declared
restartable (the dev stack's worker) is started again when it dies, after a short backoff, until
it dies too often within a window; any other death is the owner's to act on (``poll`` names it).
Stopping is SIGTERM, then SIGKILL after a timeout, newest child first, so a worker drains while
the Temporal server it talks to is still up.

The helpers every starter of processes needs live here too: ``find_binary``, ``port_open`` and
``free_port``.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

START_TIMEOUT_SECONDS = 60.0
"""How long a child given a port may take to accept connections there."""
STOP_TIMEOUT_SECONDS = 20.0
"""How long a child may take to exit after SIGTERM before it is killed."""


def find_binary(name: str) -> str:
    """A binary installed beside this interpreter (the venv's bin), else on PATH.

    Raises:
        FileNotFoundError: If it is in neither place.
    """
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} not found; reinstall Keel (pip install -e .)")
    return found


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    """True when something accepts connections on the port."""
    try:
        socket.create_connection((host, port), timeout=0.2).close()
        return True
    except OSError:
        return False


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PortInUse(RuntimeError):
    """Something already listens on the port a child is about to be started for."""


@dataclass(frozen=True)
class RestartPolicy:
    """When a dead child is started again: after a backoff, and only so often."""

    max_restarts: int = 5
    """Restarts allowed within ``window_seconds``; the next death within it stops the restarts."""
    window_seconds: float = 60.0
    """The sliding window ``max_restarts`` counts over."""
    backoff_seconds: float = 0.5
    """Delay before a restart; it doubles with each restart already in the window."""
    max_backoff_seconds: float = 5.0
    """The longest delay before a restart."""

    def backoff(self, recent: int) -> float:
        """The delay before the next restart, given the restarts already in the window."""
        return min(self.max_backoff_seconds, self.backoff_seconds * 2.0**recent)


@dataclass
class _Child:
    """One named child process, how to start it again, and its restarts so far."""

    name: str
    cmd: list[str]
    env: dict[str, str] | None
    port: int | None
    policy: RestartPolicy | None
    proc: subprocess.Popen[bytes]
    restarts: int = 0
    recent: deque[float] = field(default_factory=deque)
    """Monotonic times of the restarts still inside the policy's window."""
    due: float | None = None
    """Monotonic time a scheduled restart is due at, while the child is down."""
    given_up: bool = False


class Supervisor:
    """Named child processes, each logging to its own file in ``log_dir``.

    Args:
        log_dir: Where ``<name>.log`` of each child goes (created when the first child starts).
        cwd: Working directory of the children (None: this process's).
        notify: Told, in one line, when a child is restarted or its restarts are given up.
        start_timeout: Seconds a child given a port may take to accept connections.
        stop_timeout: Seconds a child may take to exit after SIGTERM before it is killed.
    """

    def __init__(
        self,
        log_dir: Path,
        *,
        cwd: Path | None = None,
        notify: Callable[[str], object] | None = None,
        start_timeout: float = START_TIMEOUT_SECONDS,
        stop_timeout: float = STOP_TIMEOUT_SECONDS,
    ) -> None:
        self.log_dir = log_dir
        self._cwd = cwd
        self._notify = notify
        self._start_timeout = start_timeout
        self._stop_timeout = stop_timeout
        self._children: dict[str, _Child] = {}  # in start order; stop_all goes backwards

    def __enter__(self) -> Supervisor:
        return self

    def __exit__(self, *_: object) -> None:
        self.stop_all()

    def start(
        self,
        name: str,
        cmd: list[str],
        *,
        env: dict[str, str] | None = None,
        port: int | None = None,
        restart: RestartPolicy | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start ``cmd`` as the child ``name``; with ``port``, wait until it listens there.

        Args:
            name: Unique among the running children; names the log file.
            cmd: The program and its arguments.
            env: The child's whole environment (None: this process's).
            port: A port on 127.0.0.1 the child accepts connections on once it is up.
            restart: Start the child again under this policy when it dies (None: never).

        Returns:
            The child process.

        Raises:
            ValueError: If a child of that name is running.
            PortInUse: If something already listens on ``port``.
            RuntimeError: If the child exits or does not listen within the start timeout (it is
                stopped; the message names its log file).
        """
        if name in self._children:
            raise ValueError(f"a child named {name} is already running")
        if port is not None and port_open(port):
            raise PortInUse(f"port {port} for {name} is already in use")
        child = _Child(name, cmd, env, port, restart, self._spawn(name, cmd, env))
        self._children[name] = child
        self._await_port(child)
        return child.proc

    def log_path(self, name: str) -> Path:
        """Where the child called ``name`` writes its output."""
        return self.log_dir / f"{name}.log"

    def process(self, name: str) -> subprocess.Popen[bytes]:
        """The current process of the running child ``name`` (a new one after each restart)."""
        return self._children[name].proc

    def restarts(self, name: str) -> int:
        """How many times the running child ``name`` has been restarted."""
        return self._children[name].restarts

    def poll(self) -> str | None:
        """Restart the restartable children that died, once their backoff has passed.

        Call it every so often (``keel dev`` does twice a second).

        Returns:
            The name of a child that exited and will not be started again (it is not
            restartable, its restarts were given up, or it failed to start again), else None.
        """
        now = time.monotonic()
        for child in list(self._children.values()):
            code = child.proc.poll()
            if code is None:
                continue
            if child.policy is None or not self._schedule(child, child.policy, code, now):
                return child.name
            if child.due is not None and now >= child.due:
                try:
                    self._restart(child, code)
                except RuntimeError:
                    return child.name
        return None

    def stop(self, *names: str, timeout: float | None = None) -> None:
        """Stop the named children together: SIGTERM to each, SIGKILL to any left at the timeout.

        Args:
            names: Children to stop; names not running are ignored.
            timeout: Seconds they get to exit (None: the supervisor's stop timeout).
        """
        children = [self._children.pop(name) for name in names if name in self._children]
        for child in children:
            if child.proc.poll() is None:
                child.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + (self._stop_timeout if timeout is None else timeout)
        for child in children:
            try:
                child.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.proc.kill()
                child.proc.wait()

    def stop_all(self, timeout: float | None = None) -> None:
        """Stop every child, newest first, each once the ones started after it have exited.

        Args:
            timeout: Seconds each child gets to exit (None: the supervisor's stop timeout).
        """
        for name in reversed(list(self._children)):
            self.stop(name, timeout=timeout)

    def _spawn(
        self, name: str, cmd: list[str], env: dict[str, str] | None
    ) -> subprocess.Popen[bytes]:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with self.log_path(name).open("ab") as out:
            return subprocess.Popen(
                cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=self._cwd,
            )

    def _await_port(self, child: _Child) -> None:
        if child.port is None:
            return
        deadline = time.monotonic() + self._start_timeout
        while not port_open(child.port):
            if child.proc.poll() is not None or time.monotonic() > deadline:
                self.stop(child.name)
                raise RuntimeError(f"{child.name} did not start; see {self.log_path(child.name)}")
            time.sleep(0.05)

    def _schedule(self, child: _Child, policy: RestartPolicy, code: int, now: float) -> bool:
        """Schedule the restart of a dead child unless it died too often; False if it did."""
        if child.given_up:
            return False
        if child.due is not None:
            return True
        while child.recent and now - child.recent[0] > policy.window_seconds:
            child.recent.popleft()
        if len(child.recent) >= policy.max_restarts:
            child.given_up = True
            restarts = f"{len(child.recent)} restarts in {policy.window_seconds:g} s"
            self._report(
                child, f"{child.name} exited with {code} after {restarts}; giving up", code
            )
            return False
        child.due = now + policy.backoff(len(child.recent))
        return True

    def _restart(self, child: _Child, code: int) -> None:
        child.due = None
        child.restarts += 1
        child.recent.append(time.monotonic())
        self._report(child, f"{child.name} exited with {code}; restarted ({child.restarts})", code)
        child.proc = self._spawn(child.name, child.cmd, child.env)
        self._await_port(child)

    def _report(self, child: _Child, message: str, code: int) -> None:
        """Tell ``notify``, and append a JSON line to the child's log (its next output follows)."""
        if self._notify is not None:
            self._notify(message)
        line = {
            "timestamp": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "level": "warning",
            "logger": __name__,
            "event": message,
            "child": child.name,
            "exit_code": code,
            "restarts": child.restarts,
        }
        with self.log_path(child.name).open("a") as log:
            log.write(json.dumps(line) + "\n")
