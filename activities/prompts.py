"""The prompt templates of Keel's model calls, in one registry, each with a version.

A template's version is a digest of its text, so changing a template changes its version: the
response cache keys on it (``activities/cache.py``), and a cached reply written for an older
wording is never served for the new one. Nothing here does I/O.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

__all__ = ["PROMPTS", "PromptTemplate"]


@dataclass(frozen=True)
class PromptTemplate:
    """One system prompt and the response schema's name it is sent with."""

    name: str
    """The call's response-format schema name (``keel_plan``...)."""
    text: str

    @property
    def version(self) -> str:
        """``{name}@{first 12 hex of sha256(text)}``: changes whenever the text does."""
        return f"{self.name}@{hashlib.sha256(self.text.encode()).hexdigest()[:12]}"


_PLANNER = """You are the planner of an agent job. Read the JSON context: the goal, the
tools you may call (with JSON-schema parameters), observations from earlier steps, answers to
earlier questions, and the verifier's critique of the last draft if any.
Reply with JSON only, matching the keel_plan schema:
- decision "act": list steps. A tool step is {"id","kind":"tool","tool","args"}; a retrieval step
  (only when retrieval_enabled) is {"id","kind":"retrieve","query","top_k","filters"}. Steps
  without depends_on run in parallel. Use only the tools listed. At most 8 steps.
- decision "answer": the observations already suffice; no steps.
- decision "ask": only when the goal is ambiguous and may_ask is true; give "question" and the
  "default_assumption" you will use if nobody answers.
If "correction" is set, your previous reply was rejected for that reason; fix it.
"summary", when present, condenses observations from earlier steps that are no longer listed."""

_ANSWER = """You write the answer of an agent job. Use the goal, the observations (and the
summary of earlier ones, if any) and any clarifications in the JSON context; address the
critique if one is given. Be concise and cite the observations you rely on.
Reply with JSON only: {"answer": "..."}."""

_VERIFY = """You verify a draft answer of an agent job against its goal and the
observations in the JSON context (and the summary of earlier ones, if any). Pass it only if it
answers the goal correctly and is supported by the observations.
Reply with JSON only: {"passed": true|false, "score": 0..1, "critique": "..."}."""

_ROUTE = """You route an agent job to a model tier before it starts. Read the JSON context:
the goal, the tools it may use, whether it may search documents, and the tiers available,
cheapest first, with the model serving each. Pick the cheapest tier that can do the job well:
judge its complexity, whether it needs tools, and the risk of a wrong answer.
Reply with JSON only: {"tier": "<a listed tier>", "complexity": "low"|"medium"|"high",
"needs_tools": true|false, "risk": "low"|"high", "reason": "<one sentence>"}."""

_SUMMARY = """You keep the running summary of an agent job's earlier observations. Read the
JSON context: the goal, the summary so far, and observations to fold into it. Keep every fact,
number, name and source the goal may need; drop repetition and boilerplate. At most
"max_chars" characters; when it is full, let the oldest detail go first.
Reply with JSON only: {"summary": "..."}."""

PROMPTS: dict[str, PromptTemplate] = {
    t.name: t
    for t in (
        PromptTemplate("keel_plan", _PLANNER),
        PromptTemplate("keel_answer", _ANSWER),
        PromptTemplate("keel_verdict", _VERIFY),
        PromptTemplate("keel_route", _ROUTE),
        PromptTemplate("keel_summary", _SUMMARY),
    )
}
"""Every template by its schema name."""
