"""``keel bench cost``: its seeded workload, its figures, and a small run end to end.

The workload and the report's arithmetic are pure and tested directly; a small run (a dozen
jobs, the simulator at zero latency) goes through every run of the benchmark on the session's
Temporal, Redis and simulator, and one tiny ``keel bench cost`` process checks the command, its
tables and its JSON. Nothing here asserts a duration: only structure and invariants.
"""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from rich.progress import Progress
from temporalio.client import Client

from keel.activities.cache import normalize_text
from keel.workers.bench import cost_report
from keel.workers.bench.config import Servers
from keel.workers.bench.cost import CostConfig, measure_cost, run_specs
from keel.workers.bench.cost_workload import (
    POOL_SIZE,
    corpus_documents,
    mix,
    near_repeat,
    service_names,
    workload,
)
from keel.workers.sim.replies import find_expression, find_url

BASE = "http://127.0.0.1:9/pages"
DOCS = service_names(corpus_documents(0))
SMALL_JOBS, SMALL_TENANTS = 14, 2


def test_one_seed_gives_one_workload() -> None:
    first = workload(120, 3, 7, BASE, DOCS)
    assert workload(120, 3, 7, BASE, DOCS) == first
    assert workload(120, 3, 8, BASE, DOCS).jobs != first.jobs
    assert [job.tenant for job in first.jobs] == [i % 3 for i in range(120)]
    assert [job.index for job in first.jobs] == list(range(120))


def test_repeats_are_exact_or_differ_only_in_case_and_whitespace() -> None:
    jobs = workload(300, 5, 0, BASE, DOCS).jobs
    seen: set[tuple[int, str]] = set()
    for job in jobs:
        key = (job.tenant, job.goal.goal_id)
        assert (job.repeat == "first") == (key not in seen)
        seen.add(key)
        if job.repeat in ("first", "exact"):
            assert job.text == job.goal.text
        else:
            assert job.text != job.goal.text
            assert job.normalized() == normalize_text(job.goal.text, "casefold")
            # The simulator's directive, the URL and the numbers are never retyped.
            assert job.text.endswith(job.goal.text[job.goal.text.index("[sim:") :])
            assert find_url(job.text) == find_url(job.goal.text)
    counts = mix(jobs)
    assert counts["repeat"]["first"] == counts["distinct_goals"]["all"] == len(seen)
    assert counts["repeat"]["exact"] > 0 and counts["repeat"]["near"] > 0
    assert set(counts["kind"]) == {"plain", "calc", "retrieval", "long"}
    assert set(counts["difficulty"]) == {"1", "2", "3"}


def test_near_repeat_changes_the_text_but_not_its_normal_form() -> None:
    rng = random.Random(3)
    text = "Use the calculator to work out 12 * 34 + 5 for line s01 [sim: difficulty=2]"
    for _ in range(50):
        variant = near_repeat(text, rng)
        assert variant != text
        assert normalize_text(variant, "casefold") == normalize_text(text, "casefold")
        assert find_expression(variant) is not None


def test_draws_are_skewed_and_popular_goals_are_shared_across_tenants() -> None:
    jobs = workload(300, 5, 0, BASE, DOCS).jobs
    for tenant in range(5):
        drawn = Counter(j.goal.goal_id for j in jobs if j.tenant == tenant)
        # Zipf: a tenant's favourite goal is asked several times, most goals rarely or never.
        assert drawn.most_common(1)[0][1] >= 4
        assert len(drawn) < POOL_SIZE
    shared = {j.goal.goal_id: set() for j in jobs if j.goal.goal_id.startswith("s")}
    for job in jobs:
        if job.goal.goal_id in shared:
            shared[job.goal.goal_id].add(job.tenant)
    assert max(len(tenants) for tenants in shared.values()) >= 3


def test_each_goal_has_its_own_text_tool_arguments_and_query() -> None:
    goals = {j.goal.goal_id: j.goal for j in workload(300, 5, 0, BASE, DOCS).jobs}
    texts = [g.text for g in goals.values()]
    assert len(set(texts)) == len(texts)
    calc = [find_expression(g.text) for g in goals.values() if g.kind == "calc"]
    urls = [find_url(g.text) for g in goals.values() if g.kind == "long"]
    assert calc and None not in calc and len(set(calc)) == len(calc)
    assert urls and all(u and u.startswith(BASE) for u in urls) and len(set(urls)) == len(urls)
    for goal in goals.values():
        assert goal.uses_docs == (goal.kind == "retrieval")
        assert goal.distinct_calls == (0 if goal.kind == "plain" else 1)
        if goal.kind == "retrieval":
            assert any(f"the {doc} service" in goal.text for doc in DOCS)


def _record(index: int, tenant: int, **fields: Any) -> dict[str, Any]:
    record = {
        "index": index,
        "tenant": tenant,
        "goal_id": "g",
        "normalized": "goal g",
        "repeat": "first",
        "outcome": "completed",
        "submitted_s": float(index),
        "ended_s": float(index) + 0.5,
        "latency_s": 0.5,
        "tool_calls": 0,
        "distinct_calls": 0,
        "cache_hits": {},
        "cache_misses": {},
    }
    return record | fields


def test_a_hit_no_job_of_the_tenant_explains_is_a_cross_tenant_hit() -> None:
    records = [
        _record(0, tenant=0, cache_misses={"response": 4}),
        # Tenant 1's first ask of the goal tenant 0 asked: any hit came from tenant 0.
        _record(1, tenant=1, cache_hits={"response": 1}, cache_misses={"response": 3}),
        # Tenant 0 again: its own first job explains the hits.
        _record(2, tenant=0, repeat="exact", cache_hits={"response": 4}),
        # A long goal re-fetching its page: hits up to its own repeats are its own.
        _record(3, tenant=2, normalized="long", tool_calls=4, distinct_calls=1,
                cache_hits={"tool": 3}),
        _record(4, tenant=3, normalized="long", tool_calls=4, distinct_calls=1,
                cache_hits={"tool": 4}),
    ]  # fmt: skip
    found = cost_report.cross_tenant_hits(records)
    assert found == {"jobs_with_hits": 4, "count": 2, "jobs": [1, 4]}
    # A later job of the same tenant and goal, submitted before this one ended, explains it.
    overlapping = [_record(0, 0, cache_hits={"response": 1}), _record(1, 0, submitted_s=0.2)]
    assert cost_report.cross_tenant_hits(overlapping)["count"] == 0


def test_the_speedup_counts_only_exact_repeats_served_wholly_from_the_caches() -> None:
    records = [
        _record(0, 0, latency_s=1.0),
        _record(1, 0, repeat="exact", latency_s=0.1, cache_hits={"response": 4}),
        _record(2, 0, repeat="exact", latency_s=0.25, cache_hits={"response": 4}),
        _record(3, 0, repeat="exact", latency_s=0.9, cache_hits={"response": 2},
                cache_misses={"response": 2}),
        _record(4, 0, repeat="near", latency_s=0.01, cache_hits={"response": 4}),
    ]  # fmt: skip
    speedup = cost_report.cached_speedup(records)
    assert (speedup["exact_repeats"], speedup["fully_cached"], speedup["samples"]) == (3, 2, 2)
    assert speedup["median"] == pytest.approx((10.0 + 4.0) / 2)
    assert speedup["min"] == pytest.approx(4.0)


async def test_a_small_run_measures_every_run_and_judges_the_targets(
    client: Client, redis_url: str, sim_url: str, tmp_path: Path
) -> None:
    config = CostConfig(jobs=SMALL_JOBS, tenants=SMALL_TENANTS, seed=0, concurrency=4)
    with Progress(disable=True) as progress:
        report = await measure_cost(client, Servers(redis_url, sim_url), config, progress, tmp_path)
    specs = run_specs(ablations=True)
    runs, jobs = report["runs"], report["jobs"]
    assert list(runs) == [s.name for s in specs] == list(report["run_settings"])
    assert report["workload"]["mix"]["repeat"].get("exact", 0) > 0, "the run needs repeats"

    for name, figures in runs.items():
        records = jobs[name]
        assert figures["jobs"] == len(records) == SMALL_JOBS
        assert figures["completed"] == SMALL_JOBS, (name, figures["outcomes"])
        assert [r["index"] for r in records] == list(range(SMALL_JOBS))
        assert figures["cost_per_job"] == pytest.approx(
            sum(r["cost_usd"] for r in records) / SMALL_JOBS
        )
        assert sum(figures["cost_by_tier_per_job"].values()) == pytest.approx(
            figures["cost_per_job"], abs=1e-6
        )
        assert 0.0 <= figures["correct_rate"] <= 1.0 and 0.0 <= figures["verified_rate"] <= 1.0
        assert 0 < figures["latency_p50_s"] <= figures["latency_p95_s"]
        # Each run's jobs ran as its own tenants, so no run was served another run's entries.
        tag = report["tag"]
        for r in records:
            assert r["job_id"] == f"agent-job-t{r['tenant']}-{name}-{tag}:j{r['index']:05d}"

    base, keel = runs["baseline"], runs["keel"]
    assert set(base["cost_by_tier_per_job"]) == {"deep"} and base["router_usd_per_job"] == 0
    assert base["cache"] == {} and base["escalated_jobs"] == 0 and base["saved_usd"] == 0
    assert base["route_source"] == {"caller": SMALL_JOBS}
    # The deep model drafts every difficulty of the workload right: the baseline is the ceiling.
    assert base["correct_rate"] == 1.0
    assert keel["route_source"] == {"router": SMALL_JOBS} and keel["router_usd_per_job"] > 0
    assert keel["cache"]["response"]["hits"] > 0 and keel["saved_usd"] > 0
    assert keel["cost_per_job"] < base["cost_per_job"]
    # Each ablation removed its lever and nothing else.
    assert "response" not in runs["no-response-cache"]["cache"]
    assert {"tool", "retrieval"} & set(runs["no-response-cache"]["cache"])
    assert not {"tool", "retrieval"} & set(runs["no-tool-cache"]["cache"])
    assert runs["no-router"]["started_on"] == {"deep": SMALL_JOBS}
    assert runs["no-router"]["router_usd_per_job"] == 0
    assert report["run_settings"]["verifier-job"]["role_tiers"]["verifier"] == "job"
    assert report["run_settings"]["keel"]["role_tiers"]["verifier"] == "deep"
    assert report["run_settings"]["no-compression"]["compress"] is False

    comparison = report["comparison"]
    targets = comparison["targets"]
    assert set(targets) == set(cost_report.TARGETS)
    assert targets["cost_ratio"]["figure"] == pytest.approx(
        keel["cost_per_job"] / base["cost_per_job"]
    )
    assert targets["correct_delta_points"]["figure"] == pytest.approx(
        100 * (keel["correct_rate"] - base["correct_rate"])
    )
    for key, (_, op, limit) in cost_report.TARGETS.items():
        figure, met = targets[key]["figure"], targets[key]["met"]
        if figure is not None:
            assert met == (figure <= limit if op == "<=" else figure >= limit), key
    # Keys carry the tenant: no hit is explained by another tenant's job, in any run.
    assert targets["cross_tenant_hits"]["figure"] == 0 and targets["cross_tenant_hits"]["met"]
    assert sum(c["jobs_with_hits"] for c in comparison["cross_tenant"].values()) > 0
    load = comparison["cached_speedup_under_load"]
    assert load["samples"] <= load["fully_cached"] <= load["exact_repeats"]
    # The probe ran each picked goal alone, cold and then again, as tenants of its own.
    probe = report["speedup_probe"]
    assert comparison["cached_speedup"] == probe
    assert targets["cached_speedup_median"]["figure"] == probe["median"]
    assert 0 < probe["goals"] <= 9 and probe["fully_cached"] <= probe["goals"]
    assert {p["kind"] for p in probe["pairs"]} <= {"plain", "calc", "retrieval"}
    # At zero latency a cold run still calls the simulator and a repeat never does.
    assert probe["fully_cached"] > 0

    ablation = report["ablations"]
    levers = {row["lever"]: row for row in ablation["levers"]}
    assert set(levers) == {
        "router",
        "response cache",
        "tool and retrieval caches",
        "compression",
        "escalation",
    }
    for spec in specs:
        if spec.lever is not None:
            row = levers[spec.lever]
            assert row["saving_per_job"] == pytest.approx(
                runs[spec.name]["cost_per_job"] - keel["cost_per_job"]
            )
    escalation = levers["escalation"]
    assert escalation["saving_per_job"] == pytest.approx(-keel["escalation_usd_per_job"])
    assert escalation["rescued_jobs"] <= escalation["escalated_jobs"] == keel["escalated_jobs"]
    assert set(ablation["verifier"]) == {"keel", "verifier-job"}

    console = Console(record=True, width=140)
    console.print(cost_report.runs_table(runs, 0.0, 4))
    console.print(cost_report.targets_table(comparison))
    console.print(cost_report.ablation_table(ablation))
    text = console.export_text()
    assert all(name in text for name in runs)
    assert "PASS" in text and text.count("PASS") + text.count("MISS") == len(targets)


def test_keel_bench_cost_runs_from_the_command_line(tmp_path: Path) -> None:
    out = tmp_path / "cost.json"
    # Hermetic: the benchmark starts its own Redis and simulator, whatever this shell points at.
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "OPENAI_API_KEY")}
    argv = ["bench", "cost", "--jobs", "6", "--tenants", "2", "--no-ablations"]
    argv += ["--sim-latency-ms", "0", "--concurrency", "3", "--seed", "5", "--json", str(out)]
    run = subprocess.run(
        [sys.executable, "-m", "keel.workers.cli", *argv],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    report = json.loads(out.read_text())
    assert report["complete"] is True
    settings = report["settings"]
    assert (settings["jobs"], settings["tenants"], settings["seed"]) == (6, 2, 5)
    assert settings["sim_latency_ms"] == 0 and settings["ablations"] is False
    assert settings["tier_models"] == {
        "router": "sim-small",
        "fast": "sim-small",
        "deep": "sim-large",
    }
    assert list(report["runs"]) == ["baseline", "keel"]
    assert all(len(records) == 6 for records in report["jobs"].values())
    assert math.isfinite(report["wall_s"]) and report["wall_s"] > 0
    for title in ("workload", "runs", "targets", "ablations"):
        assert f"keel bench cost · {title}" in run.stdout
    assert "cross-tenant cache hits" in run.stdout


def test_keel_bench_is_a_group_that_keeps_its_sections() -> None:
    from typer.testing import CliRunner

    from keel.workers.cli import build_app

    runner = CliRunner()
    app = build_app()
    group = runner.invoke(app, ["bench", "--help"])
    assert group.exit_code == 0 and "cost" in group.output and "--only" in group.output
    cost = runner.invoke(app, ["bench", "cost", "--help"])
    assert cost.exit_code == 0
    assert all(o in cost.output for o in ("--jobs", "--tenants", "--no-ablations", "--json"))
    refused = runner.invoke(app, ["bench", "--only", "nonsense"])
    assert refused.exit_code != 0 and "unknown nonsense" in refused.output
