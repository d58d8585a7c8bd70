"""The ``keel chat`` loop: read a line, send it to the session, stream the turn's answer.

Each line is a message of a durable session (``AgentSessions.send``, a fresh message ID each);
the turn it becomes is an agent job, followed exactly as ``keel watch`` follows one: progress
from the job's workflow stream, the answer's tokens from Redis (when ``REDIS_URL`` is set) as
the answer activity writes them, then the job's result. A turn that asks a question stops the
view, shows the question, and the next line answers it (sent to the session, which passes it
to the turn); the view then resumes where it stopped, from the event cursor.

The session holds the truth, not this process: quitting (``/quit``, end of input, Ctrl-C)
leaves the session and any turn in progress running, and ``keel chat --session KEY`` resumes it.
Talks to Temporal and Redis directly, as ``keel submit`` does.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import threading
from collections.abc import AsyncIterator

from redis.exceptions import RedisError
from rich.console import Console
from rich.live import Live
from rich.text import Text

from keel.activities.answer_tokens import mark_watched
from keel.activities.redis_client import KeelRedis, connect
from keel.client._events import EventCursor, JobStreamEvent
from keel.client.cli._session_view import answer_text, budget_table, status_lines
from keel.client.cli._sessions import agent_sessions
from keel.client.cli.render import EventView, stdout_console
from keel.client.errors import AgentJobError, JobNotFound
from keel.client.sessions import AgentSessions, SessionNotFound, SessionRefused
from keel.workflows.session_types import (
    SessionRequest,
    SessionStatus,
    TurnAccepted,
    session_id_for,
)
from keel.workflows.types import JobProgress, JobResult

__all__ = ["run_chat"]

COMMANDS_HELP = "/status, /budget, /quit (or end of input) to leave"
STATUS_TIMEOUT_SECONDS = 10.0
"""A session query waits this long for a worker before the chat says none answered."""
HANDOFF_SECONDS = 10.0
"""How long the chat waits for the session to see a turn's question, and for the turn to take
an answer, before it carries on regardless (the session still orders whatever it receives)."""


async def run_chat(request: SessionRequest, key: str | None) -> None:
    """Hold a conversation on stdin and stdout until the user leaves.

    Args:
        request: The session's request, used if the first message opens the session.
        key: The session to continue; ``None`` starts a new one with a generated key.

    Raises:
        SessionRefused: The session refused a message (a budget is exhausted, or it ended).
        AgentJobError: Temporal could not be reached, or a turn could not be followed.
    """
    from uuid import uuid4

    sessions = await agent_sessions()
    url = os.environ.get("REDIS_URL", "").strip()
    tokens = connect(url, socket_timeout=5) if url else None
    chat = _Chat(sessions, request, key or f"chat-{uuid4().hex[:12]}", tokens)
    try:
        await chat.run(resuming=key is not None)
    except asyncio.CancelledError:  # Ctrl-C: the session carries on, say how to come back
        chat.bye()
        raise
    finally:
        if tokens is not None:
            await tokens.aclose()


class _Leave(Exception):
    """The user left (``/quit`` or end of input) while a turn waited for an answer."""


class _Chat:
    """One chat: the session it talks to, the console, and the line reader."""

    def __init__(
        self,
        sessions: AgentSessions,
        request: SessionRequest,
        key: str,
        tokens: KeelRedis | None,
    ) -> None:
        self._sessions = sessions
        self._req = request
        self._key = key
        self._tokens = tokens
        self._console = stdout_console()
        self._reader = _LineReader(self._console)
        self._session_id = session_id_for(request.tenant, key)
        self._waiting_job: str | None = None
        """A turn that was waiting for an answer when the chat resumed the session."""
        self._later: list[TurnAccepted] = []
        """Turns this chat sent that run after the one being followed."""

    async def run(self, *, resuming: bool) -> None:
        """Greet, then send each line and show its turn, until the user leaves."""
        await self._greet(resuming)
        try:
            while (text := await self._next_message("you> ")) is not None:
                self._later.append(await self._send(text))
                while self._later:
                    await self._follow(self._later.pop(0))
        except _Leave:
            pass
        self.bye()

    def bye(self) -> None:
        """Say that the session stays, and how to come back to it."""
        tenant = f" --tenant {self._req.tenant}" if self._req.tenant != "default" else ""
        self._console.print(
            f"session {self._key} kept. Resume with: keel chat --session {self._key}{tenant}",
            markup=False,
        )

    async def _greet(self, resuming: bool) -> None:
        status = await self._status(quiet_if_new=True) if resuming else None
        if status is None:
            self._console.print(Text.assemble(("new session ", "bold"), self._key))
        else:
            self._console.print(
                Text.assemble(
                    ("session ", "bold"),
                    self._key,
                    f": {status.usage.turns} turn(s) so far, {status.phase}",
                )
            )
            waiting = next((t for t in status.turns if t.state == "waiting_for_input"), None)
            if waiting is not None:
                self._waiting_job = waiting.job_id
                self._ask(waiting.answer or "")
        self._console.print(f"Type a message; {COMMANDS_HELP}.", style="dim", markup=False)

    async def _next_message(self, prompt: str) -> str | None:
        """The next line that is a message, running commands met on the way; None to leave."""
        while (line := await self._reader.read(prompt)) is not None:
            text = line.strip()
            if not text:
                continue
            if not text.startswith("/"):
                return text
            name = text.split()[0].lower()
            if name in ("/quit", "/exit"):
                return None
            if name == "/status":
                if (status := await self._status()) is not None:
                    status_lines(self._console, self._key, status)
            elif name == "/budget":
                if (status := await self._status()) is not None:
                    self._console.print(budget_table(status))
            else:
                self._console.print(f"unknown command {name}; {COMMANDS_HELP}", markup=False)
        return None

    async def _status(self, *, quiet_if_new: bool = False) -> SessionStatus | None:
        """The session's snapshot, or None (said why) when it has none to give."""
        try:
            return await asyncio.wait_for(
                self._sessions.status(self._session_id), STATUS_TIMEOUT_SECONDS
            )
        except SessionNotFound:
            if not quiet_if_new:
                self._console.print("no messages yet: the session opens with the first one")
        except TimeoutError:
            self._console.print(
                f"the session did not answer within {STATUS_TIMEOUT_SECONDS:g} s "
                "(is a worker running?)"
            )
        return None

    async def _send(self, text: str) -> TurnAccepted:
        accepted = await self._sessions.send(self._req, self._key, text)
        await self._mark(accepted.job_id)
        if accepted.job_id == self._waiting_job:
            # The line answered the question the turn asked before this chat started: follow
            # it once it has taken the answer, or its old question would be asked again.
            self._waiting_job = None
            await self._answer_taken(accepted.job_id)
        elif accepted.ahead:
            ahead = f"queued: {accepted.ahead} turn(s) run before this one"
            self._console.print(ahead, style="dim", markup=False)
        return accepted

    async def _follow(self, accepted: TurnAccepted) -> None:
        """Show a turn until it ends, answering the questions it asks on the way."""
        after: EventCursor | None = None
        while True:
            stopped = await self._show(accepted.job_id, await self._events(accepted, after))
            if isinstance(stopped, JobResult):
                for line in answer_text(accepted.turn, stopped):
                    self._console.print(line)
                return
            await self._answer(accepted)
            after = stopped

    async def _events(
        self, accepted: TurnAccepted, after: EventCursor | None
    ) -> AsyncIterator[JobStreamEvent]:
        """The turn's event stream, once its job exists (a queued turn's job starts later).

        Raises:
            SessionRefused: The session will never run the turn.
        """
        pause = 0.05
        while True:
            try:
                return await self._sessions.jobs.events(
                    accepted.job_id, after=after, tokens=self._tokens
                )
            except JobNotFound:
                if (refused := await self._not_run(accepted.turn)) is not None:
                    raise refused from None
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.5)

    async def _not_run(self, turn: int) -> SessionRefused | None:
        """Why the session will not run ``turn`` (it has no job yet), or None if it still may.

        The session accepts a message when its budgets have room, and checks them again
        when the turn's time comes: spending in between (a summary call) can refuse it then.
        """
        status = await self._sessions.status(self._session_id)
        record = next((t for t in status.turns if t.turn == turn), None)
        if record is None:
            return None
        if record.state == "done" and record.outcome is None:
            if (budget := status.exhausted_budget) is not None:
                reason = f"session budget {budget} is exhausted"
                return SessionRefused(
                    self._session_id, reason, code="budget_exhausted", budget=budget
                )
            return SessionRefused(self._session_id, record.answer or "the turn was not run")
        if record.state == "queued" and status.phase == "ended":
            reason = "the session ended before this turn ran"
            return SessionRefused(self._session_id, reason, code="ended")
        return None

    async def _show(
        self, job_id: str, events: AsyncIterator[JobStreamEvent]
    ) -> JobResult | EventCursor:
        """Show the turn live; its result, or the cursor after a question it waits on."""
        view = EventView()
        try:
            with Live(console=self._console, auto_refresh=False, transient=True) as live:
                async for event in events:
                    view.add(event)
                    live.update(view.render(), refresh=True)
                    data = event.data
                    if (
                        isinstance(data, JobProgress)
                        and data.kind == "question"
                        and await self._waits(job_id)
                    ):
                        return EventCursor.parse(event.id)
        finally:
            close = getattr(events, "aclose", None)
            if close is not None:
                await close()  # stops the stream's readers now, not when it is collected
        if view.result is None:
            raise AgentJobError(f"the event stream of job {job_id} ended before the job")
        return view.result

    async def _waits(self, job_id: str) -> bool:
        """Whether the job still waits on the question an event announced.

        A stream read from the start replays questions answered long ago; the job knows.
        """
        return (await self._sessions.jobs.status(job_id)).state == "waiting_for_input"

    async def _answer(self, accepted: TurnAccepted) -> None:
        """Show the turn's question and send the next line as its answer.

        Raises:
            _Leave: The user left instead of answering.
        """
        self._ask(await self._question(accepted))
        text = await self._next_message("answer> ")
        if text is None:
            raise _Leave
        reply = await self._sessions.send(self._req, self._key, text)
        if reply.job_id != accepted.job_id:
            # The question was no longer pending when the line arrived (it timed out into its
            # default): the session queued the line as a message of its own.
            self._later.append(reply)

    async def _question(self, accepted: TurnAccepted) -> str:
        """The turn's question, once the session knows of it (so the next line answers it).

        The job tells the session with a signal; until the session has it, a line would queue
        as a new message. If it never sees it, the job's own question is shown.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + HANDOFF_SECONDS
        while loop.time() < deadline:
            status = await self._sessions.status(self._session_id)
            record = next((t for t in status.turns if t.turn == accepted.turn), None)
            if record is not None and record.state == "waiting_for_input":
                return (record.answer or "").removeprefix("question: ")
            await asyncio.sleep(0.1)
        snap = await self._sessions.jobs.status(accepted.job_id)
        return snap.pending_question or ""

    async def _answer_taken(self, job_id: str) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + HANDOFF_SECONDS
        while loop.time() < deadline:
            if (await self._sessions.jobs.status(job_id)).state != "waiting_for_input":
                return
            await asyncio.sleep(0.1)

    def _ask(self, question: str) -> None:
        self._console.print(Text.assemble(("keel asks> ", "bold yellow"), question))
        self._console.print("(your next line answers it)", style="dim")

    async def _mark(self, job_id: str) -> None:
        """Ask the workers to stream the turn's answer, before its job even starts."""
        if self._tokens is None:
            return
        with contextlib.suppress(RedisError):  # tokens are best-effort; the result still comes
            await mark_watched(self._tokens, job_id)


class _LineReader:
    """Reads one line of stdin per call, on a daemon thread, so the event loop stays free.

    A thread per line: a blocked read never keeps the process alive (Ctrl-C, the end of the
    chat), which a thread of the loop's default executor would, since ``asyncio.run`` joins it.
    """

    def __init__(self, console: Console) -> None:
        self._console = console
        if sys.stdin.isatty():
            with contextlib.suppress(ImportError):
                import readline  # noqa: F401 - gives input() line editing and history

    async def read(self, prompt: str) -> str | None:
        """The next line without its newline, or None at the end of input."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[str | None] = loop.create_future()

        def settle(line: str | None) -> None:
            if not done.done():
                done.set_result(line)

        def work() -> None:
            try:
                line: str | None = self._console.input(Text(prompt, style="bold green"))
            except EOFError:
                line = None
            loop.call_soon_threadsafe(settle, line)

        threading.Thread(target=work, name="keel-chat-input", daemon=True).start()
        return await done
