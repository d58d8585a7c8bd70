"""Deterministic reply logic behind the OpenAI-compatible LLM simulator.

This module owns what ``workers/simulator.py`` computes from a request body: the
``[sim: ...]`` directives a goal may carry, the replies to Keel's three structured calls
(``keel_plan``, ``keel_answer``, ``keel_verdict``), tool arguments generated from a JSON
schema, hashed bag-of-words embeddings and token accounting. Everything here is pure: no I/O,
no clocks, no randomness, so the same request always gets the same reply. Fault injection,
latency and counters live in the HTTP layer.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import re
import struct
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

KEEL_KINDS = {"keel_plan": "plan", "keel_answer": "answer", "keel_verdict": "verify"}
"""Response-format schema names Keel sends, mapped to the request kind counted in stats."""
FAULT_KINDS = ("500", "503", "429", "timeout", "malformed", "malformed_plan", "401", "400")
"""Every fault a ``fault=`` directive (or the random fault rate) can inject."""
DEFAULT_MAX_STEPS = 4
"""Tool steps in a plan when the goal carries no ``steps=`` directive."""
EMBEDDING_DIM = 64
"""Length of every embedding vector."""
MALFORMED_CONTENT = "Sure! Here is the plan: {oops"
"""Content of a ``malformed`` fault: chatty and not valid JSON, like a misbehaving model."""
FAIL_CRITIQUE = "The draft does not use the observations in enough detail; refine it."
"""Critique of a verdict forced to fail by ``fail_verify``."""

_DIRECTIVE = re.compile(r"\[sim:\s*([^\]]*)\]", re.IGNORECASE)
_FAULT = re.compile(r"^(\d{3}|[a-z_]+)(?:x(\d+))?$")
_EXPR = re.compile(r"[\d(][\d\s.+\-*/()]*[\d)]")
_URL = re.compile(r"https?://[^\s\[\]()<>\"'`,]+")
_WORD = re.compile(r"\w+")
_GOAL_FIELDS = frozenset({"title", "body", "text", "query", "content"})
_TYPE_DEFAULTS: dict[str, Any] = {"string": "", "integer": 0, "number": 0, "boolean": False}
_MAX_PLAN_STEPS = 16
"""Keel's ``Plan.steps`` limit; the simulator never emits more."""


@dataclass(frozen=True)
class Directives:
    """Behaviour switches parsed from a goal's ``[sim: ...]`` bracket."""

    ask: bool = False
    """Ask a clarifying question before acting (once, and only when allowed)."""
    fail_verify: int | None = None
    """Verdicts fail while ``iteration`` is below this; None leaves it to the config."""
    fault: str | None = None
    """One of FAULT_KINDS to inject, or None."""
    fault_count: int | None = None
    """How many requests get the fault; None means every one."""
    slow_ms: float = 0.0
    """Extra latency for requests carrying this goal."""
    extra_tokens: int = 0
    """Added to the reported completion tokens, to exhaust token budgets."""
    max_steps: int = DEFAULT_MAX_STEPS
    """Cap on tool steps in a plan."""
    fanout: int = 1
    """Steps per chosen tool (same arguments), to shape benchmark jobs."""
    replan: bool = False
    """Plan tool steps on every iteration instead of answering once observations exist."""
    use: str | None = None
    """A tool to put in the plan even if it was not offered (to exercise the allow-list)."""


@lru_cache(maxsize=1024)
def parse_goal(goal: str) -> tuple[str, Directives]:
    """Split a goal into its clean text and its simulator directives.

    Only the first ``[sim: ...]`` bracket is read; unknown keys and unreadable values are
    ignored so tools may carry their own keys (``big=``) in the same bracket.

    Args:
        goal: The goal text as the caller wrote it.

    Returns:
        The goal with the bracket removed and stripped, and the parsed directives.
    """
    match = _DIRECTIVE.search(goal)
    if match is None:
        return goal.strip(), Directives()
    clean = f"{goal[: match.start()].rstrip()} {goal[match.end() :].lstrip()}".strip()
    values: dict[str, Any] = {}
    for item in match.group(1).split(","):
        key, _, raw = (part.strip().lower() for part in item.partition("="))
        try:
            if key == "ask":
                values["ask"] = True
            elif key == "fail_verify":
                values["fail_verify"] = int(raw)
            elif key == "slow":
                values["slow_ms"] = max(0.0, float(raw))
            elif key == "tokens":
                values["extra_tokens"] = max(0, int(raw))
            elif key == "steps":
                values["max_steps"] = max(0, int(raw))
            elif key == "fanout":
                values["fanout"] = max(1, min(int(raw), _MAX_PLAN_STEPS - 1))
            elif key == "replan":
                values["replan"] = True
            elif key == "use" and raw:
                values["use"] = raw
            elif key == "fault" and (fault := _FAULT.match(raw)) and fault[1] in FAULT_KINDS:
                values["fault"] = fault[1]
                values["fault_count"] = int(fault[2]) if fault[2] else None
        except ValueError:
            continue
    return clean, Directives(**values)


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
    cap = min(directives.max_steps, _MAX_PLAN_STEPS - 1)
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


def message_text(content: Any) -> str:
    """The text of a chat message's content, whether a string or a list of content parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)
        )
    return ""


def count_tokens(text: str) -> int:
    """Tokens the simulator bills for ``text``: one per four characters, rounded up."""
    return math.ceil(len(text) / 4)


def response_schema(response_format: Any) -> tuple[str | None, dict[str, Any]]:
    """The ``json_schema`` name and schema of a response_format (``"json_object"`` for that type).

    Returns ``(None, {})`` when the request asks for plain text.
    """
    if not isinstance(response_format, dict):
        return None, {}
    if response_format.get("type") == "json_object":
        return "json_object", {}
    spec = response_format.get("json_schema")
    if response_format.get("type") == "json_schema" and isinstance(spec, dict):
        schema = spec.get("schema")
        return str(spec.get("name", "")), schema if isinstance(schema, dict) else {}
    return None, {}


def max_tokens(body: dict[str, Any]) -> int | None:
    """The completion cap of a chat request (``max_completion_tokens`` wins over ``max_tokens``)."""
    for key in ("max_completion_tokens", "max_tokens"):
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def truncate(text: str, limit: int | None) -> tuple[str, bool]:
    """Cut ``text`` to ``limit`` tokens the way a model stops mid-output (JSON left invalid).

    Returns:
        The possibly shortened text and whether it was cut.
    """
    if limit is not None and limit < count_tokens(text):
        return text[: max(0, limit) * 4], True
    return text, False


def tool_call_id(name: str, arguments: str) -> str:
    """A deterministic tool-call id derived from the call itself."""
    return "call_" + hashlib.sha256(f"{name}:{arguments}".encode()).hexdigest()[:24]


def fault_key(goal: str, kind: str) -> str:
    """Key of the per-goal fault counter (the raw goal, directive included, plus the kind)."""
    return hashlib.sha256(goal.encode()).hexdigest()[:32] + ":" + kind


def dumps(value: Any) -> str:
    """Compact JSON, as models emit it."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


@lru_cache(maxsize=65536)
def _bucket(word: str) -> tuple[int, float]:
    digest = hashlib.blake2b(word.encode(), digest_size=8).digest()
    return digest[0] % EMBEDDING_DIM, 1.0 if digest[1] & 1 else -1.0


def embed(text: str) -> list[float]:
    """A hashed bag-of-words vector of EMBEDDING_DIM floats, L2-normalised.

    Texts without words get a fixed unit vector so every result has norm 1.
    """
    vector = [0.0] * EMBEDDING_DIM
    for word in _WORD.findall(text.lower()):
        index, sign = _bucket(word)
        vector[index] += sign
    norm = math.sqrt(sum(v * v for v in vector))
    if norm == 0.0:
        vector[0] = 1.0
        return vector
    return [v / norm for v in vector]


def embedding_base64(vector: list[float]) -> str:
    """The vector as little-endian float32 bytes, base64-encoded (``encoding_format=base64``)."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
