"""The servers and processes ``keel bench`` starts for itself, and the Keel workers it runs.

Everything listens on 127.0.0.1 on a free port and keeps its files in the benchmark's temporary
directory. Child processes (Redis, the simulator, ``keel worker`` fleets) run under a
``workers.supervisor.Supervisor``, which stops each one, newest first, however the benchmark
ends (Ctrl-C and SIGTERM included); the Temporal dev server is owned by its
``WorkflowEnvironment`` and the text server by its context manager.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from temporalio.api.enums.v1 import TaskQueueType
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest
from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment

from keel.activities.converter import DATA_CONVERTER
from keel.workers.bench.config import SIM_MODEL, Servers
from keel.workers.main import build_worker
from keel.workers.plugin import KeelPlugin
from keel.workers.registry import deps_from_settings
from keel.workers.settings import SIM_API_KEY, WorkerSettings
from keel.workers.supervisor import Supervisor, find_binary, free_port
from keel.workflows import search_attributes as sa

PROJECT_ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_SECONDS = 60.0
"""How long a child process may take to accept connections or to start polling."""
STOP_TIMEOUT_SECONDS = 30.0
"""How long a child may take to exit after SIGTERM before it is killed."""


def supervisor(log_dir: Path) -> Supervisor:
    """The supervisor of the benchmark's child processes, logging to ``log_dir``."""
    return Supervisor(
        log_dir,
        cwd=PROJECT_ROOT,
        start_timeout=START_TIMEOUT_SECONDS,
        stop_timeout=STOP_TIMEOUT_SECONDS,
    )


def start_redis(children: Supervisor, data_dir: Path) -> str:
    """A throwaway redis-server (no snapshots, no append-only file); returns its URL."""
    port = free_port()
    cmd = [find_binary("redis-server"), "--port", str(port), "--bind", "127.0.0.1"]
    cmd += ["--dir", str(data_dir), "--save", "", "--appendonly", "no"]
    children.start("redis", cmd, port=port)
    return f"redis://127.0.0.1:{port}/0"


def start_simulator(children: Supervisor, *args: str) -> tuple[str, int]:
    """The project's LLM simulator (zero latency, no faults unless ``args`` say so) as a process.

    Args:
        children: The supervisor that owns the process.
        *args: More ``keel sim-llm`` options, e.g. ``--latency-ms 150`` (``keel bench cost``).

    Returns:
        Its base URL and its process ID.
    """
    port = free_port()
    cmd = [sys.executable, "-m", "keel.workers.cli", "sim-llm", "--port", str(port), *args]
    proc = children.start("llm-simulator", cmd, port=port)
    return f"http://127.0.0.1:{port}/v1", proc.pid


async def start_temporal(
    mode: str, state_dir: Path, transfer_rps: int
) -> tuple[WorkflowEnvironment, str]:
    """A Temporal dev server with Keel's search attributes; returns it and its version line.

    Args:
        mode: ``"sqlite"`` for a database file in ``state_dir``, ``"memory"`` for none.
        state_dir: Where the SQLite file goes.
        transfer_rps: ``history.transferProcessorMaxPollRPS`` (Temporal's stock value is 20).
    """
    binary = find_binary("temporal")
    version = subprocess.run(
        [binary, "--version"], capture_output=True, text=True, timeout=30, check=False
    ).stdout.strip()
    database = str(state_dir / f"temporal-{os.getpid()}.db") if mode == "sqlite" else None
    with _stdout_to_stderr():
        env = await WorkflowEnvironment.start_local(
            dev_server_existing_path=binary,
            dev_server_database_filename=database,
            search_attributes=sa.ALL_KEYS,
            data_converter=DATA_CONVERTER,
            dev_server_extra_args=[
                "--dynamic-config-value",
                f"history.transferProcessorMaxPollRPS={transfer_rps}",
                # As `keel dev` runs it (workers.devstack): the matcher honours the tenants'
                # fairness keys and weights only with fairness on (the priority section).
                "--dynamic-config-value",
                "matching.enableFairness=true",
            ],
        )
    return env, (version.splitlines() or ["temporal (unknown version)"])[0]


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """Point file descriptor 1 at stderr while a child that inherits it is spawned.

    The dev server prints its banner to the stdout it inherits; stdout is for the tables.
    """
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


@contextlib.contextmanager
def text_server(size: int) -> Iterator[str]:
    """Serve ``size`` bytes of plain text at the yielded URL from a thread, until exit."""
    body = _text(size)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the http.server hook name
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            """Stay quiet: the benchmark's output is its tables."""

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="bench-http", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/page.txt"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def _text(size: int) -> bytes:
    lines: list[str] = []
    total = 0
    while total < size:
        line = f"line {len(lines):05d}: the quick brown fox jumps over the lazy dog, again.\n"
        lines.append(line)
        total += len(line)
    return "".join(lines).encode()[:size]


def worker_env(
    target: str, namespace: str, redis_url: str, sim_url: str, model: str
) -> dict[str, str]:
    """Environment for a ``keel worker`` process pointed at the benchmark's servers.

    Temporal connection variables (profiles, API keys, TLS) and any real OpenAI key are dropped
    so the worker talks only to the local dev server and the simulator; ``KEEL_*`` tuning the
    caller exported is kept, as the in-process worker honours it too.
    """
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("TEMPORAL_") and k != "OPENAI_API_KEY"
    }
    return env | {
        "TEMPORAL_ADDRESS": target,
        "TEMPORAL_NAMESPACE": namespace,
        "REDIS_URL": redis_url,
        "OPENAI_BASE_URL": sim_url,
        "KEEL_MODEL_PLANNER": model,
        "KEEL_MODEL_VERIFIER": model,
        "KEEL_MODEL_ANSWERER": model,
    }


async def wait_for_pollers(
    client: Client, task_queue: str, count: int, procs: list[subprocess.Popen[bytes]]
) -> None:
    """Wait until ``count`` distinct workers poll ``task_queue`` for workflow and activity tasks.

    Raises:
        RuntimeError: If a worker process exits first.
        TimeoutError: If they are not all polling within the start timeout.
    """
    kinds = (TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW, TaskQueueType.TASK_QUEUE_TYPE_ACTIVITY)
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while True:
        polling = []
        for kind in kinds:
            resp = await client.workflow_service.describe_task_queue(
                DescribeTaskQueueRequest(
                    namespace=client.namespace,
                    task_queue=TaskQueue(name=task_queue),
                    task_queue_type=kind,
                )
            )
            polling.append(len({p.identity for p in resp.pollers}))
        if min(polling) >= count:
            return
        if any(p.poll() is not None for p in procs):
            raise RuntimeError("a worker process exited before polling")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{min(polling)} of {count} workers polling {task_queue}")
        await asyncio.sleep(0.2)


def child_pid(name: str) -> int | None:
    """The newest child process of this one whose command name is ``name`` (None if none).

    How the benchmark finds the dev server ``WorkflowEnvironment`` started, to read its CPU.
    Reads /proc, so it finds nothing where there is none.
    """
    found: list[tuple[int, int]] = []  # (start time in clock ticks since boot, pid)
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        comm = text[text.find("(") + 1 : text.rfind(")")]
        fields = text.rsplit(")", 1)[1].split()
        # After "pid (comm)": field 4 (ppid) sits at 1 and field 22 (starttime) at 19.
        if comm == name and int(fields[1]) == os.getpid():
            found.append((int(fields[19]), int(stat.parent.name)))
    return max(found)[1] if found else None


def process_cpu_seconds(pid: int) -> float | None:
    """User plus system CPU seconds a live process has used, from /proc (None elsewhere)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    # Fields 14 and 15 of /proc/PID/stat (utime, stime) sit at 11 and 12 after "pid (comm)".
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.asynccontextmanager
async def in_process_worker(
    client: Client, servers: Servers, task_queue: str
) -> AsyncIterator[None]:
    """One Keel worker in this process, built as ``keel worker`` builds its own.

    ``workers.main.build_worker`` with the worker's settings: the same workflow runner
    (unsandboxed unless ``KEEL_WORKFLOW_SANDBOX`` is set), slot counts and shutdown grace.
    """
    overrides = {  # keyed as the environment spells them (the settings' validation aliases)
        "REDIS_URL": servers.redis_url,
        "OPENAI_BASE_URL": servers.sim_url,
        "OPENAI_API_KEY": SIM_API_KEY,
        "model_planner": SIM_MODEL,
        "model_verifier": SIM_MODEL,
        "model_answerer": SIM_MODEL,
    }
    settings = WorkerSettings(**overrides)  # type: ignore[arg-type]
    deps = deps_from_settings(settings, http_allowed_hosts=["127.0.0.1:*"])
    try:
        await deps.store.ping()
        async with build_worker(client, settings, task_queue, plugin=KeelPlugin(deps)):
            yield
    finally:
        await deps.aclose()
