"""The job commands without a server: refusals, help, and output rules (no traceback, IDs whole)."""

from __future__ import annotations

import io
import socket
from datetime import UTC, datetime

import pytest
from rich.console import Console
from typer.testing import CliRunner

from keel.client import JobSummary
from keel.client.cli.render import print_jobs
from keel.workers.cli import app


def closed_port_address() -> str:
    """An address nothing listens on, so any attempt to connect fails with exit code 1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"127.0.0.1:{port}"


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner(env={"TEMPORAL_ADDRESS": closed_port_address(), "COLUMNS": "100"})


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (["", "--json"], "goal"),
        (["   "], "goal"),
        (["hi", "--tenant", "acme corp"], "tenant"),
        (["hi", "--max-steps", "0"], "budget.max_steps"),
        (["hi", "--max-tool-calls", "-1"], "budget.max_tool_calls"),
        (["hi", "--max-cost", "nan", "--json"], "budget.max_cost_usd"),
        (["hi", "--max-cost", "inf"], "budget.max_cost_usd"),
        (["hi", "--max-seconds", "0"], "budget.max_seconds"),
        (["hi", "--ask-timeout", "inf"], "ask_timeout_seconds"),
        (["hi", "--tool", "calculator", "--tool", "rm_rf"], "tools"),
        (["hi", "--docs", "/definitely/not/here"], "docs_dir"),
        (["hi", "--request-key", "has space"], "request_key"),
        (["hi", "--notify-workflow", "bad id!"], "notify_workflow"),
        (["hi", "--tier", "premium"], "tier"),
    ],
)
def test_submit_refuses_malformed_job_before_connecting(
    runner: CliRunner, args: list[str], field: str
) -> None:
    result = runner.invoke(app, ["submit", *args])
    assert result.exit_code == 2, result.stderr
    assert result.stdout == ""
    assert result.stderr.startswith(f"error: {field}: ")
    assert result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr


def test_submit_refuses_non_number_with_usage_error(runner: CliRunner) -> None:
    result = runner.invoke(app, ["submit", "hi", "--max-steps", "lots"])
    assert result.exit_code == 2
    assert result.stdout == ""
    assert "--max-steps" in result.stderr
    assert "Traceback" not in result.stderr


def test_unreachable_server_is_one_line_exit_1(runner: CliRunner) -> None:
    result = runner.invoke(app, ["submit", "What is 2 + 2?", "--json"])
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr.startswith("error: cannot reach Temporal at 127.0.0.1:")
    assert "keel dev" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "args",
    [["status", "agent-job-x", "--json"], ["result", "agent-job-x"], ["cancel", "agent-job-x"]],
)
def test_other_commands_report_unreachable_server(runner: CliRunner, args: list[str]) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 1
    assert result.stdout == ""
    assert "cannot reach Temporal" in result.stderr


def test_blank_answer_is_refused_before_connecting(runner: CliRunner) -> None:
    result = runner.invoke(app, ["answer", "agent-job-x", "  "])
    assert result.exit_code == 2
    assert result.stderr.startswith("error: text: ")


@pytest.mark.parametrize(
    ("args", "field"),
    [(["--state", "sleeping"], "state"), (["--tenant", "x' OR '1'='1", "--json"], "tenant")],
)
def test_list_refuses_bad_filters_before_connecting(
    runner: CliRunner, args: list[str], field: str
) -> None:
    result = runner.invoke(app, ["list", *args])
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr.startswith(f"error: {field}: ")


COMMANDS = {
    "submit": [
        "GOAL",
        "--tenant",
        "--user",
        "--tool",
        "--docs",
        "--max-steps",
        "--max-tool-calls",
        "--max-retries-per-tool",
        "--max-tokens",
        "--max-cost",
        "--max-seconds",
        "--max-iterations",
        "--ask-timeout",
        "--request-key",
        "--notify-workflow",
        "--json",
    ],
    "status": ["JOB", "--json"],
    "watch": ["JOB"],
    "result": ["JOB", "--json", "--timeout"],
    "answer": ["JOB", "TEXT"],
    "approve": ["JOB", "WRITE_ID", "--reason"],
    "reject": ["JOB", "WRITE_ID", "--reason"],
    "cancel": ["JOB"],
    "list": ["--tenant", "--state", "--json"],
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_of_each_command(runner: CliRunner, command: str) -> None:
    result = runner.invoke(app, [command, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.stderr
    for word in COMMANDS[command]:
        assert word in result.stdout, word


def test_top_level_help_lists_the_job_commands(runner: CliRunner) -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in COMMANDS:
        assert command in result.stdout


@pytest.mark.parametrize("width", [50, 80, 200])
def test_job_ids_are_never_truncated(width: int) -> None:
    rows = [
        JobSummary(
            job_id="agent-job-" + "k" * 100 + str(i),
            state="budget_exhausted",
            tenant="acme",
            user="bob",
            temporal_status="COMPLETED",
            started_at=datetime(2026, 1, 2, 3, 4, tzinfo=UTC),
            cost_usd=0.25,
            tokens=1234,
        )
        for i in range(2)
    ] + [
        JobSummary(
            job_id="agent-job-short",
            temporal_status="TERMINATED",
            started_at=datetime(2026, 1, 2, 3, 4, tzinfo=UTC),
        )
    ]
    out = io.StringIO()
    print_jobs(Console(file=out, width=width, color_system=None), rows)
    lines = out.getvalue().splitlines()
    for row in rows:
        assert any(row.job_id in line for line in lines), row.job_id
    assert "…" not in out.getvalue()
    assert "terminated" in out.getvalue()


@pytest.mark.parametrize("argv", [["status", "agent-job-x", "--json"], ["list", "--json"]])
def test_an_unreachable_api_is_one_line_and_exit_1(argv: list[str]) -> None:
    api = f"http://{closed_port_address()}"
    done = CliRunner(env={"KEEL_API_URL": api}).invoke(app, argv)
    assert done.exit_code == 1
    assert done.output.strip().startswith(f"error: cannot reach Keel's API at {api}")
    assert "Traceback" not in done.output


def test_help_lists_every_command_once() -> None:
    done = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "200"})
    assert done.exit_code == 0
    for name in ("submit", "status", "watch", "result", "answer", "cancel", "list", "fleet"):
        assert f" {name} " in done.output, name
    for name in ("worker", "sim-llm", "codec-server", "api", "dev", "demo", "bench"):
        assert f" {name} " in done.output, name
