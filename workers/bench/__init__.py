"""``keel bench``: what Keel costs over bare Temporal, long-job history growth, worker scaling.

``command`` holds the typer command, exported here as ``bench``; ``run`` starts the servers
(``stack``), runs the sections (``overhead``, ``long_job``, ``scale``) and prints ``tables``;
``measure`` and ``history`` take the figures; ``bare`` is the baseline workflow.

``bench`` is imported on first use (PEP 562): the workflow sandbox re-imports the baseline's
module, and so this package, for every workflow it runs, and that must not import the command's
parser with it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from keel.workers.bench.command import bench

__all__ = ["bench"]


def __getattr__(name: str) -> Any:
    if name == "bench":
        from keel.workers.bench.command import bench

        return bench
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
