"""How the LLM simulator behaves: latency, random faults, verification and its quality model."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, field_validator

FaultKind = Literal["500", "503", "429", "timeout", "malformed"]
"""A fault the random fault rate can inject."""


class SimConfig(BaseModel):
    """How the simulator behaves: latency, random faults, verification and its quality model.

    The quality model (``workers.sim.quality``) decides whether a draft is right (the drafting
    model's capability against the goal's difficulty), whether the verifier catches a wrong one,
    and whether the router picks the right tier; every draw is a hash of the seed and the goal,
    so two simulators with the same config agree.
    """

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
    models: list[str] = Field(default_factory=lambda: ["sim-small", "sim-medium", "sim-large"])
    """Model ids listed by ``/v1/models``; any model name is accepted and echoed."""
    capabilities: dict[str, int] = Field(
        default_factory=lambda: {"sim-small": 1, "sim-medium": 2, "sim-large": 3}, min_length=1
    )
    """Capability level of each model; a model not listed has the highest level listed, so
    every other model name drafts right answers to every goal up to that difficulty."""
    difficulty_weights: list[float] | None = None
    """Probabilities of difficulty 1, 2, 3, ... for goals without a ``difficulty=`` directive,
    drawn per goal from a hash of the seed and the goal; None: every such goal is difficulty 1.
    The weights need not sum to one (they are normalised)."""
    router_accuracy: float = Field(default=0.8, ge=0.0, le=1.0)
    """Probability that a ``keel_route`` reply names the right tier for the goal."""
    verifier_catch: dict[int, float] = Field(
        default_factory=lambda: {1: 0.6, 2: 0.85, 3: 0.97}, min_length=1
    )
    """Probability, per verifier capability, that a wrong draft is caught; a capability between
    or beyond the listed levels uses the nearest level below it (the lowest if none is)."""

    @field_validator("capabilities")
    @classmethod
    def _capabilities_positive(cls, value: dict[str, int]) -> dict[str, int]:
        if any(level < 1 for level in value.values()):
            raise ValueError("capability levels must be at least 1")
        return value

    @field_validator("difficulty_weights")
    @classmethod
    def _weights_usable(cls, value: list[float] | None) -> list[float] | None:
        if value is not None and (not value or min(value) < 0 or sum(value) <= 0):
            raise ValueError("difficulty_weights must be non-negative with a positive sum")
        return value

    @field_validator("verifier_catch")
    @classmethod
    def _catch_probabilities(cls, value: dict[int, float]) -> dict[int, float]:
        if any(not 0.0 <= p <= 1.0 for p in value.values()):
            raise ValueError("verifier_catch probabilities must lie in [0, 1]")
        return value
