"""What the session commands share: building a session request from options, and connecting.

``keel chat`` and ``keel submit --session`` both open a session with a ``SessionRequest`` built
here, validated fully before anything connects, so a malformed option fails fast with the field
that is wrong (exit code 2), exactly as a malformed ``keel submit`` does. Imported only when one
of those commands runs: it loads the models and the tool catalog.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from keel.client._validation import validate_request
from keel.client.cli._common import TASK_QUEUE_ENV
from keel.client.errors import InvalidJobRequest
from keel.workflows.session_types import SessionRequest
from keel.workflows.types import IDENT_RE

if TYPE_CHECKING:
    from keel.client.sessions import AgentSessions

__all__ = ["IDENT_HINT", "agent_sessions", "session_request", "valid_key"]

IDENT_HINT = "must be 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
"""Why a session key or message ID was refused (the rule of ``IDENT_RE``)."""


def valid_key(value: str, field: str) -> str:
    """Check a session key or message ID, which become part of workflow IDs.

    Args:
        value: The key.
        field: The name the error gives it (``session``, ``request_key``).

    Raises:
        InvalidJobRequest: If it is not 1-64 letters, digits, ``.``, ``_`` or ``-``.
    """
    if not IDENT_RE.match(value):
        raise InvalidJobRequest(field, IDENT_HINT)
    return value


def session_request(
    fields: dict[str, Any],
    *,
    turn_budget: dict[str, Any] | None = None,
    session_budget: dict[str, Any] | None = None,
    goal: str = "-",
) -> SessionRequest:
    """A validated session request from command options (``None`` options left out).

    Each turn of the session runs as a job with the session's tools, documents, tier and its
    turn budget, so those are checked as ``keel submit`` checks a job (built-in tools only, an
    existing folder or a known corpus), with the same field names; the session's own limits are
    then checked by its model.

    Args:
        fields: ``tenant``, ``user``, ``tools``, ``docs_dir``, ``tier``, ``cache``, ``mode``.
        turn_budget: Limits of each turn (``Budget`` fields).
        session_budget: Limits of the whole session (``SessionBudget`` fields).
        goal: A message about to be sent, checked as the goal of the job it becomes.

    Returns:
        The request, with ``docs_dir`` made absolute.

    Raises:
        InvalidJobRequest: Naming the field that is wrong.
    """
    given = {name: value for name, value in fields.items() if value is not None}
    # Validated as the job every turn becomes; each later message is checked when it is sent.
    as_job = validate_request({"goal": goal, **given, "budget": turn_budget or {}})
    data: dict[str, Any] = {
        **given,
        "docs_dir": as_job.docs_dir,
        "turn_budget": as_job.budget,
        "budget": session_budget or {},
    }
    try:
        return SessionRequest.model_validate(data)
    except ValidationError as err:
        raise InvalidJobRequest.from_validation_error(err) from None


async def agent_sessions() -> AgentSessions:
    """An ``AgentSessions`` on a client connected from the environment.

    ``KEEL_TASK_QUEUE`` pins the queue sessions and their turns run on, as for jobs.
    """
    from keel.client.connect import connect
    from keel.client.sessions import AgentSessions

    return AgentSessions(await connect(), task_queue=os.environ.get(TASK_QUEUE_ENV) or None)
