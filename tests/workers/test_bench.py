"""``keel bench`` as a user runs it: a small run end to end, checked through its JSON.

A smoke test of the benchmark, not a timed test: it asserts that figures were measured and are
consistent with each other, never how fast anything was.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from keel.workers.bench.history import HISTORY_PARTS
from keel.workers.bench.overhead import met_targets, round_sizes

JOBS = 6
ITERATIONS = 6
HISTORY_LIMIT = 2_000_000


def test_rounds_split_the_jobs_evenly() -> None:
    assert round_sizes(200, 4) == [50, 50, 50, 50]
    assert round_sizes(6, 4) == [2, 2, 1, 1]
    assert round_sizes(3, 4) == [1, 1, 1]
    assert sum(round_sizes(101, 7)) == 101


def test_targets_are_judged_in_the_right_direction() -> None:
    ratios = {"jobs_per_s": 0.9, "single_median_s": 1.11, "history_bytes_per_job": 1.5}
    assert met_targets(ratios) == {
        "jobs_per_s": True,
        "single_median_s": False,
        "history_bytes_per_job": True,
    }
    assert met_targets({"jobs_per_s": 0.89})["jobs_per_s"] is False
    assert met_targets({})["history_bytes_per_job"] is None


def test_bench_smoke_run_measures_overhead_and_long_job(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    # Hermetic: the benchmark starts its own Redis and simulator, whatever this shell points at.
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "OPENAI_API_KEY")}
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "keel.workers.cli",
            "bench",
            "--server",
            "memory",
            "--jobs",
            str(JOBS),
            "--concurrency",
            "3",
            "--rounds",
            "2",
            "--iterations",
            str(ITERATIONS),
            "--only",
            "overhead,long",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    report = json.loads(out.read_text())
    assert report["complete"] is True

    settings = report["settings"]
    assert settings["servers"] == ["memory"]
    assert settings["sections"] == ["overhead", "long"]
    assert (settings["jobs"], settings["concurrency"], settings["iterations"]) == (
        JOBS,
        3,
        ITERATIONS,
    )
    assert settings["rounds"] == 2
    assert settings["transfer_rps"] > 0
    assert settings["cpu_count"] >= 1

    results = report["results"]["memory"]
    assert set(results) >= {"overhead", "long"} and "scale" not in results
    overhead = results["overhead"]
    # Queue names are recorded in history events: equal lengths keep the byte counts comparable.
    assert len({len(q) for q in overhead["task_queues"].values()}) == 1, overhead["task_queues"]
    for kind in ("keel", "bare", "bare_unsandboxed"):
        figures = overhead[kind]
        assert figures["completed"] == JOBS, figures["outcomes"]
        assert figures["jobs_per_s"] > 0
        assert 0 < figures["latency_p50_s"] <= figures["latency_p95_s"]
        assert figures["single_median_s"] > 0
        assert figures["history_events_per_job"] > 0
        assert figures["history_bytes_per_job"] > 0
        # Same shape on both sides: plan, four parallel calls, answer, verify.
        assert figures["activities_per_job"] == 7
        # CPU per job is read for this process and, from /proc, for the server and simulator.
        assert figures["cpu_ms_per_job"] > 0 and figures["server_cpu_ms_per_job"] > 0
        assert figures["simulator_cpu_ms_per_job"] >= 0
        assert math.isclose(
            figures["all_cpu_ms_per_job"],
            figures["cpu_ms_per_job"]
            + figures["server_cpu_ms_per_job"]
            + figures["simulator_cpu_ms_per_job"],
        )
        assert len(figures["round_jobs_per_s"]) == 2 and min(figures["round_jobs_per_s"]) > 0
        parts = {p: figures[f"history_{p}_bytes_per_job"] for p in HISTORY_PARTS}
        assert math.isclose(sum(parts.values()), figures["history_bytes_per_job"]), parts
        assert parts["payloads"] > 0 and parts["events"] > 0
    # The bare workflow sets no summaries, details or search attributes and records no marker;
    # Keel names every activity, describes the job and upserts its search attributes.
    bare_parts = overhead["bare"]
    assert bare_parts["history_metadata_bytes_per_job"] == 0
    assert bare_parts["history_markers_bytes_per_job"] == 0
    assert overhead["keel"]["history_metadata_bytes_per_job"] > 0
    for baseline in ("bare", "bare_unsandboxed"):
        ratios = overhead[f"ratio_keel_over_{baseline}"]
        for key in ("jobs_per_s", "latency_p50_s", "single_median_s", "history_bytes_per_job"):
            expected = overhead["keel"][key] / overhead[baseline][key]
            assert math.isclose(ratios[key], expected, rel_tol=1e-9), key
        rounds = zip(
            overhead["keel"]["round_jobs_per_s"],
            overhead[baseline]["round_jobs_per_s"],
            strict=True,
        )
        assert ratios["jobs_per_s_by_round"] == pytest.approx([k / b for k, b in rounds])
        assert overhead[f"targets_vs_{baseline}"] == met_targets(ratios)
    assert overhead["keel_workflow_sandbox"] is False

    long = results["long"]
    assert long["iterations_reached"] == ITERATIONS
    assert long["exhausted_budget"] == "max_iterations"
    assert long["runs"] >= 1 and len(long["per_run"]) == long["runs"]
    assert sum(r["iterations"] for r in long["per_run"]) == ITERATIONS
    assert 0 < long["max_run_history_bytes"] < HISTORY_LIMIT
    assert long["total_history_bytes"] >= long["max_run_history_bytes"]
    assert long["passed"] is True

    assert "Overhead" in run.stdout and "PASS" in run.stdout
    assert "targets vs bare:" in run.stdout and "targets vs bare-u:" in run.stdout


def test_bench_cli_section_times_whole_keel_processes(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("REDIS_URL", "OPENAI_API_KEY", "KEEL_API_URL")
    }
    argv = ["bench", "--server", "memory", "--only", "cli", "--cli-runs", "3", "--warmup", "1"]
    run = subprocess.run(
        [sys.executable, "-m", "keel.workers.cli", *argv, "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    cli = json.loads(out.read_text())["results"]["memory"]["cli"]
    assert cli["runs"] == 3
    assert set(cli["timings"]) == {
        "help",
        "status_api",
        "list_api",
        "status_direct",
        "list_direct",
    }
    for name, t in cli["timings"].items():
        assert 0 < t["min_ms"] <= t["median_ms"] <= t["p95_ms"] <= t["max_ms"], name
    assert set(cli["targets_met"]) == {"help", "status_api", "list_api"}
    assert "keel --help" in run.stdout and "(API)" in run.stdout
