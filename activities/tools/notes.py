"""The ``write_note`` tool: a destructive write, previewed first and made exactly once per op_key.

The act phase only previews the note (``preview``: what would be written, nothing touched); the
commit, after the answer is verified, writes it. Not workflow code: writes to Redis through
``KeelStore``. An existing note for the same op_key counts as success, so a retried attempt, or
one the gateway's record missed, changes nothing.
"""

from __future__ import annotations

from keel.activities.catalog import WriteNoteArgs
from keel.activities.store import KeelStore
from keel.activities.tools.base import PREVIEW_MAX_CHARS, ToolContext

__all__ = ["WriteNote"]


class WriteNote:
    """Write a note at most once per op_key; an existing note counts as success."""

    def __init__(self, store: KeelStore) -> None:
        self._store = store

    async def preview(self, args: WriteNoteArgs, ctx: ToolContext) -> str:
        """What the commit would write: the title and the start of the body; writes nothing.

        Args:
            args: Title and body.
            ctx: The call's context (unused: a preview touches no store).

        Returns:
            ``would write note "<title>" (<n> characters): <start of the body>``.
        """
        head = f'would write note "{args.title}" ({len(args.body)} characters): '
        room = max(0, PREVIEW_MAX_CHARS - len(head))
        body = args.body if len(args.body) <= room else args.body[: max(0, room - 1)] + "…"
        return (head + body)[:PREVIEW_MAX_CHARS]

    async def __call__(self, args: WriteNoteArgs, ctx: ToolContext) -> str:
        """Write the note under ``ctx.op_key`` unless it is already written.

        Args:
            args: Title and body.
            ctx: The tenant, the op_key the write is keyed by, and the job.

        Returns:
            ``note <key> written``, or ``note <key> already written`` on a repeat.
        """
        key, created = await self._store.write_note_once(
            ctx.tenant, ctx.op_key, args.title, args.body, ctx.job_id
        )
        return f"note {key} written" if created else f"note {key} already written"
