"""``keel chat`` and ``keel submit --session`` as a user runs them: subprocesses, real servers.

Each test starts a real worker on a queue of its own and runs the ``keel`` command as a
subprocess against the test Temporal server, Redis and the simulator, feeding the chat its
lines on stdin, as a script or a terminal would. Malformed options are checked in-process with
no server: they must fail before connecting.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import sys

import pytest
from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment
from typer.testing import CliRunner

from keel.client.sessions import AgentSessions
from keel.workers.cli import app
from keel.workflows.session_types import session_id_for
from tests.conftest import SESSION_CACHE, unique
from tests.workflows.test_sessions import PINNED, calls


async def keel(
    env: WorkflowEnvironment,
    *args: str,
    stdin: str = "",
    queue: str,
    redis_url: str,
    timeout: float = 120,
) -> tuple[int, str, str]:
    """Run ``keel ARGS`` with ``stdin`` as its input; return the exit code, stdout and stderr."""
    unset = ("KEEL_API_URL", "KEEL_API_KEY", "KEEL_TASK_QUEUE", "OPENAI_API_KEY")
    proc_env = {k: v for k, v in os.environ.items() if k not in unset} | {
        "TEMPORAL_ADDRESS": env.client.service_client.config.target_host,
        "TEMPORAL_NAMESPACE": env.client.namespace,
        "KEEL_TASK_QUEUE": queue,
        # The chat marks each turn's job as watched and reads its answer's tokens from here.
        "REDIS_URL": redis_url,
        "COLUMNS": "200",
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "keel.workers.cli",
        *args,
        env=proc_env,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(stdin.encode()), timeout)
    return proc.returncode or 0, out.decode(), err.decode()


RECORDED = PINNED
"""Models pinned, and each call names its job, so the simulator records what each turn sent."""


def answers(out: str) -> list[str]:
    """The answer lines the chat printed, in order."""
    return [line.removeprefix("keel> ") for line in out.splitlines() if "keel> " in line]


async def test_chat_carries_the_conversation_and_shows_its_status(
    env: WorkflowEnvironment, client: Client, make_worker, redis_url: str, sim_url: str
) -> None:
    tenant = unique("chat")
    lines = [
        "What is 17 * 23? use calculator",
        "and add 100 to that",
        "/status",
        "/budget",
        "/quit",
    ]
    async with make_worker(
        client, llm_config=RECORDED, max_cached_workflows=SESSION_CACHE
    ) as worker:
        q = worker.task_queue
        code, out, err = await keel(
            env,
            *("chat", "--tenant", tenant, "--tool", "calculator", "--max-turns", "7"),
            stdin="\n".join(lines) + "\n",
            queue=q,
            redis_url=redis_url,
        )
        assert code == 0, err
        assert err == ""
        match = re.search(r"new session (chat-[0-9a-f]{12})", out)
        assert match, out
        key = match[1]
        status = await AgentSessions(client, task_queue=q).status(session_id_for(tenant, key))

        # Resuming by key: the status is the one the first chat left; end of input leaves.
        again, resumed, err = await keel(
            env,
            *("chat", "--session", key, "--tenant", tenant),
            stdin="/status\n",
            queue=q,
            redis_url=redis_url,
        )

    said = answers(out)
    assert len(said) == 2, out
    assert "391" in said[0], said
    job_ids = [t.job_id for t in status.turns]
    # Turn 2 needed turn 1's answer: every model call it made was sent it.
    prompts = [c["prompt"] for c in await calls(sim_url, job_ids[1])]
    assert prompts and all("391" in p for p in prompts)
    assert [t.turn for t in status.turns] == [1, 2] and status.usage.turns == 2
    assert all(f"turn {n} · completed" in out and job_ids[n - 1] in out for n in (1, 2))
    # /status: phase, turns, queue and summary; /budget: each limit beside its use.
    assert "phase  idle   turns 2   queued 0" in out
    assert "summary  (none yet)" in out  # two exchanges are still verbatim, not summarised
    assert re.search(r"turns\s+2\s+7\s+5", out), out
    assert re.search(r"cost\s+\$0\.\d{4}\s+\$20\s+\$19\.\d{4}", out), out
    assert out.rstrip().endswith(f"Resume with: keel chat --session {key} --tenant {tenant}")

    assert again == 0, err
    assert f"session {key}: 2 turn(s) so far, idle" in resumed
    assert "phase  idle   turns 2   queued 0" in resumed
    assert all(job_id in resumed for job_id in job_ids)  # the turns table names each job
    assert resumed.rstrip().endswith(f"keel chat --session {key} --tenant {tenant}")


async def test_a_question_is_shown_and_the_next_line_answers_it(
    env: WorkflowEnvironment, client: Client, make_worker, redis_url: str
) -> None:
    tenant, key = unique("ask"), unique("s")
    lines = ["Book the usual table [sim: ask]", "Tuesday at eight, by the window"]
    async with make_worker(client, max_cached_workflows=SESSION_CACHE) as worker:
        code, out, err = await keel(
            env,
            *("chat", "--session", key, "--tenant", tenant, "--tool", "calculator"),
            stdin="\n".join(lines) + "\n",  # then end of input: leaves like /quit
            queue=worker.task_queue,
            redis_url=redis_url,
        )
        sessions = AgentSessions(client, task_queue=worker.task_queue)
        status = await sessions.status(session_id_for(tenant, key))

    assert code == 0, err
    assert out.startswith(f"new session {key}\n")  # a key nobody used yet opens a session
    assert "keel asks> " in out and "(your next line answers it)" in out
    assert out.index("keel asks> ") < out.index("answer> ")
    said = answers(out)
    assert len(said) == 1 and "Tuesday at eight" in said[0], out
    # The answer went to the waiting turn: one turn, no second one queued.
    assert status.usage.turns == 1 and [t.turn for t in status.turns] == [1]
    assert status.turns[0].outcome == "completed"


async def test_resuming_a_session_whose_turn_waits_shows_its_question_once(
    env: WorkflowEnvironment, client: Client, make_worker, redis_url: str
) -> None:
    tenant, key = unique("resume"), unique("s")
    async with make_worker(client, max_cached_workflows=SESSION_CACHE) as worker:
        sessions = AgentSessions(client, task_queue=worker.task_queue)
        session_id = session_id_for(tenant, key)
        asked = await sessions.send({"tenant": tenant}, key, "Book the usual table [sim: ask]")
        for _ in range(200):
            turns = (await sessions.status(session_id)).turns
            if turns and turns[0].state == "waiting_for_input":
                break
            await asyncio.sleep(0.05)
        # A chat started now: the question it shows came before it, in the job's old events.
        code, out, err = await keel(
            env,
            *("chat", "--session", key, "--tenant", tenant),
            stdin="Tuesday at eight, by the window\n",
            queue=worker.task_queue,
            redis_url=redis_url,
        )
        status = await sessions.status(session_id)

    assert code == 0, err
    assert f"session {key}: 0 turn(s) so far, running" in out
    assert out.count("keel asks> ") == 1, out  # replaying the stream does not ask it again
    said = answers(out)
    assert len(said) == 1 and "Tuesday at eight" in said[0], out
    assert "turn 1 · completed" in out and asked.job_id in out
    assert status.usage.turns == 1 and len(status.turns) == 1


async def test_submit_to_a_session_prints_job_ids_that_result_reads(
    env: WorkflowEnvironment, client: Client, make_worker, redis_url: str, sim_url: str
) -> None:
    tenant, key = unique("script"), unique("s")
    base = ("submit", "--session", key, "--tenant", tenant, "--tool", "calculator")
    async with make_worker(
        client, llm_config=RECORDED, max_cached_workflows=SESSION_CACHE
    ) as worker:
        q = worker.task_queue
        code, out, err = await keel(
            env,
            *base,
            "What is 17 * 23? use calculator",
            "--request-key",
            "m-1",
            "--json",
            queue=q,
            redis_url=redis_url,
        )
        assert code == 0, err
        first = json.loads(out)
        code, out, err = await keel(env, *base, "and add 100 to that", queue=q, redis_url=redis_url)
        assert code == 0, err
        second_job = out.strip()
        # A script that retries with the same key gets the same turn back, and nothing runs.
        code, out, err = await keel(
            env,
            *base,
            "What is 17 * 23?",
            "--request-key",
            "m-1",
            "--json",
            queue=q,
            redis_url=redis_url,
        )
        assert code == 0, err
        resent = json.loads(out)
        results = []
        for job_id in (first["job_id"], second_job):
            code, out, err = await keel(
                env, "result", job_id, "--json", "--timeout", "90", queue=q, redis_url=redis_url
            )
            assert code == 0, err
            results.append(json.loads(out))
        status = await AgentSessions(client, task_queue=q).status(session_id_for(tenant, key))

    assert first["session_id"] == session_id_for(tenant, key)
    assert first["turn"] == 1 and first["message_id"] == "m-1" and first["duplicate"] is False
    assert second_job == f"{first['job_id'][:-1]}2"  # the turn's job ID, alone on its line
    assert resent["duplicate"] is True and resent["job_id"] == first["job_id"]
    assert [r["outcome"] for r in results] == ["completed", "completed"]
    assert "391" in results[0]["answer"]
    prompts = [c["prompt"] for c in await calls(sim_url, second_job)]
    assert prompts and all("391" in p for p in prompts)  # turn 2 was given turn 1's answer
    assert status.usage.turns == 2


async def test_an_exhausted_session_refuses_with_one_line_naming_the_budget(
    env: WorkflowEnvironment, client: Client, make_worker, redis_url: str
) -> None:
    tenant, key = unique("broke"), unique("s")
    lines = ["What is 40 + 2? use calculator", *(f"And {n} more?" for n in range(5))]
    async with make_worker(client, max_cached_workflows=SESSION_CACHE) as worker:
        q = worker.task_queue
        code, out, err = await keel(
            env,
            *("chat", "--session", key, "--tenant", tenant, "--max-cost", "0.0003"),
            stdin="\n".join(lines) + "\n",
            queue=q,
            redis_url=redis_url,
        )
        again, _, again_err = await keel(
            env,
            *("submit", "--session", key, "--tenant", tenant, "one more thing"),
            queue=q,
            redis_url=redis_url,
        )
        status = await AgentSessions(client, task_queue=q).status(session_id_for(tenant, key))

    assert code == 1, (out, err)
    assert "42" in answers(out)[0]
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("error: session ") and "max_cost_usd is exhausted" in err
    assert again == 1 and "max_cost_usd is exhausted" in again_err, again_err
    assert status.usage.turns == 1 and status.usage.cost_usd <= 0.0003 + 1e-9


async def test_a_line_queued_behind_another_turn_waits_for_it_or_for_the_end(
    env: WorkflowEnvironment, client: Client, make_worker, redis_url: str
) -> None:
    tenant, key = unique("queue"), unique("s")
    chat = ("chat", "--session", key, "--tenant", tenant)
    async with make_worker(client, max_cached_workflows=SESSION_CACHE) as worker:
        q = worker.task_queue
        sessions = AgentSessions(client, task_queue=q)
        session_id = session_id_for(tenant, key)
        slow = "What is 1 + 1? [sim: slow=1200]"  # each model call of the turn takes 1.2 s
        await sessions.send({"tenant": tenant}, key, slow)
        code, out, err = await keel(
            env, *chat, stdin="What is 2 + 2?\n", queue=q, redis_url=redis_url
        )

        # The session ends while the chat's turn still waits in line: it will never run.
        await sessions.send({"tenant": tenant}, key, slow)
        chatting = asyncio.create_task(
            keel(env, *chat, stdin="What is 3 + 3?\n", queue=q, redis_url=redis_url)
        )
        for _ in range(200):
            turns = (await sessions.status(session_id)).turns
            if len(turns) == 4:
                break
            await asyncio.sleep(0.05)
        await sessions.end(session_id)
        ended, ended_out, ended_err = await chatting
        status = await sessions.status(session_id)

    assert code == 0, err
    assert "queued: 1 turn(s) run before this one" in out
    said = answers(out)
    assert len(said) == 1 and "4" in said[0] and "turn 2 · completed" in out, out
    assert ended == 1, (ended_out, ended_err)
    assert "queued: 1 turn(s) run before this one" in ended_out
    refusal = "the session ended before this turn ran"
    assert ended_err == f"error: session {session_id} refused the message: {refusal}\n"
    assert status.phase == "ended" and [t.state for t in status.turns] == [
        "done",
        "done",
        "done",
        "queued",
    ]


def closed_port_address() -> str:
    """An address nothing listens on: a command that tried to connect would fail with 1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (["chat", "--session", "bad key"], "session"),
        (["chat", "--max-cost", "nan"], "budget.max_cost_usd"),
        (["chat", "--max-turns", "0"], "budget.max_turns"),
        (["chat", "--tool", "rm_rf"], "tools"),
        (["chat", "--tenant", "acme corp"], "tenant"),
        (["submit", "hi", "--session", "bad key"], "session"),
        (["submit", "   ", "--session", "k"], "goal"),
        (["submit", "hi", "--session", "k", "--request-key", "a b"], "request_key"),
        (["submit", "hi", "--session", "k", "--max-steps", "0"], "budget.max_steps"),
        (["submit", "hi", "--session", "k", "--ask-timeout", "5"], "ask_timeout_seconds"),
        (["submit", "hi", "--session", "k", "--notify-workflow", "w"], "notify_workflow"),
        (["submit", "hi", "--session", "k", "--docs", "/definitely/not/here"], "docs_dir"),
    ],
)
def test_malformed_session_options_fail_before_connecting(args: list[str], field: str) -> None:
    done = CliRunner(env={"TEMPORAL_ADDRESS": closed_port_address()}).invoke(app, args)
    assert done.exit_code == 2, done.output
    assert done.stdout == ""
    assert done.stderr.startswith(f"error: {field}: ") and done.stderr.count("\n") == 1


def test_chat_help_names_its_options_and_commands() -> None:
    done = CliRunner().invoke(app, ["chat", "--help"], env={"COLUMNS": "200"})
    assert done.exit_code == 0
    for option in ("--session", "--tenant", "--tool", "--max-cost", "--max-turns", "--tier"):
        assert option in done.stdout, option
    submit = CliRunner().invoke(app, ["submit", "--help"], env={"COLUMNS": "200"})
    assert "--session" in submit.stdout
