"""Deterministic replies of the LLM simulator to Keel's calls and to plain chat requests.

This module owns what the simulator answers: the replies to Keel's structured calls
(``keel_plan``, ``keel_answer``, ``keel_verdict``, ``keel_route``, ``keel_summary``), tool
arguments generated from a JSON schema, and plain chat replies or tool calls. Pure: no I/O, no
clocks, no randomness, so the same request always gets the same reply. Whether a draft is right,
a wrong one is caught or a route is right is the quality model's (``workers.sim.quality``);
fault injection, latency, counters and per-job truth live in the HTTP layer
(``workers.sim.state``).
"""

from __future__ import annotations

import re
from typing import Any, Literal

from keel.workers.sim.directives import MAX_PLAN_STEPS, Directives
from keel.workers.sim.quality import Route
from keel.workers.sim.wire import dumps, message_text

KEEL_KINDS = {
    "keel_plan": "plan",
    "keel_answer": "answer",
    "keel_verdict": "verify",
    "keel_route": "route",
    "keel_summary": "summary",
}
"""Response-format schema names Keel sends, mapped to the request kind counted in stats."""
FAIL_CRITIQUE = "The draft does not use the observations in enough detail; refine it."
"""Critique of a verdict forced to fail by ``fail_verify``."""
WRONG_CRITIQUE = "The result stated in the draft is wrong; recheck it against the goal."
"""Critique of a verdict that caught a wrong draft (it never names the right result)."""
SUMMARY_MAX_CHARS = 1000
"""A rolling summary never exceeds this, however long the job runs."""
_NEW_SUMMARY_CHARS = 600
"""Room for the new observations' clauses; the previous summary keeps the rest."""
_CLAUSE_CHARS = 120
"""One observation's clause in a summary, at most."""
_NO_OBSERVATIONS = "No observations yet."

_EXPR = re.compile(r"[\d(][\d\s.+\-*/()]*[\d)]")
_URL = re.compile(r"https?://[^\s\[\]()<>\"'`,]+")
_GOAL_FIELDS = frozenset({"title", "body", "text", "query", "content"})
_TYPE_DEFAULTS: dict[str, Any] = {"string": "", "integer": 0, "number": 0, "boolean": False}


def find_expression(text: str) -> str | None:
    """The first arithmetic expression in ``text`` (digits, ``+ - * / ( )``, one operator+)."""
    for match in _EXPR.finditer(text):
        expr = match.group().strip()
        while expr.endswith(")") and expr.count(")") > expr.count("("):
            expr = expr[:-1].rstrip()
        while expr.startswith("(") and expr.count("(") > expr.count(")"):
            expr = expr[1:].lstrip()
        if re.search(r"\d", expr) and re.search(r"[+\-*/]", expr):
            return expr
    return None


def find_url(text: str) -> str | None:
    """The first http(s) URL in ``text``, without trailing punctuation."""
    match = _URL.search(text)
    return match.group(0).rstrip(".,;:!?") if match else None


def _json_type(prop: dict[str, Any]) -> str:
    kind = prop.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind is None:
        options = prop.get("anyOf") or prop.get("oneOf")
        if isinstance(options, list) and options and isinstance(options[0], dict):
            return _json_type(options[0])
        return "object" if "properties" in prop else "string"
    return str(kind)


def build_args(schema: dict[str, Any], goal: str) -> dict[str, Any]:
    """Arguments for a tool (or a structured reply) generated from its JSON schema.

    Fills every required property, and optional ones that list ``examples``, in schema order.

    Args:
        schema: A JSON-schema object with ``properties`` and ``required``.
        goal: The clean goal text, mined for expressions, URLs and free text.

    Returns:
        A dict that validates against simple schemas like Keel's tool parameters.
    """
    props = schema.get("properties")
    if not isinstance(props, dict):
        return {}
    required = set(schema.get("required") or [])
    args: dict[str, Any] = {}
    for name, prop in props.items():
        prop = prop if isinstance(prop, dict) else {}
        if name in required or prop.get("examples"):
            args[name] = _arg_value(name, prop, goal)
    return args


def _arg_value(name: str, prop: dict[str, Any], goal: str) -> Any:
    if name == "expression" and (expr := find_expression(goal)):
        return expr
    if name == "url" and (url := find_url(goal)):
        return url
    if name == "query" and goal:
        return goal[:200]
    examples = prop.get("examples")
    if isinstance(examples, list) and examples:
        return examples[0]
    kind = _json_type(prop)
    if kind == "string" and name in _GOAL_FIELDS:
        return goal[:60] if name == "title" else goal
    if isinstance(prop.get("enum"), list) and prop["enum"]:
        return prop["enum"][0]
    if "default" in prop:
        return prop["default"]
    if kind == "object":
        return build_args(prop, goal)
    return [] if kind == "array" else _TYPE_DEFAULTS.get(kind)


def _plan(decision: str, rationale: str, steps: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "decision": decision,
        "rationale": rationale,
        "steps": steps,
        "question": None,
        "default_assumption": None,
    }


def _step(index: int, kind: str, **fields: Any) -> dict[str, Any]:
    step: dict[str, Any] = {
        "id": f"s{index}",
        "kind": kind,
        "tool": None,
        "args": {},
        "query": None,
        "top_k": 3,
    }
    return step | {"filters": {}, "depends_on": []} | fields


def plan_reply(payload: dict[str, Any], goal: str, directives: Directives) -> dict[str, Any]:
    """The planner's decision for a ``keel_plan`` request.

    Args:
        payload: The user message's JSON document.
        goal: The clean goal text.
        directives: Directives parsed from the goal.

    Returns:
        A dict that validates as Keel's ``Plan``.
    """
    if directives.ask and not payload.get("clarifications") and payload.get("may_ask", True):
        reply = _plan("ask", "The goal is ambiguous; asking before acting.", [])
        subject = goal[:60] or "request"
        reply["question"] = f'Which interpretation of "{subject}" do you mean? Please be specific.'
        reply["default_assumption"] = "Assume the most common interpretation."
        return reply
    if payload.get("observations") and not directives.replan:
        return _plan("answer", "The observations cover the goal; ready to answer.", [])
    tools = [t for t in payload.get("tools") or [] if isinstance(t, dict) and t.get("name")]
    named = [t for t in tools if str(t["name"]).lower() in goal.lower()]
    cap = min(directives.max_steps, MAX_PLAN_STEPS - 1)
    chosen = [t for t in (named or tools) for _ in range(directives.fanout)][:cap]
    steps = [
        _step(i, "tool", tool=t["name"], args=build_args(t.get("parameters") or {}, goal))
        for i, t in enumerate(chosen, start=1)
    ]
    if directives.use:
        steps.append(_step(len(steps) + 1, "tool", tool=directives.use, args={}))
    if payload.get("retrieval_enabled"):
        steps.append(_step(len(steps) + 1, "retrieve", query=goal))
    if not steps:
        return _plan("answer", "No tools or documents are available; answering directly.", [])
    if directives.duplicate_step_ids:
        steps = [step | {"id": "s1"} for step in steps]
    names = ", ".join(s["tool"] or "retrieval" for s in steps)
    return _plan("act", f"Gather what the goal needs with: {names}.", steps)


def answer_reply(payload: dict[str, Any], goal: str, fact: str) -> dict[str, Any]:
    """The draft for a ``keel_answer`` request, built from the observations it was given.

    Args:
        payload: The user message's JSON document.
        goal: The clean goal text.
        fact: The checkable result the draft states (``workers.sim.quality``): the goal's
            right fact when the drafting model is capable enough, a wrong one otherwise.

    Returns:
        ``{"answer": text}``, the text quoting the result, the observations, the critique and
        the clarifications.
    """
    observations = [o for o in payload.get("observations") or [] if isinstance(o, dict)]
    parts = [f"[{o.get('name', '?')}] {str(o.get('content') or '')[:200]}" for o in observations]
    text = f"Answer to: {goal}. Result: {fact}. " + " | ".join(parts)
    if critique := payload.get("critique"):
        text = f"{text.rstrip()} Revised after critique: {critique}"
    clarifications = [c for c in payload.get("clarifications") or [] if isinstance(c, dict)]
    if clarifications:
        answers = "; ".join(str(c.get("answer", "")) for c in clarifications)
        text = f"{text.rstrip()} Clarified: {answers}"
    return {"answer": text.strip()}


def iteration_of(payload: dict[str, Any]) -> int:
    """The ``iteration`` of a Keel request's JSON document (0 when absent or not an integer)."""
    iteration = payload.get("iteration")
    return iteration if isinstance(iteration, int) and not isinstance(iteration, bool) else 0


def verdict_reply(
    payload: dict[str, Any],
    directives: Directives,
    *,
    fail_first_verify: bool,
    judged: Literal["right", "caught", "missed"],
) -> dict[str, Any]:
    """The verifier's judgement for a ``keel_verdict`` request.

    Args:
        payload: The user message's JSON document (``iteration`` is read).
        directives: Directives parsed from the goal; ``fail_verify`` wins over the config.
        fail_first_verify: The simulator-wide default, equivalent to ``fail_verify=1``.
        judged: The quality model's view of the draft when no forced failure applies: right,
            wrong and caught, or wrong and missed.

    Returns:
        A dict that validates as Keel's ``Verdict``.
    """
    threshold = directives.fail_verify
    if threshold is None:
        threshold = 1 if fail_first_verify else 0
    if iteration_of(payload) < threshold:
        return {"passed": False, "score": 0.3, "critique": FAIL_CRITIQUE}
    if judged == "caught":
        return {"passed": False, "score": 0.2, "critique": WRONG_CRITIQUE}
    if judged == "missed":
        return {"passed": True, "score": 0.8, "critique": "The draft looks right."}
    return {
        "passed": True,
        "score": 0.9,
        "critique": "The draft answers the goal from the evidence.",
    }


def route_tiers(payload: dict[str, Any]) -> list[tuple[str, str]] | None:
    """A ``keel_route`` request's ``(tier, model)`` pairs, cheapest first; None if unreadable."""
    tiers = payload.get("tiers")
    if not isinstance(tiers, dict) or not tiers:
        return None
    if not all(isinstance(name, str) and isinstance(m, str) for name, m in tiers.items()):
        return None
    return list(tiers.items())


def route_reply(
    payload: dict[str, Any], chosen: Route, tiers: list[tuple[str, str]]
) -> dict[str, Any]:
    """The router's decision for a ``keel_route`` request.

    Args:
        payload: The user message's JSON document (``tools`` and ``retrieval_enabled``).
        chosen: The quality model's route (``workers.sim.quality.route``).
        tiers: The offered ``(tier, model)`` pairs.

    Returns:
        ``{"tier", "complexity", "needs_tools", "risk", "reason"}``; ``complexity`` and ``risk``
        follow the difficulty the router's choice implies, right or wrong.
    """
    level = chosen.claimed_difficulty
    complexity = "low" if level <= 1 else "medium" if level == 2 else "high"
    model = dict(tiers)[chosen.tier]
    tools = payload.get("tools")
    return {
        "tier": chosen.tier,
        "complexity": complexity,
        "needs_tools": isinstance(tools, list) and bool(tools),
        "risk": "high" if level >= 3 else "low",
        "reason": f"A {complexity}-complexity goal; the {chosen.tier} tier ({model}) fits it.",
    }


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def _fit(clauses: list[str], room: int) -> list[str]:
    """The newest of ``clauses`` (last first kept) whose ``"; "``-joined length fits ``room``."""
    kept: list[str] = []
    used = 0
    for clause in reversed(clauses):
        cost = len(clause) + (2 if kept else 0)
        if used + cost > room:
            break
        kept.append(clause)
        used += cost
    return kept[::-1]


def summary_reply(payload: dict[str, Any]) -> dict[str, Any]:
    """The rolling summary for a ``keel_summary`` request, within its ``max_chars``.

    Never over SUMMARY_MAX_CHARS, whatever the request asks for.

    The previous summary's clauses and one short clause per new observation (``name: content``)
    are joined with ``"; "``. When they do not fit, the newest observations keep up to
    ``_NEW_SUMMARY_CHARS`` and the previous summary's newest clauses the rest, so old detail
    fades and the summary stays bounded however long the job runs.

    Args:
        payload: The user message's JSON document (``summary``, ``observations`` and
            ``max_chars``).

    Returns:
        ``{"summary": text}``.
    """
    wanted = payload.get("max_chars")
    most = min(wanted, SUMMARY_MAX_CHARS) if isinstance(wanted, int) and wanted > 0 else None
    most = most or SUMMARY_MAX_CHARS
    previous = payload.get("summary")
    old = [
        _clip(c.strip(), SUMMARY_MAX_CHARS)
        for c in (previous if isinstance(previous, str) else "").split("; ")
        if c.strip() and c.strip() != _NO_OBSERVATIONS
    ]
    new = []
    for obs in payload.get("observations") or []:
        if not isinstance(obs, dict):
            continue
        content = obs.get("content")
        text = content if isinstance(content, str) else dumps(content)
        clause = " ".join(f"{obs.get('name', '?')}: {text}".split())
        # The clause separator inside a clause would split it in two on the next call.
        new.append(_clip(clause.replace("; ", ", "), _CLAUSE_CHARS))
    fresh = _fit(new, min(_NEW_SUMMARY_CHARS, most * 3 // 5))
    room = most - len("; ".join(fresh)) - (2 if fresh else 0)
    clauses = _fit(old, room) + fresh
    return {"summary": "; ".join(clauses) or _NO_OBSERVATIONS}


def chat_reply(
    messages: list[dict[str, Any]], goal: str, tools: Any, tool_choice: Any
) -> tuple[str | None, dict[str, str] | None]:
    """The reply to a chat request that carries no Keel schema.

    Calls one tool when tools are offered, tool_choice allows it and the conversation does not
    already end with a tool result; otherwise answers with a short deterministic text.

    Args:
        messages: The request's messages.
        goal: The clean text of the last user message.
        tools: The request's ``tools`` list, if any.
        tool_choice: ``"none"``, ``"auto"``, ``"required"`` or ``{"function": {"name": ...}}``.

    Returns:
        ``(content, None)`` for a text reply, or ``(None, {"name", "arguments"})`` for a call.
    """
    functions = [
        t["function"]
        for t in tools or []
        if isinstance(t, dict) and isinstance(t.get("function"), dict) and t["function"].get("name")
    ]
    last_role = messages[-1].get("role") if messages else None
    if not functions or tool_choice == "none" or last_role == "tool":
        if last_role == "tool":
            result = message_text(messages[-1].get("content"))[:200]
            return f"Simulated reply using the tool result: {result}", None
        return f"Simulated reply to: {goal[:200]}", None
    chosen = functions[0]
    if isinstance(tool_choice, dict):
        wanted = (tool_choice.get("function") or {}).get("name")
        chosen = next((f for f in functions if f["name"] == wanted), chosen)
    arguments = dumps(build_args(chosen.get("parameters") or {}, goal))
    return None, {"name": str(chosen["name"]), "arguments": arguments}
