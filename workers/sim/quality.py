"""The LLM simulator's quality model: who drafts right, who catches a wrong draft, where to route.

Each model has a capability level (``SimConfig.capabilities``) and each goal a difficulty (a
``difficulty=N`` directive, or a draw from ``SimConfig.difficulty_weights``). A model drafts the
goal's right fact when its capability reaches the difficulty and a wrong one otherwise; a
verifier catches a wrong draft with a probability that grows with its capability; a router
names the right tier with probability ``SimConfig.router_accuracy``. So a benchmark measures the
quality and cost trade-off of tiers instead of assuming it, and ``grade`` scores any answer text.

Pure: no I/O, no clocks, and no ``random``. Every draw is a hash (SHA-256) of the config's seed
and the normalised goal, plus whatever else the draw depends on, so two simulator processes with
the same config give the same goal the same difficulty, truth, verdicts and route.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import dataclass
from functools import lru_cache

from keel.workers.sim.config import SimConfig
from keel.workers.sim.directives import parse_goal

_SPACES = re.compile(r"\s+")
_SEP = "\x1f"
"""Joins the parts of a hashed key; it cannot appear in a normalised goal's meaning."""


@lru_cache(maxsize=4096)
def normalise(goal: str) -> str:
    """The goal as the quality model keys it: directive removed, NFKC, casefolded, spaces collapsed.

    Near-repeats that differ only in case and whitespace share their difficulty and truth.

    Args:
        goal: The goal as the caller wrote it, ``[sim: ...]`` directive included or not.

    Returns:
        The normalised text.
    """
    clean, _ = parse_goal(goal)
    folded = unicodedata.normalize("NFKC", clean).casefold()
    return _SPACES.sub(" ", folded).strip()


def _digest(*parts: object) -> bytes:
    return hashlib.sha256(_SEP.join(map(str, parts)).encode()).digest()


def draw(*parts: object) -> float:
    """A deterministic number in ``[0, 1)`` derived from ``parts`` (a hash, not an RNG)."""
    return int.from_bytes(_digest(*parts)[:8], "big") / 2**64


def fact(goal: str) -> str:
    """The token a right draft of ``goal`` states: ``fact-`` and 8 hex digits of its hash.

    It depends on the normalised goal alone (not the seed), so it names the same fact in every
    simulator.
    """
    return "fact-" + hashlib.sha256(normalise(goal).encode()).hexdigest()[:8]


def wrong_fact(goal: str) -> str:
    """The token a wrong draft of ``goal`` states; never equal to ``fact(goal)``."""
    right = fact(goal)
    digest = hashlib.sha256(f"wrong{_SEP}{normalise(goal)}".encode()).hexdigest()
    token = "fact-" + digest[:8]
    # A collision of 32 bits is unlikely, but truth must never depend on luck.
    return token if token != right else "fact-" + digest[8:16]


def is_right(goal: str, answer: str) -> bool:
    """Whether ``answer`` states the goal's right fact (ground truth, whoever judged it)."""
    return fact(goal) in answer


def difficulty(goal: str, config: SimConfig) -> int:
    """The goal's difficulty: its ``difficulty=`` directive, a seeded draw, or 1.

    Args:
        goal: The goal as the caller wrote it.
        config: Supplies ``difficulty_weights`` (probabilities of 1, 2, 3, ...) and the seed.

    Returns:
        An integer of at least 1.
    """
    _, directives = parse_goal(goal)
    if directives.difficulty is not None:
        return directives.difficulty
    weights = config.difficulty_weights
    if not weights:
        return 1
    point = draw(config.seed, normalise(goal), "difficulty") * sum(weights)
    total = 0.0
    for level, weight in enumerate(weights, start=1):
        total += weight
        if point < total:
            return level
    # Rounding can leave the point at the very top; it belongs to the last weighted level.
    return max(i for i, w in enumerate(weights, start=1) if w > 0)


def capability(model: str, config: SimConfig) -> int:
    """A model's capability level; a model the map does not list has the highest level in it."""
    return config.capabilities.get(model, max(config.capabilities.values()))


def drafts_right(model: str, goal: str, config: SimConfig) -> bool:
    """Whether ``model`` drafts the goal's right fact: its capability reaches the difficulty."""
    return capability(model, config) >= difficulty(goal, config)


def catch_probability(level: int, config: SimConfig) -> float:
    """The chance a verifier of capability ``level`` catches a wrong draft.

    A level the map does not list uses the nearest listed level below it, or the lowest listed
    level when none is below (so a level beyond the map uses the highest entry).
    """
    catch = config.verifier_catch
    below = [known for known in catch if known <= level]
    return catch[max(below)] if below else catch[min(catch)]


def verifier_catches(goal: str, model: str, iteration: int, draft: str, config: SimConfig) -> bool:
    """Whether verifier ``model`` catches the wrong ``draft`` of ``goal`` at ``iteration``."""
    point = draw(config.seed, normalise(goal), model, iteration, draft, "catch")
    return point < catch_probability(capability(model, config), config)


@dataclass(frozen=True)
class Route:
    """What a router call decides for a goal."""

    tier: str
    """The tier it names, one of those it was offered."""
    right: bool
    """Whether that is the cheapest tier whose model can draft the goal right."""
    claimed_difficulty: int
    """The difficulty the router's choice implies, which drives its ``complexity``."""


def route(goal: str, tiers: list[tuple[str, str]], config: SimConfig) -> Route:
    """The tier a router names for ``goal``, right with probability ``router_accuracy``.

    Args:
        goal: The goal as the caller wrote it.
        tiers: ``(tier name, model)`` pairs, cheapest first; at least one.
        config: Capabilities, router accuracy and the seed.

    Returns:
        The chosen tier. The right one is the cheapest whose model's capability reaches the
        goal's difficulty (the last when none does). A wrong choice with more than two tiers is
        one of the others, picked by a second hash.
    """
    level = difficulty(goal, config)
    levels = [capability(model, config) for _, model in tiers]
    right = next((i for i, cap in enumerate(levels) if cap >= level), len(tiers) - 1)
    key = normalise(goal)
    if len(tiers) == 1 or draw(config.seed, key, "route") < config.router_accuracy:
        return Route(tiers[right][0], True, level)
    others = [i for i in range(len(tiers)) if i != right]
    chosen = others[int(draw(config.seed, key, "route-wrong") * len(others))]
    # A router that picks too cheap a tier believes that tier's model suffices; one that picks
    # too dear a tier believes the tier below it would fail.
    claimed = levels[chosen] if chosen < right else levels[chosen - 1] + 1
    return Route(tiers[chosen][0], False, max(1, claimed))
