"""Ground truth per job: what the LLM simulator served each job it saw, and whether it was right.

Keel sends ``X-Keel-Job-Id`` on every chat request a job makes. ``TruthLedger`` keeps, per job
ID, the goal, its difficulty, how many drafts were served, whether the last one states the
goal's right fact, and the last verdict, so a benchmark (or anyone driving jobs through the
public CLI or API) can score a job's final answer apart from what the verifier said. The ledger
is an LRU bounded by ``MAX_JOBS``. Pure memory, no I/O; touched only from the app's event loop.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Any

MAX_JOBS = 100_000
"""Jobs remembered at most; the least recently seen is forgotten first."""
JOB_HEADER = "x-keel-job-id"
"""The request header that names the job a chat request belongs to."""
MAX_CALLS = 50
"""Model calls remembered per job."""
MAX_PROMPT_CHARS = 50_000
"""Longest prompt remembered per call."""
MAX_JOB_ID_CHARS = 1000
"""Longest job ID accepted (Temporal's default limit on a workflow ID's length)."""


@dataclass
class JobTruth:
    """What the simulator knows about one job."""

    job_id: str
    """The job's ID, as its requests named it."""
    goal: str
    """The goal of the job's latest request, directive included."""
    difficulty: int
    """The goal's difficulty in the quality model."""
    correct: bool = False
    """Whether the last draft served for the job states the goal's right fact."""
    drafts: int = 0
    """Drafts served for the job (complete ``keel_answer`` replies)."""
    verifier_passed: bool | None = None
    """The last verdict served for the job; None before any."""
    calls: list[dict[str, str]] = field(default_factory=list)
    """What the job's last MAX_CALLS model calls received (``GET /sim/calls/{job_id}``)."""

    def public(self) -> dict[str, Any]:
        """The JSON body of ``GET /sim/truth/{job_id}``."""
        return {k: v for k, v in asdict(self).items() if k != "calls"}

    def received(self, kind: str, model: str, prompt: str) -> None:
        """Record what one model call of the job received (the user message, bounded)."""
        self.calls.append({"kind": kind, "model": model, "prompt": prompt[:MAX_PROMPT_CHARS]})
        del self.calls[:-MAX_CALLS]


class TruthLedger:
    """Per-job truth records, least recently seen evicted beyond ``max_jobs``."""

    def __init__(self, max_jobs: int = MAX_JOBS) -> None:
        self.max_jobs = max_jobs
        self._jobs: OrderedDict[str, JobTruth] = OrderedDict()

    def __len__(self) -> int:
        return len(self._jobs)

    def see(self, job_id: str, goal: str, difficulty: int) -> JobTruth:
        """The job's record, created or refreshed with the goal of its latest request.

        Args:
            job_id: The job's ID.
            goal: The goal the request carried.
            difficulty: That goal's difficulty.

        Returns:
            The record, now the most recently seen.
        """
        record = self._jobs.get(job_id)
        if record is None:
            record = self._jobs[job_id] = JobTruth(job_id, goal, difficulty)
            if len(self._jobs) > self.max_jobs:
                self._jobs.popitem(last=False)
        else:
            record.goal, record.difficulty = goal, difficulty
            self._jobs.move_to_end(job_id)
        return record

    def get(self, job_id: str) -> JobTruth | None:
        """The job's record, or None when the simulator never saw the job (or forgot it)."""
        return self._jobs.get(job_id)

    def clear(self) -> None:
        """Forget every job."""
        self._jobs.clear()
