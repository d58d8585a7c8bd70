"""Deterministic replies of the LLM simulator to Keel's calls and to plain chat requests.

This module owns what the simulator answers: the replies to Keel's three structured calls
(``keel_plan``, ``keel_answer``, ``keel_verdict``), tool arguments generated from a JSON schema,
and plain chat replies or tool calls. Pure: no I/O, no clocks, no randomness, so the same
request always gets the same reply. Fault injection, latency and counters live in the HTTP
layer (``workers.sim.state``).
"""

from __future__ import annotations

import re
from typing import Any

from keel.workers.sim.directives import MAX_PLAN_STEPS, Directives
from keel.workers.sim.wire import dumps, message_text

KEEL_KINDS = {"keel_plan": "plan", "keel_answer": "answer", "keel_verdict": "verify"}
"""Response-format schema names Keel sends, mapped to the request kind counted in stats."""
FAIL_CRITIQUE = "The draft does not use the observations in enough detail; refine it."
"""Critique of a verdict forced to fail by ``fail_verify``."""

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
    names = ", ".join(s["tool"] or "retrieval" for s in steps)
    return _plan("act", f"Gather what the goal needs with: {names}.", steps)


def answer_reply(payload: dict[str, Any], goal: str) -> dict[str, Any]:
    """The draft for a ``keel_answer`` request, built from the observations it was given."""
    observations = [o for o in payload.get("observations") or [] if isinstance(o, dict)]
    parts = [f"[{o.get('name', '?')}] {str(o.get('content') or '')[:200]}" for o in observations]
    text = f"Answer to: {goal}. " + " | ".join(parts)
    if critique := payload.get("critique"):
        text = f"{text.rstrip()} Revised after critique: {critique}"
    clarifications = [c for c in payload.get("clarifications") or [] if isinstance(c, dict)]
    if clarifications:
        answers = "; ".join(str(c.get("answer", "")) for c in clarifications)
        text = f"{text.rstrip()} Clarified: {answers}"
    return {"answer": text.strip()}


def verdict_reply(
    payload: dict[str, Any], directives: Directives, *, fail_first_verify: bool
) -> dict[str, Any]:
    """The verifier's judgement for a ``keel_verdict`` request.

    Args:
        payload: The user message's JSON document (``iteration`` is read).
        directives: Directives parsed from the goal; ``fail_verify`` wins over the config.
        fail_first_verify: The simulator-wide default, equivalent to ``fail_verify=1``.

    Returns:
        A dict that validates as Keel's ``Verdict``.
    """
    threshold = directives.fail_verify
    if threshold is None:
        threshold = 1 if fail_first_verify else 0
    iteration = payload.get("iteration")
    if not isinstance(iteration, int):
        iteration = 0
    if iteration < threshold:
        return {"passed": False, "score": 0.3, "critique": FAIL_CRITIQUE}
    return {
        "passed": True,
        "score": 0.9,
        "critique": "The draft answers the goal from the evidence.",
    }


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
