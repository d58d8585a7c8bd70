"""What one ``keel bench`` run was asked for, and where its servers listen.

``BenchConfig`` is the command's options, validated; ``Servers`` is what ``workers.bench.stack``
started for the run. Both are shared by every section.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from keel.workflows.types import JobRequest

SIM_MODEL = "sim-small"
"""Model name the simulator answers for, for every role."""
OVERHEAD_REQUEST = JobRequest(
    goal="Compute 2 + 2 with calculator [sim: fanout=4]",
    tools=["calculator"],
    tenant="bench",
    user="bench",
    # Forced onto a tier: the bare workflow it is compared with makes no router call either.
    tier="deep",
)
"""plan, four parallel calculator calls, answer, verify: seven activities."""


@dataclass(frozen=True)
class BenchConfig:
    """What ``keel bench`` was asked to run (the command's options, validated)."""

    servers: list[str]
    sections: list[str]
    jobs: int = 200
    concurrency: int = 16
    rounds: int = 4
    """The overhead section's jobs of each kind run in this many rounds, the kinds taking turns,
    so a machine whose speed drifts during the run favours no kind."""
    warmup: int = 5
    sequential: int = 50
    history_sample: int = 50
    iterations: int = 1000
    output_kib: int = 20
    fleet: list[int] = field(default_factory=lambda: [1, 2, 3])
    cli_runs: int = 20
    """Timed runs of each ``keel`` command in the cli section."""
    api_clients: int = 100
    """Concurrent HTTP clients in the api section."""
    api_requests: int = 2000
    """Requests of each kind (submit, status) in the api section."""
    transfer_rps: int | None = None
    """None: ``workers.devstack.TRANSFER_RPS``."""
    json_path: Path | None = None


@dataclass(frozen=True)
class Servers:
    """Where the benchmark's Redis and LLM simulator listen, and the processes to read CPU of."""

    redis_url: str
    sim_url: str
    sim_pid: int | None = None
    temporal_pid: int | None = None
    """The dev server of the current --server mode (it changes with the mode)."""

    def cpu_probes(self) -> dict[str, int]:
        """Processes beside this one whose CPU a batch of jobs also costs, by figure name."""
        pids = {"server": self.temporal_pid, "simulator": self.sim_pid}
        return {name: pid for name, pid in pids.items() if pid is not None}
