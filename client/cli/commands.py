"""``keel`` job commands: submit, chat, status, watch, result, answer, approve, cancel, list...

A thin layer over ``AgentJobs``. Every command connects with ``keel.client.connect``
(environment config), and every error becomes one line on stderr in one place
(``_common.run``): exit code 2 for invalid input, 1 for anything else, never a traceback. With
``--json`` stdout carries exactly one JSON document and nothing else.

Commands import what they use when they run: at import this module loads typer and the
standard library only, so ``keel --help`` and the composition root stay fast, and a command
loads the Temporal client, the models and rich rendering only when it needs them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

import typer

from keel.client.cli._common import (
    EXIT_FAILED,
    JobArg,
    JsonOpt,
    api_url,
    emit_json,
    fail,
    guard,
    jobs,
    run,
)
from keel.client.cli.chat import chat

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable

    from keel.client._events import JobStreamEvent
    from keel.client._summary import JobSummary
    from keel.client.fleet import QueueStats
    from keel.workflows.session_types import TurnAccepted
    from keel.workflows.types import JobResult, JobStatus


def submit(
    goal: Annotated[str, typer.Argument(metavar="GOAL", help="What the agent should achieve.")],
    tenant: Annotated[
        str | None, typer.Option(metavar="T", help="Tenant the job is billed to.")
    ] = None,
    user: Annotated[str | None, typer.Option(metavar="U", help="User who asked.")] = None,
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
    max_steps: Annotated[
        int | None, typer.Option(metavar="N", help="Activity calls of any kind.")
    ] = None,
    max_tool_calls: Annotated[
        int | None, typer.Option(metavar="N", help="Tool and retrieval calls.")
    ] = None,
    max_retries_per_tool: Annotated[
        int | None, typer.Option(metavar="N", help="Extra attempts per tool over the whole job.")
    ] = None,
    max_tokens: Annotated[
        int | None, typer.Option(metavar="N", help="Prompt plus completion tokens.")
    ] = None,
    max_cost: Annotated[
        float | None, typer.Option(metavar="USD", help="Dollars at the worker's prices.")
    ] = None,
    max_seconds: Annotated[
        float | None, typer.Option(metavar="S", help="Wall-clock seconds of work.")
    ] = None,
    max_iterations: Annotated[
        int | None, typer.Option(metavar="N", help="Plan-act-verify rounds.")
    ] = None,
    ask_timeout: Annotated[
        float | None,
        typer.Option(metavar="S", help="Seconds a question waits before the default is used."),
    ] = None,
    request_key: Annotated[
        str | None,
        typer.Option(metavar="K", help="Idempotency key; the same key returns the same job."),
    ] = None,
    notify_workflow: Annotated[
        str | None,
        typer.Option(metavar="ID", help="Workflow to signal with the result when the job ends."),
    ] = None,
    mode: Annotated[
        str | None,
        typer.Option(
            "--mode",
            metavar="interactive|batch",
            help="Queue class: batch jobs run on keel-batch, never ahead of interactive ones.",
        ),
    ] = None,
    tier: Annotated[
        str | None,
        typer.Option(
            "--tier",
            metavar="auto|fast|deep",
            help="Model tier to start on (default auto: a cheap router call picks).",
        ),
    ] = None,
    no_cache: Annotated[
        bool,
        typer.Option("--no-cache", help="Serve nothing from Keel's caches and store nothing."),
    ] = False,
    session: Annotated[
        str | None,
        typer.Option(
            "--session",
            metavar="KEY",
            help="Send GOAL as a message to this session (opening it) and print the turn's "
            "job ID; the budget options then bound each turn.",
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Submit a job and print its ID at once (with --session: a session's next turn)."""
    budget = {
        name: value
        for name, value in {
            "max_steps": max_steps,
            "max_tool_calls": max_tool_calls,
            "max_retries_per_tool": max_retries_per_tool,
            "max_tokens": max_tokens,
            "max_cost_usd": max_cost,
            "max_seconds": max_seconds,
            "max_iterations": max_iterations,
        }.items()
        if value is not None
    }
    optional = {
        "tenant": tenant,
        "user": user,
        "tools": tool,
        "docs_dir": f"corpus:{corpus}" if corpus else docs,
        "ask_timeout_seconds": ask_timeout,
        "notify_workflow": notify_workflow,
        "mode": mode,
        "tier": tier,
        "cache": False if no_cache else None,
        "budget": budget or None,
    }
    if session is not None:
        _submit_turn(session, goal, optional, request_key, as_json)
        return
    payload: dict[str, Any] = {"goal": goal}
    payload.update({name: value for name, value in optional.items() if value is not None})

    async def main() -> str:
        from keel.client._validation import validate_request, validate_request_key

        # Validate fully before connecting, so a malformed job fails fast even with no server.
        request = validate_request(payload)
        key = validate_request_key(request_key) if request_key is not None else None
        return await (await jobs()).start(request, request_key=key)

    job_id = run(main)
    if as_json:
        emit_json({"job_id": job_id})
    else:
        typer.echo(job_id)


def _submit_turn(
    session: str, goal: str, options: dict[str, Any], message_id: str | None, as_json: bool
) -> None:
    """``submit --session``: send the goal as a session's message; print its turn's job ID.

    ``--request-key`` becomes the message ID, so a script that resends with the same key gets
    the same turn back and runs nothing twice.
    """

    async def main() -> TurnAccepted:
        from keel.client.cli._sessions import agent_sessions, session_request, valid_key
        from keel.client.errors import InvalidJobRequest

        # Validate fully before connecting, as a job is: the key, the message, the options.
        key = valid_key(session, "session")
        mid = valid_key(message_id, "request_key") if message_id is not None else None
        fields = dict(options)
        budget = fields.pop("budget")
        for name in ("ask_timeout_seconds", "notify_workflow"):
            if fields.pop(name) is not None:  # The session sets both on each turn itself.
                raise InvalidJobRequest(name, "cannot be set for a session's turn")
        request = session_request(fields, turn_budget=budget, goal=goal)
        return await (await agent_sessions()).send(request, key, goal, message_id=mid)

    accepted = run(main)
    if as_json:
        emit_json(accepted.model_dump(mode="json"))
    else:
        typer.echo(accepted.job_id)


def status(job_id: JobArg, as_json: JsonOpt = False) -> None:
    """Show a job's state, budget use, pending question and recent events."""
    if api := api_url():
        from urllib.parse import quote

        from keel.client.cli._http import get_json

        path = f"/v1/jobs/{quote(job_id, safe='')}"
        found = guard(lambda: get_json(api, path))
        if as_json:  # the API's document is the status: no need to load the models to print it
            emit_json(found)
            return
        from keel.workflows.types import JobStatus

        snap = JobStatus.model_validate(found)
    else:

        async def main() -> JobStatus:
            return await (await jobs()).status(job_id)

        snap = run(main)
    if as_json:
        typer.echo(snap.model_dump_json())
        return
    from keel.client.cli.render import print_status

    print_status(snap)


def watch(job_id: JobArg) -> None:
    """Follow a job live (progress, then its answer as it is written); print its result."""
    from keel.client.cli.render import follow_events, print_result
    from keel.client.errors import AgentJobError

    async def main() -> JobResult:
        base = api_url()
        if base is not None:
            from keel.client.cli._sse import api_events

            result = await follow_events(api_events(base, job_id))
        else:
            result = await _watch_direct(job_id, follow_events)
        if result is None:
            raise AgentJobError(f"the event stream of job {job_id} ended before the job")
        return result

    res = run(main)
    print_result(res)
    if res.outcome == "failed":
        raise typer.Exit(EXIT_FAILED)


async def _watch_direct(
    job_id: str, show: Callable[[AsyncIterator[JobStreamEvent]], Awaitable[JobResult | None]]
) -> JobResult | None:
    """Follow the job straight from Temporal, with answer tokens when REDIS_URL is set."""
    import os

    from keel.activities.redis_client import connect

    url = os.environ.get("REDIS_URL", "").strip()
    redis = connect(url, socket_timeout=5) if url else None
    try:
        return await show(await (await jobs()).events(job_id, tokens=redis))
    finally:
        if redis is not None:
            await redis.aclose()


def result(
    job_id: JobArg,
    as_json: JsonOpt = False,
    timeout: Annotated[
        float | None, typer.Option(metavar="S", help="Give up waiting after S seconds.")
    ] = None,
) -> None:
    """Wait for a job to end and print its outcome and answer."""
    from keel.client.errors import JobFailed

    async def main() -> tuple[JobResult, JobFailed | None]:
        try:
            return await (await jobs()).result(job_id, timeout=timeout), None
        except JobFailed as failed:
            if failed.result is None:
                raise
            return failed.result, failed  # a failed job's result is data too

    res, failed = run(main)
    if as_json:
        emit_json(res.model_dump(mode="json"))
    else:
        from keel.client.cli.render import print_result

        print_result(res)
    if failed is not None:
        fail(failed.message, EXIT_FAILED)


def answer(
    job_id: JobArg,
    text: Annotated[
        str, typer.Argument(metavar="TEXT", help="Answer to the job's pending question.")
    ],
) -> None:
    """Answer a job's pending question and wait for the job to accept it."""

    async def main() -> str:
        from keel.workflows.types import HumanInput

        inp = HumanInput(text=text)  # Refuse a blank answer before connecting.
        return await (await jobs()).send_input(job_id, inp)

    typer.echo(run(main))


WriteArg = Annotated[
    str,
    typer.Argument(metavar="WRITE_ID", help="The write's ID, as `keel status` lists it."),
]
ReasonOpt = Annotated[str, typer.Option("--reason", help="Why; kept with the write.")]


def approve(job_id: JobArg, write_id: WriteArg, reason: ReasonOpt = "") -> None:
    """Approve a job's write that requires approval; it commits once the answer is verified."""

    async def main() -> str:
        return await (await jobs()).decide_write(job_id, write_id, approve=True, reason=reason)

    typer.echo(run(main))


def reject(job_id: JobArg, write_id: WriteArg, reason: ReasonOpt = "") -> None:
    """Reject a job's write that requires approval; it is never made."""

    async def main() -> str:
        return await (await jobs()).decide_write(job_id, write_id, approve=False, reason=reason)

    typer.echo(run(main))


def cancel(job_id: JobArg) -> None:
    """Cancel a job; it ends with outcome "cancelled" and its best answer so far."""

    async def main() -> None:
        await (await jobs()).cancel(job_id)

    run(main)
    typer.echo(f"cancellation requested: {job_id}")


def fleet(
    task_queue: Annotated[
        list[str] | None,
        typer.Option(help="Task queue to describe (repeat; default: interactive and batch)."),
    ] = None,
    as_json: JsonOpt = False,
    breakers: Annotated[
        bool,
        typer.Option(
            "--breakers",
            help="With --json: print the circuit breakers (from REDIS_URL) instead of queues.",
        ),
    ] = False,
) -> None:
    """Show pollers and backlog per task queue (the signal to scale workers on) and breakers.

    The circuit breakers the fleet shares in Redis (``REDIS_URL``) follow the queues: every
    breaker that has tripped, its state and until when it stays open.
    """
    from keel.client.fleet import breaker_states

    if as_json and breakers:
        emit_json(run(breaker_states))
        return

    async def main() -> list[QueueStats]:
        from keel.client.connect import connect
        from keel.client.fleet import describe_fleet

        return await describe_fleet(await connect(), task_queue or None)

    rows = run(main)
    if as_json:
        emit_json([r.model_dump(mode="json") for r in rows])
        return
    from keel.client.cli.render import print_breakers, print_fleet

    print_fleet(rows)
    print_breakers(run(breaker_states))


def list_jobs(
    tenant: Annotated[
        str | None, typer.Option(metavar="T", help="Only this tenant's jobs.")
    ] = None,
    state: Annotated[
        str | None,
        typer.Option(
            metavar="S", help="Only jobs in this state (running, waiting_for_input, completed...)."
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """List recent jobs from Temporal visibility."""
    if api := api_url():
        from keel.client.cli._http import get_json

        params = {"tenant": tenant, "state": state}
        listed = guard(lambda: get_json(api, "/v1/jobs", params))
        if as_json:
            emit_json(listed)
            return
        from keel.client._summary import JobSummary

        rows = [JobSummary.model_validate(row) for row in listed]
    else:

        async def main() -> list[JobSummary]:
            from keel.client._listing import list_query

            list_query(tenant=tenant, state=state)  # Refuse bad filters before connecting.
            return await (await jobs()).list_jobs(tenant=tenant, state=state)

        rows = run(main)
    if as_json:
        emit_json([row.model_dump(mode="json") for row in rows])
    elif rows:
        from keel.client.cli.render import print_jobs, stdout_console

        print_jobs(stdout_console(), rows)
    else:
        typer.echo("no jobs found", err=True)


COMMANDS: list[tuple[str, Any]] = [
    ("submit", submit),
    ("chat", chat),
    ("status", status),
    ("watch", watch),
    ("result", result),
    ("answer", answer),
    ("approve", approve),
    ("reject", reject),
    ("cancel", cancel),
    ("list", list_jobs),
    ("fleet", fleet),
]
"""The job commands as (name, function): the ``keel`` composition root mounts each one."""
