"""``keel bench sessions``: what a session costs per turn, and that a long one stays flat.

Four measurements, on servers the caller started (``workers.bench.sessions_main``), each
on an in-process Keel worker of its own:

- **overhead**: the same small job run ``overhead_runs`` times as standalone jobs and as
  many turns of one session, the two kinds alternating, one job at a time, against a
  simulator that answers every model call after ``overhead_latency_ms``. Latency is submit to
  result as a caller sees it: ``AgentJobs.start`` then ``result``, and ``AgentSessions.send``
  then ``turn_result``. A turn pays for what a session adds: the update that queues it, the
  child workflow, the conversation in its prompts and the summary call after the turn before.
- **context**: a scripted conversation of ``turns`` turns against the zero-latency simulator,
  one message at a time. Per turn, the prompt of every model call its job made is read back
  from the simulator (``GET /sim/calls/{job_id}``; the worker sends ``X-Keel-Job-Id``) and
  counted with the model's tokenizer (``activities.costing.count_tokens``).
- **history**: every run of that session's workflow, which continues as new on Temporal's
  suggestion, walked back from the last one: each run's events, bytes and turns.
- **status reads**: while the conversation's turns run, ``readers`` tasks call the
  ``get_session`` query every ``READ_INTERVAL_SECONDS`` and as many read the snapshot the
  session writes to Redis as it changes (``AgentSessions.status`` with the store: GET, then
  parse into ``SessionStatus``), for ``read_seconds``. The worker runs in this process, so what
  a read waits for includes the worker's own work.

Figures and tables are ``workers.bench.sessions_report``'s; nothing here judges a target.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from uuid import uuid4

import httpx
from rich.progress import Progress
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client

from keel.activities.cache import CacheSettings
from keel.activities.costing import count_tokens
from keel.activities.llm import LLMConfig
from keel.activities.snapshots import SessionSnapshots
from keel.activities.store import KeelStore
from keel.client.jobs import AgentJobs
from keel.client.sessions import AgentSessions, tenant_of_session
from keel.workers.bench import sessions_report
from keel.workers.bench.config import SIM_MODEL
from keel.workers.bench.history import history_stats
from keel.workers.main import build_worker
from keel.workers.plugin import KeelPlugin
from keel.workers.registry import build_deps
from keel.workers.settings import SIM_API_KEY, WorkerSettings
from keel.workflows.session_types import (
    SessionBudget,
    SessionRequest,
    session_id_for,
    turn_job_id,
)
from keel.workflows.types import JobRequest

__all__ = [
    "CONVERSATION_TURN",
    "OVERHEAD_GOAL",
    "SessionsConfig",
    "conversation_message",
    "measure_sessions",
    "session_runs",
    "turn_prompt_tokens",
]

OVERHEAD_GOAL = "Compute 2 + 2 with calculator [sim: difficulty=1]"
"""The small job of the overhead runs: plan, one calculator call, answer, verify. Difficulty 1
lets the simulator's small model draft it right, so no run spends an iteration refining."""
CONVERSATION_TURN = (
    "Turn {n:05d}: what is {x} * 3? Add it to the earlier results. [sim: difficulty=1]"
)
"""The scripted conversation's message; every turn's is the same length (below turn 90,000),
so what changes in its prompts from turn to turn is the conversation carried into them."""
WARMUP = 2
"""Uncounted runs of each kind before the overhead is timed (tokenizers, first connections)."""
READ_START_TURN = 5
"""The status readers start once this many turns have ended (the state is full by then)."""
READ_INTERVAL_SECONDS = 0.05
"""Each reader's pause between reads, as a client polling a status page pauses. Unpaced, the
snapshot readers (sub-millisecond reads) would spin this process's event loop, which the
in-process worker shares, and slow the turns and the queries they are compared with."""
TURN_TIMEOUT_SECONDS = 300.0
"""A turn that takes longer than this fails the benchmark instead of hanging it."""
FETCH_CONCURRENCY = 16
"""Simulator and history requests in flight at once when reading the results back."""
MODELS = {"router": SIM_MODEL, "fast": SIM_MODEL, "deep": SIM_MODEL}
"""Every tier on the simulator's small model: turns and standalone jobs route alike."""


@dataclass(frozen=True)
class SessionsConfig:
    """What ``keel bench sessions`` was asked to run (the command's options, validated)."""

    turns: int = 500
    """Turns of the scripted conversation (context and history)."""
    overhead_runs: int = 30
    """Timed runs of each kind (standalone job, session turn) in the overhead section."""
    overhead_latency_ms: float = 100.0
    """Delay of every model call in the overhead section (its own simulator)."""
    readers: int = 4
    """Concurrent status readers of each kind (query, Redis snapshot)."""
    read_seconds: float = 15.0
    """How long the status readers read while the conversation's turns run."""
    json_path: Path | None = None


@dataclass
class Reads:
    """Latencies of the status reads of one kind, in seconds."""

    latencies: list[float] = field(default_factory=list)
    errors: int = 0


def conversation_message(n: int) -> str:
    """The scripted conversation's message of turn ``n`` (from 1)."""
    return CONVERSATION_TURN.format(n=n, x=1000 + n % 9000)


def llm_config() -> LLMConfig:
    """Every role on the simulator's small model, sending each job's ID with its calls."""
    return LLMConfig(
        planner_model=SIM_MODEL,
        verifier_model=SIM_MODEL,
        answerer_model=SIM_MODEL,
        tier_models=MODELS,
        job_header=True,
    )


async def measure_sessions(
    client: Client,
    redis_url: str,
    sim_url: str,
    overhead_sim_url: str,
    config: SessionsConfig,
    progress: Progress,
    *,
    on_section: Callable[[str, dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run the overhead, context, history and status-read measurements; return their figures.

    Args:
        client: A client of the Temporal server the workers poll.
        redis_url: The Redis the workers (and the snapshot readers) use.
        sim_url: The simulator at zero latency (the conversation).
        overhead_sim_url: The simulator answering after ``config.overhead_latency_ms``.
        config: Turns, overhead runs, readers.
        progress: Where each section shows how far it got.
        on_section: Called with each section's name and figures as it ends.

    Returns:
        ``overhead``, ``context``, ``history`` and ``reads`` figures, and the session's ID.
    """
    tag = uuid4().hex[:8]
    report: dict[str, Any] = {"tag": tag}
    samples = await _overhead(client, redis_url, overhead_sim_url, config, progress, tag)
    report["overhead"] = sessions_report.overhead_figures(*samples)
    if on_section is not None:
        on_section("overhead", report["overhead"])
    session_id, checkpoints, reads = await _conversation(
        client, redis_url, sim_url, config, progress, tag
    )
    report["session_id"] = session_id
    tokens, calls = await turn_prompt_tokens(sim_url, session_id, config.turns)
    report["context"] = sessions_report.context_figures(tokens, calls, checkpoints)
    if on_section is not None:
        on_section("context", report["context"])
    report["history"] = sessions_report.history_figures(await session_runs(client, session_id))
    report["reads"] = sessions_report.read_figures(*reads)
    return report


async def _overhead(
    client: Client,
    redis_url: str,
    sim_url: str,
    config: SessionsConfig,
    progress: Progress,
    tag: str,
) -> tuple[list[float], list[float], list[str]]:
    """Standalone jobs and session turns of the same goal, alternating, one at a time.

    Returns:
        Standalone latencies, turn latencies (seconds) and every run's outcome.
    """
    queue, tenant = f"bench-sessions-overhead-{tag}", f"bench-{tag}"
    jobs = AgentJobs(client, task_queue=queue, tenant=tenant)
    sessions = AgentSessions(client, task_queue=queue, tenant=tenant)
    job = JobRequest(
        goal=OVERHEAD_GOAL, tenant=tenant, user="bench", tools=["calculator"], tier="deep"
    )
    session = SessionRequest(
        tenant=tenant,
        user="bench",
        tools=["calculator"],
        tier="deep",
        budget=_roomy(config.overhead_runs + WARMUP),
    )
    standalone: list[float] = []
    turns: list[float] = []
    outcomes: list[str] = []
    total = config.overhead_runs + WARMUP
    task = progress.add_task(f"overhead: {total} jobs and {total} turns", total=2 * total)

    async def one_job(i: int) -> None:
        started = time.perf_counter()
        job_id = await jobs.start(job, request_key=f"overhead-{i}")
        result = await jobs.result(job_id, timeout=TURN_TIMEOUT_SECONDS)
        if i >= WARMUP:
            standalone.append(time.perf_counter() - started)
            outcomes.append(result.outcome)
        progress.advance(task)

    async def one_turn(i: int) -> None:
        started = time.perf_counter()
        accepted = await sessions.send(session, "overhead", OVERHEAD_GOAL, message_id=f"m{i}")
        result = await sessions.turn_result(accepted, timeout=TURN_TIMEOUT_SECONDS)
        if i >= WARMUP:
            turns.append(time.perf_counter() - started)
            outcomes.append(result.outcome)
        progress.advance(task)

    async with _worker(client, redis_url, sim_url, queue):
        for i in range(total):
            # Either kind goes first every other round, so a machine that speeds up or slows
            # down during the run favours neither.
            pair = (one_job(i), one_turn(i)) if i % 2 == 0 else (one_turn(i), one_job(i))
            for run in pair:
                await run
        await sessions.end(session_id_for(tenant, "overhead"))
    return standalone, turns, outcomes


async def _conversation(
    client: Client,
    redis_url: str,
    sim_url: str,
    config: SessionsConfig,
    progress: Progress,
    tag: str,
) -> tuple[str, dict[int, dict[str, Any]], tuple[Reads, Reads, int]]:
    """The scripted conversation, one message at a time, with the status readers on meanwhile.

    Returns:
        The session's ID; at each checkpoint turn, what its status said (summary length,
        recent exchanges, runs); and the query reads, the snapshot reads and the snapshot's
        size in bytes.
    """
    queue, tenant = f"bench-sessions-chat-{tag}", f"bench-{tag}"
    sessions = AgentSessions(client, task_queue=queue, tenant=tenant)
    request = SessionRequest(
        tenant=tenant, user="bench", tools=["calculator"], budget=_roomy(config.turns)
    )
    session_id = session_id_for(tenant, "chat")
    marks = set(sessions_report.checkpoints(config.turns))
    seen: dict[int, dict[str, Any]] = {}
    task = progress.add_task(f"conversation: {config.turns} turns", total=config.turns)
    readers: _Readers | None = None
    async with _worker(client, redis_url, sim_url, queue):
        try:
            for n in range(1, config.turns + 1):
                accepted = await sessions.send(request, "chat", conversation_message(n))
                result = await sessions.turn_result(accepted, timeout=TURN_TIMEOUT_SECONDS)
                if result.outcome != "completed":
                    raise RuntimeError(f"turn {n} ended {result.outcome}: {result.error}")
                if n in marks:
                    status = await sessions.status(session_id)
                    seen[n] = {
                        "summary_chars": len(status.summary),
                        "recent": len(status.recent),
                        "runs": status.runs,
                    }
                if n == min(READ_START_TURN, config.turns) and readers is None:
                    readers = _Readers(client, queue, session_id, redis_url, config)
                    readers.start()
                progress.advance(task)
        finally:
            reads = await readers.stop() if readers is not None else (Reads(), Reads(), 0)
        await sessions.end(session_id)
        # The run ends once the turn in flight (none) and its handlers are done.
        await client.get_workflow_handle(session_id).result()
    return session_id, seen, reads


class _Readers:
    """Status readers: ``get_session`` queries and reads of the session's Redis snapshot."""

    def __init__(
        self,
        client: Client,
        queue: str,
        session_id: str,
        redis_url: str,
        config: SessionsConfig,
    ) -> None:
        self.session_id, self.config = session_id, config
        tenant = tenant_of_session(session_id) or ""
        self.sessions = AgentSessions(client, task_queue=queue, tenant=tenant)
        self.store = KeelStore.from_url(redis_url)
        # The same client, reading the snapshot the session's workflow writes as it changes.
        self.snapshots = AgentSessions(
            client, task_queue=queue, tenant=tenant, snapshots=SessionSnapshots(self.store.redis)
        )
        self.query, self.snapshot = Reads(), Reads()
        self.size = 0
        self.tasks: list[asyncio.Task[None]] = []
        self.stopping = False

    def start(self) -> None:
        deadline = time.perf_counter() + self.config.read_seconds
        for _ in range(self.config.readers):
            self.tasks.append(asyncio.create_task(self._read(deadline, self.query, False)))
            self.tasks.append(asyncio.create_task(self._read(deadline, self.snapshot, True)))

    async def stop(self) -> tuple[Reads, Reads, int]:
        """Stop reading (when the conversation ended first) and return what was read."""
        # Each reader finishes the read in flight (every reader reads at least once, however
        # loaded the machine); one stuck for 30 s is cancelled.
        self.stopping = True
        _, stuck = await asyncio.wait(self.tasks, timeout=30) if self.tasks else (set(), set())
        for t in stuck:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        tenant = tenant_of_session(self.session_id) or ""
        latest = await SessionSnapshots(self.store.redis).get(tenant, self.session_id)
        self.size = len((latest or "").encode())
        await self.store.aclose()
        return self.query, self.snapshot, self.size

    def _reading(self, deadline: float, reads: Reads) -> bool:
        if not reads.latencies and not reads.errors:
            return True  # the first read always happens
        return not self.stopping and time.perf_counter() < deadline

    async def _read(self, deadline: float, reads: Reads, snapshot: bool) -> None:
        sessions = self.snapshots if snapshot else self.sessions
        while self._reading(deadline, reads):
            started = time.perf_counter()
            try:
                await sessions.status(self.session_id)
            except Exception:  # noqa: BLE001 - counted: a failed read is a figure too
                reads.errors += 1
            else:
                reads.latencies.append(time.perf_counter() - started)
            await asyncio.sleep(READ_INTERVAL_SECONDS)


async def turn_prompt_tokens(
    sim_url: str, session_id: str, turns: int
) -> tuple[list[int], list[int]]:
    """Each turn's prompt tokens (all its model calls together) and its number of calls.

    Read from the simulator's record of what each turn's job sent (``GET /sim/calls/{job}``);
    a turn the simulator never saw counts 0 calls and 0 tokens.
    """
    tokens, calls = [0] * turns, [0] * turns
    limit = asyncio.Semaphore(FETCH_CONCURRENCY)
    base = sim_url.removesuffix("/v1")

    async def one(http: httpx.AsyncClient, n: int) -> None:
        async with limit:
            response = await http.get(f"{base}/sim/calls/{turn_job_id(session_id, n)}")
        if response.status_code == httpx.codes.NOT_FOUND:
            return
        response.raise_for_status()
        received = response.json()["calls"]
        calls[n - 1] = len(received)
        tokens[n - 1] = sum(count_tokens(c["model"], c["prompt"]) for c in received)

    async with httpx.AsyncClient(timeout=30) as http:
        await asyncio.gather(*(one(http, n) for n in range(1, turns + 1)))
    return tokens, calls


async def session_runs(client: Client, session_id: str) -> list[dict[str, Any]]:
    """Every run of the session's workflow, oldest first: events, bytes and turns of each.

    Walked back from the latest run through each run's ``continued_execution_run_id``.
    """
    description = await client.get_workflow_handle(session_id).describe()
    run_id, runs, seen = description.run_id, [], set()
    limit = asyncio.Semaphore(FETCH_CONCURRENCY)
    while run_id and run_id not in seen:
        seen.add(run_id)
        async with limit:
            stats = await history_stats(client, session_id, run_id)
        started = stats.history[0].workflow_execution_started_event_attributes
        runs.append(
            {
                "run_id": run_id,
                "events": stats.events,
                "bytes": stats.bytes,
                "parts": stats.parts,
                "turns": sum(
                    e.event_type == EventType.EVENT_TYPE_START_CHILD_WORKFLOW_EXECUTION_INITIATED
                    for e in stats.history
                ),
                "continued_as_new": stats.history[-1].event_type
                == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CONTINUED_AS_NEW,
            }
        )
        run_id = started.continued_execution_run_id
    return runs[::-1]


def _roomy(turns: int) -> SessionBudget:
    """A session budget only the turn count can run out of, with room for every turn."""
    return SessionBudget(max_turns=turns + 10, max_tokens=10**9, max_cost_usd=1_000_000)


@contextlib.asynccontextmanager
async def _worker(client: Client, redis_url: str, sim_url: str, queue: str) -> AsyncIterator[None]:
    """A Keel worker in this process, tuned as ``keel worker`` is by default, caches off.

    Caches off: every turn of the conversation sends its model calls to the simulator, so the
    simulator's record of them is complete, and the overhead compares work with work.
    """
    overrides = {  # keyed as the environment spells them (the settings' validation aliases)
        "REDIS_URL": redis_url,
        "OPENAI_BASE_URL": sim_url,
        "OPENAI_API_KEY": SIM_API_KEY,
    }
    settings = WorkerSettings(**overrides)  # type: ignore[arg-type]
    deps = build_deps(
        redis_url=redis_url,
        openai_base_url=sim_url,
        openai_api_key=SIM_API_KEY,
        llm_config=llm_config(),
        http_allowed_hosts=[],
        cache_settings=CacheSettings(enabled=False),
    )
    try:
        await deps.store.ping()
        async with build_worker(client, settings, queue, plugin=KeelPlugin(deps)):
            yield
    finally:
        await deps.aclose()
