"""How the LLM simulator behaves: latency, random faults and verification defaults."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

FaultKind = Literal["500", "503", "429", "timeout", "malformed"]
"""A fault the random fault rate can inject."""


class SimConfig(BaseModel):
    """How the simulator behaves: latency, random faults and verification defaults."""

    latency_ms: float = Field(default=0.0, ge=0.0)
    """Delay added to every ``/v1`` response."""
    latency_jitter_ms: float = Field(default=0.0, ge=0.0)
    """Uniform extra delay in ``[0, jitter)`` drawn from the seeded RNG."""
    fault_rate: float = Field(default=0.0, ge=0.0, le=1.0)
    """Probability that a chat or embeddings request gets a random fault."""
    fault_kinds: list[FaultKind] = Field(default_factory=lambda: list[FaultKind](["503"]))
    """Faults the random fault rate picks from, uniformly."""
    retry_after_seconds: float = Field(default=1.0, ge=0.0)
    """Retry-After header value on 429."""
    token_delay_ms: float = Field(default=0.0, ge=0.0)
    """Delay before each piece of a streamed reply (``stream: true``), after the first, to
    simulate a model's token rate; non-streaming replies are not slowed. Zero by default, so
    tests and the overhead benchmark measure Keel rather than a simulated model."""
    timeout_seconds: float = Field(default=30.0, ge=0.0)
    """How long a ``timeout`` fault stalls before answering 504."""
    fail_first_verify: bool = False
    """Fail verification on iteration 0 for every goal, forcing one refine."""
    seed: int = 0
    """Seed of the app's RNG (random faults and jitter)."""
    models: list[str] = Field(default_factory=lambda: ["sim-small", "sim-large"])
    """Model ids listed by ``/v1/models``; any model name is accepted and echoed."""
