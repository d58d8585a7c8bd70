"""Custom search attributes Keel upserts so operators can find jobs in the Temporal UI and CLI.

Registered by ``keel dev``, the test fixtures and the deploy file. Deterministic: constants, and
the attributes a job starts with.
"""

from __future__ import annotations

from temporalio.common import SearchAttributeKey, SearchAttributePair, TypedSearchAttributes

from keel.workflows.types import JobRequest

KEEL_TENANT = SearchAttributeKey.for_keyword("KeelTenant")
KEEL_USER = SearchAttributeKey.for_keyword("KeelUser")
KEEL_STATE = SearchAttributeKey.for_keyword("KeelState")
KEEL_OUTCOME = SearchAttributeKey.for_keyword("KeelOutcome")
KEEL_MODE = SearchAttributeKey.for_keyword("KeelMode")
KEEL_TIER = SearchAttributeKey.for_keyword("KeelTier")
"""The model tier a job runs on (``fast`` or ``deep``): set at start when the caller forced it,
else by routing, and by escalation."""
KEEL_SESSION = SearchAttributeKey.for_keyword("KeelSession")
"""The session key of a session and of each of its turns (issue 15)."""
KEEL_DEGRADED = SearchAttributeKey.for_bool("KeelDegraded")
"""True on a job that ran on a fallback because a circuit breaker was open (issue 16)."""
KEEL_COST_USD = SearchAttributeKey.for_float("KeelCostUsd")
KEEL_TOKENS = SearchAttributeKey.for_int("KeelTokens")

ALL_KEYS = (
    KEEL_TENANT,
    KEEL_USER,
    KEEL_STATE,
    KEEL_OUTCOME,
    KEEL_MODE,
    KEEL_TIER,
    KEEL_SESSION,
    KEEL_DEGRADED,
    KEEL_COST_USD,
    KEEL_TOKENS,
)
"""Every key, for registration (``temporal server start-dev --search-attribute NAME=Type``)."""

RUNNING = "running"
"""``KeelState`` while a job works, from its start."""


def at_start(req: JobRequest, session: str | None = None) -> TypedSearchAttributes:
    """The search attributes a job starts with: whatever is known before it runs.

    They travel in the start request, so they cost no history event and no visibility write of
    their own; the workflow upserts only what changes (``workflows/_visibility.py``).

    Args:
        req: The job's request.
        session: The session key, for a session's turn.
    """
    pairs: list[SearchAttributePair[str]] = [
        SearchAttributePair(KEEL_TENANT, req.tenant),
        SearchAttributePair(KEEL_USER, req.user),
        SearchAttributePair(KEEL_STATE, RUNNING),
        SearchAttributePair(KEEL_MODE, req.mode),
    ]
    if req.tier != "auto":
        pairs.append(SearchAttributePair(KEEL_TIER, req.tier))
    if session is not None:
        pairs.append(SearchAttributePair(KEEL_SESSION, session))
    return TypedSearchAttributes(pairs)


CLI_TYPES = {"keyword": "Keyword", "double": "Double", "int": "Int", "bool": "Bool"}


def cli_flags() -> list[str]:
    """``--search-attribute NAME=Type`` flags for ``temporal server start-dev``."""
    flags: list[str] = []
    for key in ALL_KEYS:
        kind = CLI_TYPES[key.indexed_value_type.name.lower()]
        flags += ["--search-attribute", f"{key.name}={kind}"]
    return flags
