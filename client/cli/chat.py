"""``keel chat``: an interactive conversation with an agent, held in a durable session.

Each line typed is a message of a session (issue 15), answered as it is written; ``/status``,
``/budget`` and ``/quit`` read and leave it. The session outlives the command:
``keel chat --session KEY`` picks it up again. At import this module loads typer and the
standard library only, like the other job commands; the loop (``_chat``) loads the Temporal
client, Redis and rich when the command runs.
"""

from __future__ import annotations

from typing import Annotated

import typer

from keel.client.cli._common import run

__all__ = ["chat"]


def chat(
    session: Annotated[
        str | None,
        typer.Option(
            "--session",
            metavar="KEY",
            help="Session to continue (default: a new one; its key is printed).",
        ),
    ] = None,
    tenant: Annotated[
        str | None, typer.Option(metavar="T", help="Tenant the session is billed to.")
    ] = None,
    user: Annotated[str | None, typer.Option(metavar="U", help="User who talks.")] = None,
    tool: Annotated[
        list[str] | None,
        typer.Option(
            "--tool", metavar="NAME", help="Allow a tool (repeat; default: calculator, write_note)."
        ),
    ] = None,
    docs: Annotated[
        str | None,
        typer.Option("--docs", metavar="DIR", help="Folder on the worker to search (operators)."),
    ] = None,
    corpus: Annotated[
        str | None,
        typer.Option("--corpus", metavar="NAME", help="Named corpus to search (KEEL_CORPORA)."),
    ] = None,
    max_turns: Annotated[
        int | None, typer.Option(metavar="N", help="Turns the whole session may run.")
    ] = None,
    max_tokens: Annotated[
        int | None, typer.Option(metavar="N", help="Tokens of the whole session.")
    ] = None,
    max_cost: Annotated[
        float | None,
        typer.Option(metavar="USD", help="Dollars the whole session may spend."),
    ] = None,
    tier: Annotated[
        str | None,
        typer.Option("--tier", metavar="auto|fast|deep", help="Model tier each turn starts on."),
    ] = None,
    no_cache: Annotated[
        bool,
        typer.Option("--no-cache", help="Serve nothing from Keel's caches and store nothing."),
    ] = False,
) -> None:
    """Talk with an agent: each line is a message of a durable session, answered live.

    The options other than --session apply when the first message opens the session.
    """

    async def main() -> None:
        from keel.client.cli._sessions import session_request, valid_key

        # Validate fully before connecting, so a malformed option fails fast with no server.
        key = valid_key(session, "session") if session is not None else None
        request = session_request(
            {
                "tenant": tenant,
                "user": user,
                "tools": tool,
                "docs_dir": f"corpus:{corpus}" if corpus else docs,
                "tier": tier,
                "cache": False if no_cache else None,
            },
            session_budget={
                name: value
                for name, value in {
                    "max_turns": max_turns,
                    "max_tokens": max_tokens,
                    "max_cost_usd": max_cost,
                }.items()
                if value is not None
            },
        )
        from keel.client.cli._chat import run_chat

        await run_chat(request, key)

    run(main)
