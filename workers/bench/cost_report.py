"""The figures of ``keel bench cost``: per run, against the targets, per lever; and their tables.

Pure computation over the job records ``workers.bench.cost`` collects (as dicts, exactly as
they are written to ``--json``), plus the rich tables that print them. Nothing here is a
hard-coded figure: every number comes from the records, and every target is judged from them.

How the less obvious figures are taken:

- **Cross-tenant hits.** Every cache key carries its tenant, so a hit can only come from the
  same tenant's entries; this checks it from the outside. A job with any cache hit is explained
  when another job of its tenant, with the same normalised goal, was submitted before it ended
  (that job may have written the entry). Otherwise its response-cache hits are unexplained (no
  call of one job repeats another of its calls: each prompt carries the iteration), and so are
  its tool and retrieval hits beyond the repeats of its own calls (a ``long`` goal fetches the
  same page every iteration). Each goal's text, tool arguments and queries are unique to it,
  so nothing else of its tenant can explain a hit. An unexplained hit is a cross-tenant hit.
- **Fully cached speedup.** A job whose every cache lookup hit (no misses, some hits: nothing
  reached the simulator) against the latency of that goal's first run in its tenant. Judged on
  the speedup probe (``probe_figures``: goals run alone, cold then again); the same ratio over
  the ``keel`` run's exact repeats (``cached_speedup``) is reported too, but there both
  latencies are mostly time spent waiting for a busy machine, at different moments.
- **Escalation's credit** is accounted from the ``keel`` run, not measured by a run without
  it (escalation is the workflow's decision, with no switch): it spent ``escalation_usd``, and
  it rescued the escalated jobs that ended correct on a goal harder than the fast model can
  draft right (so their fast drafts were wrong).
"""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from rich.table import Table

from keel.workers.bench.measure import percentile, ratio
from keel.workers.sim.config import SimConfig
from keel.workers.sim.quality import capability

if TYPE_CHECKING:
    from keel.workers.bench.cost import JobRecord, RunSpec

__all__ = [
    "TARGETS",
    "ablation_table",
    "ablations",
    "cached_speedup",
    "comparison",
    "cross_tenant_hits",
    "probe_figures",
    "run_figures",
    "runs_table",
    "targets_table",
    "workload_table",
]

TARGETS: dict[str, tuple[str, str, float]] = {
    "cost_ratio": ("cost per job, keel / baseline", "<=", 0.3),
    "correct_delta_points": ("correct rate, keel - baseline (points)", ">=", -1.0),
    "cross_tenant_hits": ("cross-tenant cache hits", "<=", 0.0),
    "cached_speedup_median": ("fully cached job vs its first run (median x)", ">=", 10.0),
}
"""Issue 14's targets: figure key to (label, comparison, limit)."""
FAST_CAPABILITY = capability("sim-small", SimConfig())
"""The fast tier's model's capability in the simulator's quality model: a goal harder than this
is drafted wrong on the fast tier, whatever the verifier then says."""


def _mean(values: Sequence[float]) -> float | None:
    return statistics.fmean(values) if values else None


def _sum_maps(maps: Sequence[Mapping[str, float]]) -> dict[str, float]:
    total: dict[str, float] = {}
    for one in maps:
        for key, value in one.items():
            total[key] = total.get(key, 0) + value
    return dict(sorted(total.items()))


def run_figures(records: Sequence[JobRecord]) -> dict[str, Any]:
    """One run's figures from its job records (see the module docstring)."""
    n = len(records)
    cost = [r.cost_usd for r in records]
    latencies = [r.latency_s for r in records if r.outcome and not r.outcome.startswith("error")]
    hits = _sum_maps([r.cache_hits for r in records])
    misses = _sum_maps([r.cache_misses for r in records])
    tiers_usd = _sum_maps([r.by_tier_usd for r in records])
    tiers_tokens = _sum_maps([r.by_tier_tokens for r in records])
    rescued = [
        r.index
        for r in records
        if r.escalated and r.correct and (r.difficulty or 0) > FAST_CAPABILITY
    ]
    return {
        "jobs": n,
        "completed": sum(r.outcome == "completed" for r in records),
        "outcomes": dict(Counter(r.outcome for r in records)),
        "cost_usd": sum(cost),
        "cost_per_job": _mean(cost),
        "tokens_per_job": _mean([r.tokens for r in records]),
        "correct_rate": _mean([float(r.correct) for r in records]),
        "verified_rate": _mean([float(r.verified) for r in records]),
        "verified_but_wrong": sum(r.verified and not r.correct for r in records),
        "latency_p50_s": percentile(latencies, 50),
        "latency_p95_s": percentile(latencies, 95),
        "wall_s": max((r.ended_s for r in records), default=0.0),
        "cost_by_tier_per_job": {t: v / n for t, v in tiers_usd.items()} if n else {},
        "tokens_by_tier_per_job": {t: v / n for t, v in tiers_tokens.items()} if n else {},
        "router_usd_per_job": tiers_usd.get("router", 0.0) / n if n else None,
        "cache": {
            kind: {"hits": int(hits.get(kind, 0)), "misses": int(misses.get(kind, 0))}
            for kind in sorted({*hits, *misses})
        },
        "saved_usd": sum(r.saved_usd for r in records),
        "saved_tokens": sum(r.saved_tokens for r in records),
        "escalated_jobs": sum(r.escalated for r in records),
        "escalations": sum(r.escalations for r in records),
        "escalation_usd": sum(r.escalation_usd for r in records),
        "escalation_usd_per_job": sum(r.escalation_usd for r in records) / n if n else None,
        "rescued_by_escalation": len(rescued),
        "started_on": dict(Counter(r.started_on or "none" for r in records)),
        "route_source": dict(Counter(r.route_source or "none" for r in records)),
        "by_kind": _by(records, lambda r: r.kind),
        "by_difficulty": _by(records, lambda r: str(r.difficulty)),
    }


def _by(records: Sequence[JobRecord], key: Any) -> dict[str, dict[str, Any]]:
    groups: dict[str, list[JobRecord]] = {}
    for r in records:
        groups.setdefault(key(r), []).append(r)
    return {
        name: {
            "jobs": len(group),
            "cost_per_job": _mean([r.cost_usd for r in group]),
            "correct_rate": _mean([float(r.correct) for r in group]),
            "escalated_jobs": sum(r.escalated for r in group),
            "escalation_usd": sum(r.escalation_usd for r in group),
        }
        for name, group in sorted(groups.items())
    }


def cross_tenant_hits(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Jobs with a cache hit no job of their own tenant explains (see the module docstring)."""
    groups: dict[tuple[int, str], list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault((r["tenant"], r["normalized"]), []).append(r)
    checked, unexplained = 0, []
    for r in records:
        hits = r["cache_hits"]
        if not sum(hits.values()):
            continue
        checked += 1
        same_goal = groups[(r["tenant"], r["normalized"])]
        if any(o is not r and o["submitted_s"] < r["ended_s"] for o in same_goal):
            continue
        own_repeats = max(0, r["tool_calls"] - r["distinct_calls"])
        tools = hits.get("tool", 0) + hits.get("retrieval", 0)
        if hits.get("response", 0) + max(0, tools - own_repeats) > 0:
            unexplained.append(r["index"])
    return {"jobs_with_hits": checked, "count": len(unexplained), "jobs": unexplained}


def cached_speedup(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """First-run latency over latency of each exact repeat served wholly from the caches."""
    firsts = {(r["tenant"], r["goal_id"]): r for r in records if r["repeat"] == "first"}
    exact = [r for r in records if r["repeat"] == "exact" and r["outcome"] == "completed"]
    cached = [
        r for r in exact if sum(r["cache_hits"].values()) and not sum(r["cache_misses"].values())
    ]
    ratios = []
    for r in cached:
        first = firsts.get((r["tenant"], r["goal_id"]))
        if first is not None and first["outcome"] == "completed" and r["latency_s"] > 0:
            ratios.append(first["latency_s"] / r["latency_s"])
    return {
        "exact_repeats": len(exact),
        "fully_cached": len(cached),
        "samples": len(ratios),
        "median": statistics.median(ratios) if ratios else None,
        "min": min(ratios, default=None),
        "cached_latency_p50_s": percentile([r["latency_s"] for r in cached], 50),
    }


def probe_figures(pairs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The speedup probe's figures: cold over warm latency of each goal run alone.

    Only pairs whose repeat was served wholly from the caches count toward the median.
    """
    cached = [
        p
        for p in pairs
        if p["warm"]["outcome"] == "completed"
        and p["cold"]["outcome"] == "completed"
        and sum(p["warm"]["cache_hits"].values())
        and not sum(p["warm"]["cache_misses"].values())
        and p["warm"]["latency_s"] > 0
    ]
    ratios = [p["cold"]["latency_s"] / p["warm"]["latency_s"] for p in cached]
    return {
        "goals": len(pairs),
        "fully_cached": len(cached),
        "median": statistics.median(ratios) if ratios else None,
        "min": min(ratios, default=None),
        "max": max(ratios, default=None),
        "cold_p50_s": percentile([p["cold"]["latency_s"] for p in cached], 50),
        "warm_p50_s": percentile([p["warm"]["latency_s"] for p in cached], 50),
        "pairs": [
            {
                "goal_id": p["goal_id"],
                "kind": p["kind"],
                "cold_s": p["cold"]["latency_s"],
                "warm_s": p["warm"]["latency_s"],
                "fully_cached": p in cached,
            }
            for p in pairs
        ],
    }


def _judge(value: float | None, op: str, limit: float) -> bool | None:
    if value is None:
        return None
    return value <= limit if op == "<=" else value >= limit


def comparison(
    runs: dict[str, Any], jobs: dict[str, list[dict[str, Any]]], probe: dict[str, Any]
) -> dict[str, Any]:
    """Keel against the baseline: each target's figure and whether it was met.

    Cross-tenant hits are counted over every run. The speedup target is judged on the probe
    (``probe_figures``: goals run alone); the same ratio inside the ``keel`` run, under load, is
    reported beside it.
    """
    base, keel = runs["baseline"], runs["keel"]
    cross = {name: cross_tenant_hits(records) for name, records in jobs.items()}
    under_load = cached_speedup(jobs["keel"])
    delta = None
    if keel["correct_rate"] is not None and base["correct_rate"] is not None:
        delta = 100 * (keel["correct_rate"] - base["correct_rate"])
    figures = {
        "cost_ratio": ratio(keel["cost_per_job"], base["cost_per_job"]),
        "correct_delta_points": delta,
        "cross_tenant_hits": float(sum(c["count"] for c in cross.values())),
        "cached_speedup_median": probe["median"],
    }
    targets = {
        key: {
            "label": label,
            "target": f"{op} {limit:g}",
            "figure": figures[key],
            "met": _judge(figures[key], op, limit),
        }
        for key, (label, op, limit) in TARGETS.items()
    }
    return {
        "targets": targets,
        "cross_tenant": cross,
        "cached_speedup": probe,
        "cached_speedup_under_load": under_load,
    }


def ablations(
    runs: dict[str, Any], jobs: dict[str, list[dict[str, Any]]], specs: Sequence[RunSpec]
) -> dict[str, Any]:
    """The saving credited to each lever: cost per job without it, minus with everything.

    Levers interact (a cached reply saves nothing more by its tier), so the credits need not
    add up to the whole saving; each says what removing that one lever alone would cost.
    """
    keel, base = runs["keel"], runs["baseline"]
    total = base["cost_per_job"] - keel["cost_per_job"]
    rows: list[dict[str, Any]] = []
    for spec in specs:
        if spec.lever is None or spec.name not in runs:
            continue
        fig = runs[spec.name]
        saving = fig["cost_per_job"] - keel["cost_per_job"]
        rows.append(
            {
                "lever": spec.lever,
                "method": f"run {spec.name}",
                "cost_per_job": fig["cost_per_job"],
                "tokens_per_job": fig["tokens_per_job"],
                "correct_rate": fig["correct_rate"],
                "saving_per_job": saving,
                "share_of_saving": ratio(saving, total),
            }
        )
    n = keel["jobs"]
    rows.append(
        {
            "lever": "escalation",
            "method": "accounted (keel run)",
            # A lower bound: without escalation those jobs would go on refining on the fast
            # tier, which costs something too.
            "cost_per_job": keel["cost_per_job"] - keel["escalation_usd_per_job"],
            "tokens_per_job": None,
            "correct_rate": keel["correct_rate"] - keel["rescued_by_escalation"] / n if n else None,
            "saving_per_job": -keel["escalation_usd_per_job"],
            "share_of_saving": ratio(-keel["escalation_usd_per_job"], total),
            "escalated_jobs": keel["escalated_jobs"],
            "rescued_jobs": keel["rescued_by_escalation"],
        }
    )
    verifier = {
        name: {
            key: runs[name][key]
            for key in ("cost_per_job", "correct_rate", "verified_rate", "verified_but_wrong")
        }
        for name in ("keel", "verifier-job")
        if name in runs
    }
    return {"total_saving_per_job": total, "levers": rows, "verifier": verifier}


# --- tables ---------------------------------------------------------------------------------


def _f(value: float | None, fmt: str = ",.2f", scale: float = 1.0) -> str:
    return "–" if value is None else format(value * scale, fmt)


def _met(met: bool | None) -> str:
    return {True: "[green]PASS[/green]", False: "[red]MISS[/red]", None: "–"}[met]


def workload_table(report: dict[str, Any], sim_latency_ms: float) -> Table:
    """The workload: its settings and the mix of jobs it drew."""
    w = report["workload"]
    table = Table(title="keel bench cost · workload")
    table.add_column("setting")
    table.add_column("value")
    table.add_row("jobs / tenants / seed", f"{w['jobs']} / {w['tenants']} / {w['seed']}")
    table.add_row(
        "goal pools",
        f"{w['pool_size']} per tenant ({w['shared_goals']} shared by all), Zipf s={w['zipf_s']}, "
        f"{w['near_repeat_rate']:.0%} of repeats near (case, whitespace)",
    )
    for name in ("kind", "difficulty", "repeat"):
        drawn = ", ".join(f"{k} {v}" for k, v in sorted(w["mix"][name].items()))
        pool = w.get(f"{name}_weights")
        stated = f" (pool mix {', '.join(f'{k} {v:.0%}' for k, v in pool.items())})" if pool else ""
        table.add_row(f"jobs by {name}", drawn + stated)
    table.add_row("distinct (tenant, goal)", str(w["mix"]["distinct_goals"]["all"]))
    table.add_row(
        "kinds",
        "plain: model only · calc: calculator · retrieval: hybrid search of "
        f"{w['corpus_docs']} runbooks · long: http_get of a {w['page_bytes']:,}-byte page, "
        f"re-planned every iteration, first {w['long_fail_verify']} drafts rejected",
    )
    table.add_row("simulator", f"{sim_latency_ms:g} ms per call, quality model on")
    return table


RUN_ROWS: list[tuple[str, str, str, float]] = [
    ("cost per job (µ$)", "cost_per_job", ",.1f", 1e6),
    ("tokens per job", "tokens_per_job", ",.0f", 1.0),
    ("correct rate (%)", "correct_rate", ".1f", 100.0),
    ("verified rate (%)", "verified_rate", ".1f", 100.0),
    ("verified but wrong (jobs)", "verified_but_wrong", ",.0f", 1.0),
    ("latency p50 (ms)", "latency_p50_s", ",.0f", 1000.0),
    ("latency p95 (ms)", "latency_p95_s", ",.0f", 1000.0),
    ("router (µ$ per job)", "router_usd_per_job", ",.1f", 1e6),
    ("saved by response cache (µ$ total)", "saved_usd", ",.0f", 1e6),
    ("escalated jobs", "escalated_jobs", ",.0f", 1.0),
    ("escalation (µ$ total)", "escalation_usd", ",.0f", 1e6),
    ("wall (s)", "wall_s", ",.1f", 1.0),
]
"""Rows of the runs table: label, figure key, format and scale."""


def runs_table(runs: dict[str, Any], sim_latency_ms: float, concurrency: int) -> Table:
    """Every run side by side: cost, tokens, quality, latency, tiers, caches, escalation."""
    table = Table(title=f"keel bench cost · runs (simulator {sim_latency_ms:g} ms per call)")
    table.add_column("figure")
    for name in runs:
        table.add_column(name, justify="right")
    figures = list(runs.values())
    table.add_row("jobs completed", *(f"{f['completed']}/{f['jobs']}" for f in figures))
    for label, key, fmt, scale in RUN_ROWS:
        table.add_row(label, *(_f(f.get(key), fmt, scale) for f in figures))
    tiers = sorted({t for f in figures for t in f["cost_by_tier_per_job"]})
    for tier in tiers:
        table.add_row(
            f"  cost on {tier} (µ$ per job)",
            *(_f(f["cost_by_tier_per_job"].get(tier, 0.0), ",.1f", 1e6) for f in figures),
        )
    kinds = sorted({k for f in figures for k in f["cache"]})
    for kind in kinds:
        table.add_row(
            f"  {kind} cache hits/misses",
            *(
                f"{f['cache'].get(kind, {}).get('hits', 0)}/"
                f"{f['cache'].get(kind, {}).get('misses', 0)}"
                for f in figures
            ),
        )
    for kind in sorted({k for f in figures for k in f["by_kind"]}):
        table.add_row(
            f"  {kind} jobs: µ$ per job · correct %",
            *(
                f"{_f(f['by_kind'][kind]['cost_per_job'], ',.0f', 1e6)} · "
                f"{_f(f['by_kind'][kind]['correct_rate'], '.0f', 100.0)}"
                if kind in f["by_kind"]
                else "–"
                for f in figures
            ),
        )
    table.caption = (
        f"{concurrency} jobs in flight; latency is submit to result. correct: the simulator's "
        "ground truth (POST /sim/grade of the final answer); verified: Keel's verifier."
    )
    return table


def targets_table(comparison: dict[str, Any]) -> Table:
    """Each of issue 14's targets, the figure measured and PASS or MISS."""
    table = Table(title="keel bench cost · targets (keel vs baseline)")
    for column in ("target", "limit", "figure", ""):
        table.add_column(column, justify="left" if column == "target" else "right")
    for t in comparison["targets"].values():
        table.add_row(t["label"], t["target"], _f(t["figure"], ",.3f"), _met(t["met"]))
    probe, load = comparison["cached_speedup"], comparison["cached_speedup_under_load"]
    cross = comparison["cross_tenant"]
    table.caption = (
        f"speedup: {probe['fully_cached']} of {probe['goals']} goals run alone, cold then fully "
        f"cached (p50 {_f(probe['cold_p50_s'], ',.3f')} s vs {_f(probe['warm_p50_s'], ',.3f')} s,"
        f" range {_f(probe['min'], '.1f')}-{_f(probe['max'], '.1f')}x); inside the keel run, "
        f"under load: median {_f(load['median'], '.1f')}x over {load['samples']} fully cached "
        f"exact repeats of {load['exact_repeats']}. Cross-tenant check over "
        f"{sum(c['jobs_with_hits'] for c in cross.values())} jobs with cache hits in "
        f"{len(cross)} runs."
    )
    return table


def ablation_table(ablation: dict[str, Any]) -> Table:
    """The saving credited to each lever, and the verifier's tier compared."""
    table = Table(title="keel bench cost · ablations (each lever removed alone)")
    columns = ("lever", "how", "cost/job (µ$)", "correct (%)", "saving/job (µ$)", "share, note")
    for column in columns:
        table.add_column(column, justify="left" if column in ("lever", "how") else "right")
    for row in ablation["levers"]:
        table.add_row(
            row["lever"],
            row["method"],
            _f(row["cost_per_job"], ",.1f", 1e6),
            _f(row["correct_rate"], ".1f", 100.0),
            _f(row["saving_per_job"], ",.1f", 1e6),
            _f(row["share_of_saving"], ".0%"),
        )
    for name, fig in ablation["verifier"].items():
        table.add_row(
            "verifier tier",
            "deep (default)" if name == "keel" else "job tier",
            _f(fig["cost_per_job"], ",.1f", 1e6),
            _f(fig["correct_rate"], ".1f", 100.0),
            "",
            f"{fig['verified_but_wrong']} verified wrong",
        )
    table.caption = (
        f"saving/job: cost per job without the lever minus with all of Keel's defaults "
        f"(the whole saving over the baseline is "
        f"{_f(ablation['total_saving_per_job'], ',.1f', 1e6)} µ$ per job); levers interact, so "
        "shares need not add up. Escalation is accounted from the keel run (its cost, and "
        "correct rate without the jobs it rescued), not run without it."
    )
    return table
