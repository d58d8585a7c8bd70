"""The built-in tools' names, descriptions and argument models.

Owns the *shape* of every built-in tool: what the model may call and with which arguments,
and what the gateway and the workflow may assume about it: its annotations (read-only,
destructive, idempotent, requires-approval; issue 16), its behaviour version, and how long its
results may be served from the tool-result cache.
The client imports this module to check ``--tool`` names when a job is submitted, and the
tool gateway (``activities/tools/gateway.py``) validates arguments against these models, so it
depends only on pydantic and the standard library and performs no I/O. Not workflow code,
though it is deterministic and safe to import anywhere.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

__all__ = [
    "BUILTIN_TOOLS",
    "CalculatorArgs",
    "HttpGetArgs",
    "HttpPostArgs",
    "SearchDocsArgs",
    "ToolInfo",
    "WriteNoteArgs",
    "tool_schema",
]


class CalculatorArgs(BaseModel):
    """Arguments of ``calculator``."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    expression: str = Field(max_length=500, examples=["2 * (3 + 4)"])
    """Arithmetic expression: numbers, + - * / // % **, parentheses, sqrt, log, exp, sin, cos,
    abs, round, min, max and the constants pi and e."""


def _has_host(value: str) -> str:
    if not urlsplit(value).hostname:
        raise ValueError("URL has no host")
    return value


_HttpUrl = Annotated[str, Field(max_length=2048, pattern=r"^https?://"), AfterValidator(_has_host)]
"""An absolute http or https URL with a host, as the HTTP tools take it (kept as text: the
worker's allow-list, not pydantic's URL normalisation, decides where it may go)."""


class HttpGetArgs(BaseModel):
    """Arguments of ``http_get``."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    url: _HttpUrl = Field(examples=["http://127.0.0.1:8000/"])
    """Absolute http or https URL; its host and port must be on the worker's allow-list."""


HTTP_POST_MAX_BODY_CHARS = 16_000
"""Longest JSON body ``http_post`` sends, serialised; the arguments travel in history."""


class HttpPostArgs(BaseModel):
    """Arguments of ``http_post``."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    url: _HttpUrl = Field(examples=["http://127.0.0.1:8000/hook"])
    """Absolute http or https URL; its host and port must be on the worker's allow-list."""
    body: dict[str, Any] = Field(examples=[{"text": "Keel update"}])
    """JSON object sent as the request body."""

    @field_validator("body")
    @classmethod
    def _bounded(cls, value: dict[str, Any]) -> dict[str, Any]:
        if len(json.dumps(value, separators=(",", ":"))) > HTTP_POST_MAX_BODY_CHARS:
            raise ValueError(f"the JSON body is longer than {HTTP_POST_MAX_BODY_CHARS} characters")
        return value


class WriteNoteArgs(BaseModel):
    """Arguments of ``write_note``."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    title: str = Field(min_length=1, max_length=200, examples=["Keel note"])
    """Short title of the note."""
    body: str = Field(min_length=1, max_length=20000, examples=["Body of the note."])
    """Text of the note."""


class SearchDocsArgs(BaseModel):
    """Arguments of ``search_docs``."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    query: str = Field(min_length=1, max_length=1000, examples=["retry policy"])
    """Search text."""
    top_k: int = Field(default=5, ge=1, le=20, examples=[5])
    """How many documents to return at most."""
    filters: dict[str, str] = Field(default_factory=dict, examples=[{}])
    """Equality filters over document metadata (``ext``, ``dir``, front-matter keys)."""


@dataclass(frozen=True)
class ToolInfo:
    """What the model, the gateway and the workflow know about one tool.

    The annotations follow MCP's tool hints: ``read_only``, ``destructive``, ``idempotent``,
    and Keel's own ``requires_approval``. ``__post_init__`` refuses combinations the gateway
    could not honour.
    """

    name: str
    """Name the model uses to call the tool."""
    description: str
    """One-line description shown to the model."""
    args_model: type[BaseModel]
    """Pydantic model the gateway validates the arguments against."""
    side_effecting: bool = False
    """True when the tool changes the world; the gateway then records its result per op_key."""
    read_only: bool = False
    """True when the tool only reads, so a result may be served again to the same tenant for
    the same arguments (``activities/tools/result_cache.py``). Never true of a side-effecting
    tool: serving a write from a cache would skip the effect."""
    version: str = "1"
    """The tool's behaviour version. It is part of every cache key, so bumping it when the
    tool's output for the same arguments changes stops old results being served."""
    cache_ttl_seconds: float = 0.0
    """How long a result of this read-only tool may be served from the tool-result cache
    (capped by the worker's ``CacheSettings``); 0: never cached by the gateway."""
    destructive: bool = False
    """True when the tool's effect cannot be taken back. Such a tool implements ``preview``
    besides its call (``activities/tools/base.py``, ``Previewable``): the act phase only
    previews it, and the write commits after the verifier accepts the answer that depends on
    it. Only a side-effecting tool can be destructive."""
    idempotent: bool = False
    """True when repeating a call under the same op_key has no further effect even after it
    ran to the end: a read, or a write keyed by op_key in its own store (``write_note``). A
    write to someone else's system (``http_post``) is not: its receiver decides, so the tool
    sends it an idempotency key derived from the op_key. A read-only tool is idempotent
    whatever this says (``annotations``)."""
    requires_approval: bool = False
    """True when a person must approve each write before it commits (stop-and-ask: the job
    waits in ``waiting_for_input`` for the ``approve`` or ``reject`` update). Only a
    destructive tool can require approval."""

    def __post_init__(self) -> None:
        """Refuse a declaration the gateway could not honour.

        Raises:
            ValueError: If a side-effecting tool is declared read-only, a tool that is not
                read-only (or has a negative or non-finite TTL) declares a cache TTL, a
                destructive tool is not side-effecting, or a tool requiring approval is not
                destructive.
        """
        if self.side_effecting and self.read_only:
            raise ValueError(f"tool {self.name!r} cannot be both side-effecting and read-only")
        if self.destructive and not self.side_effecting:
            raise ValueError(f"tool {self.name!r} is destructive but not side-effecting")
        if self.requires_approval and not self.destructive:
            raise ValueError(f"tool {self.name!r} requires approval but is not destructive")
        if not math.isfinite(self.cache_ttl_seconds) or self.cache_ttl_seconds < 0:
            raise ValueError(f"tool {self.name!r}: cache_ttl_seconds must be finite and >= 0")
        if self.cache_ttl_seconds > 0 and not self.read_only:
            raise ValueError(f"tool {self.name!r} is cached but not declared read-only")
        if not self.version:
            raise ValueError(f"tool {self.name!r} needs a version")

    def annotations(self) -> dict[str, bool]:
        """The tool's annotations by name, for people (logs, docs) to read."""
        return {
            "read_only": self.read_only,
            "destructive": self.destructive,
            "idempotent": self.idempotent or self.read_only,
            "requires_approval": self.requires_approval,
        }

    @property
    def cacheable(self) -> bool:
        """Whether the gateway may serve this tool's results from the tool-result cache."""
        return self.read_only and self.cache_ttl_seconds > 0

    def schema(self) -> dict[str, Any]:
        """The tool's description for a prompt.

        Returns:
            ``{"name", "description", "parameters"}`` with the args model's JSON schema.
        """
        return {
            "name": self.name,
            "description": self.description,
            "parameters": json_schema(self.args_model),
        }


_CALCULATOR_TTL = 7 * 86_400.0
_HTTP_GET_TTL = 300.0


@functools.cache
def json_schema(model: type[BaseModel]) -> dict[str, Any]:
    """A model's JSON schema, built once per process (building it costs about a millisecond).

    Callers must not mutate the returned dict.
    """
    return model.model_json_schema()


BUILTIN_TOOLS: dict[str, ToolInfo] = {
    info.name: info
    for info in (
        ToolInfo(
            "calculator",
            "Evaluate an arithmetic expression exactly and return the number.",
            CalculatorArgs,
            read_only=True,
            idempotent=True,
            # Pure arithmetic: the answer never goes stale, only the tool's version can change.
            cache_ttl_seconds=_CALCULATOR_TTL,
        ),
        ToolInfo(
            "http_get",
            "Fetch a URL with HTTP GET and return the status and the start of the body.",
            HttpGetArgs,
            read_only=True,
            idempotent=True,
            # Pages change: a short TTL bounds how stale a served page can be.
            cache_ttl_seconds=_HTTP_GET_TTL,
        ),
        ToolInfo(
            "write_note",
            "Save a note (title and body) for the user. Writes once per plan step.",
            WriteNoteArgs,
            side_effecting=True,
            # Previewed in the act phase, written once the answer is verified; the store
            # writes at most one note per op_key, so a repeated commit changes nothing.
            destructive=True,
            idempotent=True,
        ),
        ToolInfo(
            "http_post",
            "POST a JSON body to an allow-listed URL. A person approves each request before "
            "it is sent, after the answer is verified.",
            HttpPostArgs,
            side_effecting=True,
            destructive=True,
            # The receiver decides what a repeat does; it gets a Stripe-style Idempotency-Key
            # derived from the op_key, the same on every retry of one commit.
            idempotent=False,
            requires_approval=True,
        ),
        ToolInfo(
            "search_docs",
            "Search the job's documents and return the best-matching passages.",
            SearchDocsArgs,
            read_only=True,
            idempotent=True,
            # Not cached here: its hits depend on the corpus contents, and the Retriever it
            # calls knows the corpus index version and keeps the retrieval top-k cache keyed by
            # it. A tool-level entry would need a second folder scan before every lookup to
            # learn that version, and would store the same hits twice.
            cache_ttl_seconds=0.0,
        ),
    )
}
"""The tools every worker registers, by name."""


def tool_schema(name: str) -> dict[str, Any]:
    """The prompt description of a built-in tool.

    Args:
        name: A key of ``BUILTIN_TOOLS``.

    Returns:
        ``{"name", "description", "parameters"}``.

    Raises:
        KeyError: If ``name`` is not a built-in tool.
    """
    return BUILTIN_TOOLS[name].schema()
