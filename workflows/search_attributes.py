"""Custom search attributes Keel upserts so operators can find jobs in the Temporal UI and CLI.

Registered by ``keel dev``, the test fixtures and the deploy file. Deterministic constants only.
"""

from __future__ import annotations

from temporalio.common import SearchAttributeKey

KEEL_TENANT = SearchAttributeKey.for_keyword("KeelTenant")
KEEL_USER = SearchAttributeKey.for_keyword("KeelUser")
KEEL_STATE = SearchAttributeKey.for_keyword("KeelState")
KEEL_OUTCOME = SearchAttributeKey.for_keyword("KeelOutcome")
KEEL_MODE = SearchAttributeKey.for_keyword("KeelMode")
KEEL_TIER = SearchAttributeKey.for_keyword("KeelTier")
KEEL_SESSION = SearchAttributeKey.for_keyword("KeelSession")
"""The session key of a session and of each of its turns (issue 15)."""
"""The model tier a job runs on (``fast`` or ``deep``), set by routing and escalation."""
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

CLI_TYPES = {"keyword": "Keyword", "double": "Double", "int": "Int", "bool": "Bool"}


def cli_flags() -> list[str]:
    """``--search-attribute NAME=Type`` flags for ``temporal server start-dev``."""
    flags: list[str] = []
    for key in ALL_KEYS:
        kind = CLI_TYPES[key.indexed_value_type.name.lower()]
        flags += ["--search-attribute", f"{key.name}={kind}"]
    return flags
