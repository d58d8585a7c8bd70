"""``keel bench``: what Keel costs over bare Temporal, long-job history growth, worker scaling.

``command`` holds the typer group, exported here as ``bench_app`` (its callback, ``bench``, runs
the classic sections); ``run`` starts the servers (``stack``), runs the sections (``overhead``,
``long_job``, ``scale``) and prints ``tables``; ``measure`` and ``history`` take the figures;
``bare`` is the baseline workflow. ``keel bench cost`` is ``cost_main``, ``cost``,
``cost_workload`` and ``cost_report``: Keel's economics against an always-deep baseline.
``keel bench sessions`` is ``sessions_main``, ``sessions`` and ``sessions_report``: per-turn
overhead, context and history of a long session, status read latency.

``bench`` is imported on first use (PEP 562): the workflow sandbox re-imports the baseline's
module, and so this package, for every workflow it runs, and that must not import the command's
parser with it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from keel.workers.bench.command import bench, bench_app

__all__ = ["bench", "bench_app"]


def __getattr__(name: str) -> Any:
    if name == "bench":
        from keel.workers.bench.command import bench

        return bench
    if name == "bench_app":
        from keel.workers.bench.command import bench_app

        return bench_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
