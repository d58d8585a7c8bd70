"""``keel`` job commands: submit, status, watch, result, answer, cancel, list.

A thin layer over ``AgentJobs``. Every command connects with ``client.connect`` (environment
config), and every error is turned into one line on stderr in one place (``_run``): exit code 2
for invalid input, 1 for anything else, never a traceback. With ``--json`` stdout carries
exactly one JSON document and nothing else. Worker-side commands (``worker``, ``dev``,
``sim-llm``) are added to this same ``app`` elsewhere.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Awaitable, Callable, Sequence
from typing import Annotated, Any, NoReturn, TypeVar

import typer
from pydantic import ValidationError
from rich import box
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from keel.client._listing import JobSummary, list_query
from keel.client._validation import validate_request, validate_request_key
from keel.client.connect import connect
from keel.client.errors import AgentJobError, InvalidJobRequest
from keel.client.fleet import QueueStats, describe_fleet
from keel.client.jobs import AgentJobs
from keel.workflows.budget_text import budget_text, budget_use
from keel.workflows.types import HumanInput, JobEvent, JobResult, JobStatus, current_iteration

__all__ = ["app"]

app = typer.Typer(
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Keel: durable AI-agent jobs on Temporal.",
)

T = TypeVar("T")

EXIT_INVALID = 2
"""Exit code for input the command refused (the same code click uses for usage errors)."""
EXIT_FAILED = 1
"""Exit code for every other error: job failed, not found, server unreachable."""

TASK_QUEUE_ENV = "KEEL_TASK_QUEUE"
"""Environment variable pinning the task queue jobs start on (default: chosen by mode)."""

WIDE_TABLE_EXTRA = 80
"""Columns the table needs beside the job ID; narrower terminals get two lines per job."""

JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")]
JobArg = Annotated[str, typer.Argument(metavar="JOB", help="Job ID (agent-job-...).")]


def _stdout() -> Console:
    # Built per call so the console follows whatever sys.stdout is now (CliRunner swaps it).
    return Console(soft_wrap=True, highlight=False)


def _fail(message: str, code: int) -> NoReturn:
    Console(stderr=True, soft_wrap=True, highlight=False).print(
        Text(f"error: {' '.join(message.split())}")
    )
    raise typer.Exit(code)


def _run(main: Callable[[], Awaitable[T]]) -> T:
    """Run one command's coroutine; the only place errors become messages and exit codes."""

    async def call() -> T:
        return await main()

    try:
        return asyncio.run(call())
    except InvalidJobRequest as err:
        failure = (err.message, EXIT_INVALID)
    except ValidationError as err:
        failure = (InvalidJobRequest.from_validation_error(err).message, EXIT_INVALID)
    except AgentJobError as err:
        failure = (err.message, EXIT_FAILED)
    except KeyboardInterrupt:
        failure = ("interrupted", 130)
    # Exit outside the except blocks: an exception chained to the exit would keep the command's
    # frames, and with them the Temporal client, alive until interpreter shutdown, where
    # dropping the SDK's native client can abort the process.
    _fail(*failure)


def _emit_json(doc: Any) -> None:
    typer.echo(json.dumps(doc, ensure_ascii=False))


async def _jobs() -> AgentJobs:
    # KEEL_TASK_QUEUE (the variable the worker settings read) pins one queue for every job;
    # unset, each job's mode picks keel-interactive or keel-batch.
    return AgentJobs(await connect(), task_queue=os.environ.get(TASK_QUEUE_ENV) or None)


@app.command()
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
        str | None, typer.Option("--docs", metavar="DIR", help="Folder of documents to search.")
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
    as_json: JsonOpt = False,
) -> None:
    """Submit a job and print its ID at once."""
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
        "docs_dir": docs,
        "ask_timeout_seconds": ask_timeout,
        "notify_workflow": notify_workflow,
        "mode": mode,
        "budget": budget or None,
    }
    payload: dict[str, Any] = {"goal": goal}
    payload.update({name: value for name, value in optional.items() if value is not None})

    async def main() -> str:
        # Validate fully before connecting, so a malformed job fails fast even with no server.
        request = validate_request(payload)
        key = validate_request_key(request_key) if request_key is not None else None
        return await (await _jobs()).start(request, request_key=key)

    job_id = _run(main)
    if as_json:
        _emit_json({"job_id": job_id})
    else:
        typer.echo(job_id)


@app.command()
def status(job_id: JobArg, as_json: JsonOpt = False) -> None:
    """Show a job's state, budget use, pending question and recent events."""

    async def main() -> JobStatus:
        return await (await _jobs()).status(job_id)

    snap = _run(main)
    if as_json:
        typer.echo(snap.model_dump_json())
        return
    console = _stdout()
    console.print(Text.assemble(("job  ", "bold"), snap.job_id))
    console.print(
        Text.assemble(
            ("state  ", "bold"),
            (snap.state, _state_style(snap.state)),
            f"   iteration {current_iteration(snap.iteration, snap.budget)}"
            f"/{snap.budget.max_iterations}",
            f"   run {snap.runs}" if snap.runs > 1 else "",
        )
    )
    console.print(Text.assemble(("goal  ", "bold"), _one_line(snap.goal, 200)))
    console.print(_budget_table(snap))
    if snap.pending_question:
        console.print(Text.assemble(("question  ", "bold yellow"), snap.pending_question))
        console.print(f"answer with: keel answer {snap.job_id} TEXT", markup=False)
    if snap.events:
        console.print(_events_table(snap.events[-10:]))


@app.command()
def watch(job_id: JobArg) -> None:
    """Follow a job live until it ends, then print its result."""

    async def main() -> JobResult:
        jobs = await _jobs()
        console = _stdout()
        with Live(console=console, auto_refresh=False) as live:
            async for snap in jobs.wait_terminal(job_id):
                live.update(_progress(snap), refresh=True)
        if not console.is_terminal:
            console.line()  # Off a terminal, Live prints its last frame without a newline.
        return await jobs.result(job_id)

    _print_result(_run(main))


@app.command()
def result(
    job_id: JobArg,
    as_json: JsonOpt = False,
    timeout: Annotated[
        float | None, typer.Option(metavar="S", help="Give up waiting after S seconds.")
    ] = None,
) -> None:
    """Wait for a job to end and print its outcome and answer."""

    async def main() -> JobResult:
        return await (await _jobs()).result(job_id, timeout=timeout)

    res = _run(main)
    if as_json:
        _emit_json(res.model_dump(mode="json"))
    else:
        _print_result(res)


@app.command()
def answer(
    job_id: JobArg,
    text: Annotated[
        str, typer.Argument(metavar="TEXT", help="Answer to the job's pending question.")
    ],
) -> None:
    """Answer a job's pending question and wait for the job to accept it."""

    async def main() -> str:
        inp = HumanInput(text=text)  # Refuse a blank answer before connecting.
        return await (await _jobs()).send_input(job_id, inp)

    typer.echo(_run(main))


@app.command()
def cancel(job_id: JobArg) -> None:
    """Cancel a job; it ends with outcome "cancelled" and its best answer so far."""

    async def main() -> None:
        await (await _jobs()).cancel(job_id)

    _run(main)
    typer.echo(f"cancellation requested: {job_id}")


@app.command()
def fleet(
    task_queue: Annotated[
        list[str] | None,
        typer.Option(help="Task queue to describe (repeat; default: interactive and batch)."),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Show pollers and backlog per task queue: the signal to scale workers on."""

    async def main() -> list[QueueStats]:
        return await describe_fleet(await connect(), task_queue or None)

    rows = _run(main)
    if as_json:
        _emit_json([r.model_dump(mode="json") for r in rows])
        return
    table = Table(title="Keel fleet")
    for col in ("task queue", "kind", "pollers", "backlog", "oldest (s)", "add/s", "dispatch/s"):
        table.add_column(col, overflow="fold")
    for r in rows:
        names = ", ".join(p.identity for p in r.pollers) or "none"
        table.add_row(
            r.task_queue,
            r.kind,
            f"{len(r.pollers)} ({names})",
            str(r.backlog),
            f"{r.backlog_age_seconds:.1f}",
            f"{r.add_rate:.2f}",
            f"{r.dispatch_rate:.2f}",
        )
    _stdout().print(table)


@app.command("list")
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

    async def main() -> list[JobSummary]:
        list_query(tenant=tenant, state=state)  # Refuse bad filters before connecting.
        return await (await _jobs()).list_jobs(tenant=tenant, state=state)

    rows = _run(main)
    if as_json:
        _emit_json([row.model_dump(mode="json") for row in rows])
    elif rows:
        print_jobs(_stdout(), rows)
    else:
        typer.echo("no jobs found", err=True)


def print_jobs(console: Console, rows: Sequence[JobSummary]) -> None:
    """Print job summaries as a table, or two lines per job when the terminal is narrow.

    Job IDs are never truncated: they are the handle for every other command.

    Args:
        console: Where to print; its width picks the layout.
        rows: Summaries from ``AgentJobs.list_jobs``.
    """
    widest = max((len(row.job_id) for row in rows), default=3)
    if console.width >= widest + WIDE_TABLE_EXTRA:
        console.print(_jobs_table(rows, widest))
        return
    for row in rows:
        console.print(row.job_id, style="bold", markup=False, highlight=False, soft_wrap=True)
        console.print(
            Text.assemble(
                "  ",
                _state_text(row),
                f" · {row.tenant or '?'}/{row.user or '?'} · "
                f"{row.started_at.strftime('%m-%d %H:%M')}",
                f" · ${row.cost_usd:.4f}" if row.cost_usd is not None else "",
                f" · {row.tokens:,} tokens" if row.tokens is not None else "",
            )
        )


def _jobs_table(rows: Sequence[JobSummary], widest: int) -> Table:
    table = Table(show_edge=False, pad_edge=False, box=box.SIMPLE_HEAD)
    table.add_column("job", no_wrap=True, overflow="fold", min_width=widest)
    for name in ("state", "tenant", "user", "started"):
        table.add_column(name, overflow="fold")
    table.add_column("cost", justify="right", overflow="fold")
    table.add_column("tokens", justify="right", overflow="fold")
    for row in rows:
        table.add_row(
            row.job_id,
            _state_text(row),
            row.tenant or "",
            row.user or "",
            row.started_at.strftime("%m-%d %H:%M"),
            f"${row.cost_usd:.4f}" if row.cost_usd is not None else "",
            f"{row.tokens:,}" if row.tokens is not None else "",
        )
    return table


def _state_text(row: JobSummary) -> Text:
    state = Text(row.state or "?", style=_state_style(row.state))
    if row.temporal_status not in ("RUNNING", "COMPLETED"):
        # Failed, terminated or timed out in Temporal: say so beside the job's own state.
        state.append(f" ({row.temporal_status.lower()})", style="red")
    return state


def _budget_table(snap: JobStatus) -> Table:
    table = Table("budget", "used", "limit", show_edge=False, pad_edge=False)
    table.columns[1].justify = table.columns[2].justify = "right"
    for row in budget_use(snap.budget, snap.usage, snap.iteration):
        table.add_row(row.name, row.used or "", row.limit)
    return table


def _events_table(events: Sequence[JobEvent]) -> Table:
    table = Table("at", "event", "detail", show_edge=False, pad_edge=False)
    table.columns[2].overflow = "fold"
    for event in events:
        table.add_row(event.at.strftime("%H:%M:%S"), event.kind, event.detail)
    return table


def _progress(snap: JobStatus) -> Group:
    line = Text.assemble(
        (snap.state, _state_style(snap.state)),
        "  ",
        budget_text(snap.budget, snap.usage, snap.iteration, sep="  "),
    )
    parts: list[Any] = [Text.assemble(("job ", "bold"), snap.job_id), line]
    if snap.events:
        last = snap.events[-1]
        parts.append(Text(f"last: {last.kind} {_one_line(last.detail, 120)}", style="dim"))
    if snap.pending_question:
        parts.append(Text.assemble(("question: ", "bold yellow"), snap.pending_question))
        parts.append(Text(f"answer with: keel answer {snap.job_id} TEXT", style="dim"))
    return Group(*parts)


def _print_result(res: JobResult) -> None:
    console = _stdout()
    console.print(Text.assemble(("job  ", "bold"), res.job_id))
    outcome = Text(res.outcome, style=_state_style(res.outcome))
    if res.exhausted_budget:
        outcome.append(f" ({res.exhausted_budget} ran out)")
    if res.outcome == "completed":
        outcome.append(" verified" if res.verified else " unverified")
    console.print(Text.assemble(("outcome  ", "bold"), outcome))
    u = res.usage
    console.print(
        f"usage  iterations {res.iterations} · {u.steps} steps · {u.tool_calls} tool calls · "
        f"{u.tokens:,} tokens · ${u.cost_usd:.4f}",
        markup=False,
    )
    if res.error:
        console.print(Text.assemble(("error  ", "bold red"), res.error))
    console.print(Text("answer", style="bold"))
    console.print(res.answer or "(none)", markup=False)


def _state_style(state: str | None) -> str:
    return {
        "completed": "green",
        "budget_exhausted": "yellow",
        "waiting_for_input": "yellow",
        "failed": "red",
        "cancelled": "magenta",
    }.get(state or "", "cyan")


def _one_line(text: str, limit: int) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 1] + "…"
