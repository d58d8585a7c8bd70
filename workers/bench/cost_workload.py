"""The seeded workload of ``keel bench cost``: tenants, their goal pools, the jobs in order.

Pure: no I/O, no clocks, no global randomness. Every choice is drawn from a
``random.Random(seed)``, so one seed gives one workload, job for job, and every run of the
benchmark (the baseline, Keel's defaults, each ablation) replays the same jobs in the same order.

The shape, stated here because the figures mean nothing without it:

- ``tenants`` tenants take turns (job ``i`` belongs to tenant ``i % tenants``).
- Each tenant has a pool of POOL_SIZE goals: SHARED_GOALS popular goals every tenant's pool holds
  (word for word, so a cache keyed without the tenant would serve one tenant another's entries),
  and the rest its own. The pool is shuffled per tenant, and each job draws a rank from a Zipf
  law of exponent ZIPF_S, so a few goals repeat often and most rarely.
- A job whose goal its tenant asked before is a repeat; NEAR_REPEAT_RATE of repeats differ
  from the pool's text in case and whitespace only (a near-repeat), the rest are exact.
- A goal's kind (KIND_WEIGHTS) says what it does: ``plain`` asks the model only; ``calc`` uses
  the calculator; ``retrieval`` searches a generated corpus of runbooks; ``long`` fetches a large
  page with ``http_get`` and re-plans on every iteration while the verifier is made to reject
  the first LONG_FAIL_VERIFY drafts, so its observations pile up and context compression folds
  them. Difficulty (DIFFICULTY_WEIGHTS) is stated in each goal's ``[sim: difficulty=N]``
  directive: the simulator's ``sim-small`` drafts difficulty 1 right, ``sim-large`` up to 3.
"""

from __future__ import annotations

import random
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, TypeVar

from keel.activities.cache import normalize_text

__all__ = [
    "DIFFICULTY_WEIGHTS",
    "KIND_WEIGHTS",
    "Goal",
    "Job",
    "Workload",
    "corpus_documents",
    "near_repeat",
    "workload",
]

GoalKind = Literal["plain", "calc", "retrieval", "long"]
Repeat = Literal["first", "exact", "near"]

KIND_WEIGHTS: dict[GoalKind, float] = {"plain": 0.40, "calc": 0.25, "retrieval": 0.25, "long": 0.10}
"""Share of each kind of goal in a pool."""
DIFFICULTY_WEIGHTS: dict[int, float] = {1: 0.60, 2: 0.20, 3: 0.20}
"""Share of each difficulty in a pool: most requests are easy, some need the deep model."""
ZIPF_S = 1.1
"""Exponent of the Zipf law over a tenant's pool ranks."""
POOL_SIZE = 40
"""Goals in each tenant's pool."""
SHARED_GOALS = 10
"""Goals of each pool that every tenant's pool holds word for word."""
NEAR_REPEAT_RATE = 0.25
"""Share of repeats that change case and whitespace (the rest repeat the text exactly)."""
LONG_FAIL_VERIFY = 3
"""A ``long`` goal's verifier rejects its first drafts, this many of them, whatever they say."""
PAGE_BYTES = 24_000
"""Size of the page a ``long`` goal fetches (each fetch is stored by reference)."""
CORPUS_DOCS = 120
"""Runbooks in the generated corpus that ``retrieval`` goals search."""

_TOPICS = (
    "consistent hashing",
    "exponential backoff",
    "idempotency keys",
    "write-ahead logging",
    "circuit breakers",
    "rate limiting",
    "blue-green deploys",
    "vector clocks",
    "leader election",
    "bloom filters",
    "connection pooling",
    "schema migrations",
    "feature flags",
    "dead-letter queues",
    "cache stampedes",
    "load shedding",
)
_ADJECTIVES = ("amber", "brisk", "cobalt", "dusky", "ember", "frost", "gilded", "hollow")
_NOUNS = ("falcon", "harbor", "lantern", "meadow", "orchard", "quarry", "summit", "tundra")
_AUDIENCES = ("a new engineer", "an on-call lead", "a product manager", "a security reviewer")
_WORD = re.compile(r"[A-Za-z][A-Za-z-]*")
_K = TypeVar("_K")


@dataclass(frozen=True)
class Goal:
    """One goal of a pool: its text (directive included), what it uses, and its difficulty."""

    goal_id: str
    kind: GoalKind
    difficulty: int
    text: str
    tools: tuple[str, ...] = ()
    uses_docs: bool = False
    distinct_calls: int = 0
    """Distinct tool or retrieval calls one run of the goal makes; a job repeating one of them
    (a ``long`` goal re-fetches its page on every iteration) may be served by its own entry."""


@dataclass(frozen=True)
class Job:
    """One job of the workload, in submission order."""

    index: int
    tenant: int
    goal: Goal
    text: str
    """The goal as this job sends it (the pool's text, or a near-repeat of it)."""
    repeat: Repeat

    def normalized(self) -> str:
        """The goal as the response cache and the simulator's quality model key it."""
        return normalize_text(self.text, "casefold")


@dataclass(frozen=True)
class Workload:
    """Every job in order, and the settings that made them."""

    jobs: list[Job]
    settings: dict[str, Any] = field(default_factory=dict)


def _weighted(rng: random.Random, weights: dict[_K, float]) -> _K:
    return rng.choices(list(weights), weights=list(weights.values()))[0]


def _goal(rng: random.Random, goal_id: str, page_base_url: str, docs: list[str]) -> Goal:
    """A new goal of a random kind and difficulty; ``goal_id`` makes its text unique."""
    kind = _weighted(rng, KIND_WEIGHTS)
    level = _weighted(rng, DIFFICULTY_WEIGHTS)
    topic, audience = rng.choice(_TOPICS), rng.choice(_AUDIENCES)
    if kind == "plain":
        text = f"Explain {topic} to {audience} in a short paragraph, case {goal_id}"
        return Goal(goal_id, kind, level, f"{text} [sim: difficulty={level}]")
    if kind == "calc":
        a, b, c = rng.randint(12, 999), rng.randint(12, 999), rng.randint(1, 9999)
        text = f"Use the calculator to work out {a} * {b} + {c} for budget line {goal_id}"
        return Goal(
            goal_id, kind, level, f"{text} [sim: difficulty={level}]", ("calculator",), False, 1
        )
    if kind == "retrieval":
        doc = rng.choice(docs)
        text = f"Search the runbooks: how does the {doc} service page its on-call, ticket {goal_id}"
        return Goal(goal_id, kind, level, f"{text} [sim: difficulty={level}]", (), True, 1)
    url = f"{page_base_url}/incidents/{goal_id}.log"
    text = f"Fetch {url} with http_get and summarise the incident timeline"
    directive = f"[sim: difficulty={level}, replan, fail_verify={LONG_FAIL_VERIFY}]"
    return Goal(goal_id, kind, level, f"{text} {directive}", ("http_get",), False, 1)


def near_repeat(text: str, rng: random.Random) -> str:
    """``text`` with its words' case and the whitespace between them changed, and nothing else.

    The ``[sim: ...]`` directive, URLs and numbers are left as they are: the variant differs
    from the text only as a person retyping it would, so both normalise to the same string.
    """
    head, bracket, tail = text.partition("[sim:")
    words = head.split(" ")
    out: list[str] = []
    for word in words:
        if _WORD.fullmatch(word):
            word = rng.choice((word.upper(), word.lower(), word.capitalize(), word))
        out.append(word)
    joints = [rng.choice((" ", "  ", "\t", " \n ", " ")) for _ in out[1:]]
    body = out[0] + "".join(j + w for j, w in zip(joints, out[1:], strict=True))
    variant = f"  {body.rstrip()} {bracket}{tail}" if bracket else f"  {body}  "
    return variant if variant != text else f" {text} "


def workload(jobs: int, tenants: int, seed: int, page_base_url: str, docs: list[str]) -> Workload:
    """The benchmark's jobs, in submission order.

    Args:
        jobs: How many jobs.
        tenants: How many tenants take turns.
        seed: Seeds every draw.
        page_base_url: Where the page server listens (``long`` goals fetch pages under it).
        docs: The corpus's service names (``corpus_documents``); retrieval goals ask about them.

    Returns:
        The jobs and the settings (mixes, pool sizes) that shaped them.
    """
    rng = random.Random(seed)
    shared = [_goal(rng, f"s{n:02d}", page_base_url, docs) for n in range(SHARED_GOALS)]
    pools: list[list[Goal]] = []
    for t in range(tenants):
        own = [
            _goal(rng, f"t{t}g{n:02d}", page_base_url, docs)
            for n in range(POOL_SIZE - SHARED_GOALS)
        ]
        pool = shared + own
        rng.shuffle(pool)
        pools.append(pool)
    weights = [rank**-ZIPF_S for rank in range(1, POOL_SIZE + 1)]
    seen: list[set[str]] = [set() for _ in range(tenants)]
    out: list[Job] = []
    for index in range(jobs):
        tenant = index % tenants
        goal = rng.choices(pools[tenant], weights=weights)[0]
        repeat: Repeat = "first"
        text = goal.text
        if goal.goal_id in seen[tenant]:
            repeat = "near" if rng.random() < NEAR_REPEAT_RATE else "exact"
            if repeat == "near":
                text = near_repeat(goal.text, rng)
        seen[tenant].add(goal.goal_id)
        out.append(Job(index, tenant, goal, text, repeat))
    return Workload(out, _settings(jobs, tenants, seed))


def _settings(jobs: int, tenants: int, seed: int) -> dict[str, Any]:
    return {
        "jobs": jobs,
        "tenants": tenants,
        "seed": seed,
        "pool_size": POOL_SIZE,
        "shared_goals": SHARED_GOALS,
        "zipf_s": ZIPF_S,
        "near_repeat_rate": NEAR_REPEAT_RATE,
        "kind_weights": dict(KIND_WEIGHTS),
        "difficulty_weights": {str(k): v for k, v in DIFFICULTY_WEIGHTS.items()},
        "long_fail_verify": LONG_FAIL_VERIFY,
        "page_bytes": PAGE_BYTES,
        "corpus_docs": CORPUS_DOCS,
    }


def mix(jobs: list[Job]) -> dict[str, dict[str, int]]:
    """How many jobs of each kind, difficulty and repeat class the workload holds."""
    counts: dict[str, dict[str, int]] = {"kind": {}, "difficulty": {}, "repeat": {}}
    for job in jobs:
        for name, value in (
            ("kind", job.goal.kind),
            ("difficulty", str(job.goal.difficulty)),
            ("repeat", job.repeat),
        ):
            counts[name][value] = counts[name].get(value, 0) + 1
    counts["distinct_goals"] = {"all": len({(j.tenant, j.goal.goal_id) for j in jobs})}
    return counts


def corpus_documents(seed: int, count: int = CORPUS_DOCS) -> dict[str, str]:
    """The runbooks ``retrieval`` goals search: file name to text, one service each.

    Returns:
        ``count`` documents (at most the number of distinct service names), named after their
        service, each a few hundred words of on-call, escalation and retention details.
    """
    rng = random.Random(seed ^ 0x5EED)
    names = [f"{a}-{n}" for a in _ADJECTIVES for n in _NOUNS]
    names += [f"{a}-{n}-{k}" for k in range(2, 4) for a in _ADJECTIVES for n in _NOUNS]
    docs: dict[str, str] = {}
    for name in names[:count]:
        team = rng.choice(_NOUNS)
        minutes, days = rng.choice((5, 10, 15, 30)), rng.choice((7, 14, 30, 90))
        paragraphs = [
            f"# The {name} service runbook",
            f"On-call: the {team} team carries the pager for {name}. A page that is not "
            f"acknowledged within {minutes} minutes escalates to the {team} lead, then to the "
            "engineering manager on duty.",
            f"Retention: {name} keeps request logs for {days} days and metrics for a year.",
            *(
                f"Note {k}: {rng.choice(_TOPICS)} matters for {name}; see the design review "
                f"of {rng.choice(_ADJECTIVES)} {rng.choice(_NOUNS)} for the trade-offs."
                for k in range(1, 9)
            ),
        ]
        docs[f"{name}.md"] = "\n\n".join(paragraphs) + "\n"
    return docs


def service_names(documents: dict[str, str]) -> list[str]:
    """The service each corpus document is about, in the corpus's order."""
    return [name.removesuffix(".md") for name in documents]


def as_json(job: Job) -> dict[str, Any]:
    """A job as written to ``--json``: its index, tenant, goal and repeat class."""
    goal = asdict(job.goal)
    goal["tools"] = list(job.goal.tools)
    return {"index": job.index, "tenant": job.tenant, "text": job.text, "repeat": job.repeat} | {
        "goal": goal
    }
