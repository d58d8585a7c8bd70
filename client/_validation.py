"""Checks on what callers send, made before anything reaches Temporal.

Owns the rules a job request, an idempotency key and a human answer must meet beyond their
pydantic models: built-in tool names only, an existing documents folder, a key that can become
part of a workflow ID. Every refusal is an ``InvalidJobRequest`` naming the field that is wrong,
so a malformed job fails fast, even with no server to talk to.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from keel.activities.corpora import Corpora, corpus_name, valid_name
from keel.activities.webhook_hosts import WebhookHosts
from keel.client.errors import InvalidJobRequest
from keel.workflows.types import HumanInput, JobRequest

__all__ = ["REQUEST_KEY_RE", "human_input", "validate_request", "validate_request_key"]

REQUEST_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
"""Caller idempotency keys: the job ID is built from them, so no quotes, spaces or slashes."""


def validate_request(
    req: JobRequest | Mapping[str, Any], *, tenant: str | None = None
) -> JobRequest:
    """Validate a job request fully, without contacting Temporal.

    Runs the pydantic model's checks, then the ones it cannot do alone: every tool must be a
    built-in tool; a named corpus (``docs_dir="corpus:NAME"``) must be one the tenant may search
    when this process knows the corpora (``KEEL_CORPORA``); a folder must exist (resolved to an
    absolute path, so a worker on the same machine finds it whatever its working directory).

    Args:
        req: A ``JobRequest``, or a mapping to validate into one.
        tenant: The tenant the caller acts for (a scoped client): the request becomes that
            tenant's, and naming another one is refused.

    Returns:
        The request, with ``docs_dir`` made absolute.

    Raises:
        InvalidJobRequest: If any field is wrong; ``field`` is its dotted path.
    """
    try:
        request = req if isinstance(req, JobRequest) else JobRequest.model_validate(req)
    except ValidationError as err:
        raise InvalidJobRequest.from_validation_error(err) from None
    if tenant is not None and request.tenant != tenant:
        if "tenant" in request.model_fields_set:
            raise InvalidJobRequest("tenant", f"this client acts for tenant {tenant}")
        request = request.model_copy(update={"tenant": tenant})
    if request.callback_url is not None:
        hosts = WebhookHosts.from_env()
        if tenant is not None and not hosts.allows(request.tenant, request.callback_url):
            raise InvalidJobRequest(
                "callback_url", "host and port are not on your webhook allow-list"
            )
    # Imported here: the catalog builds the tools' argument models, which only submitting needs.
    from keel.activities.catalog import BUILTIN_TOOLS

    unknown = [name for name in request.tools if name not in BUILTIN_TOOLS]
    if unknown:
        raise InvalidJobRequest(
            "tools",
            f"unknown tool {', '.join(map(repr, unknown))}; "
            f"known tools: {', '.join(sorted(BUILTIN_TOOLS))}",
        )
    if (name := corpus_name(request.docs_dir)) is not None:
        corpora = Corpora.from_env()
        if not valid_name(name) or (
            corpora.configured and corpora.resolve(request.tenant, name) is None
        ):
            known = ", ".join(corpora.visible(request.tenant)) or "none"
            raise InvalidJobRequest("docs_dir", f"unknown corpus {name!r}; yours: {known}")
    elif request.docs_dir is not None:
        docs = Path(request.docs_dir).expanduser().resolve()
        if not docs.is_dir():
            problem = "is not a directory" if docs.exists() else "does not exist"
            raise InvalidJobRequest("docs_dir", f"{docs} {problem}")
        request = request.model_copy(update={"docs_dir": str(docs)})
    return request


def validate_request_key(request_key: str) -> str:
    """Check a caller's idempotency key.

    Args:
        request_key: 1-128 letters, digits, ``.``, ``_`` or ``-``, starting with a letter or
            digit.

    Returns:
        The key, unchanged.

    Raises:
        InvalidJobRequest: With ``field="request_key"`` if the key does not match.
    """
    if not REQUEST_KEY_RE.match(request_key):
        raise InvalidJobRequest(
            "request_key",
            "must be 1-128 characters of letters, digits, '.', '_' or '-', "
            "starting with a letter or digit",
        )
    return request_key


def human_input(answer: HumanInput | str) -> HumanInput:
    """An answer to a job's question as the model the workflow accepts.

    Args:
        answer: The answer, as text or a ``HumanInput``.

    Returns:
        The answer as a ``HumanInput``.

    Raises:
        InvalidJobRequest: If the text is blank or too long (``field="text"``).
    """
    if isinstance(answer, HumanInput):
        return answer
    try:
        return HumanInput(text=answer)
    except ValidationError as err:
        raise InvalidJobRequest.from_validation_error(err) from None
