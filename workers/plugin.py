"""``KeelPlugin``: all of Keel's Temporal wiring in one object, for any client and worker.

The plugin carries the data converter and tracing (from ``KeelClientPlugin``), the jittered
backoff interceptor, ``AgentLoopWorkflow`` and every activity built from one set of
dependencies. ``keel worker``, ``keel dev``, the tests and the benchmark all run Keel through
it, and so can a team's own worker beside its own workflows::

    deps = build_deps_from_settings(WorkerSettings())
    client = await Client.connect("localhost:7233", plugins=[KeelPlugin(deps)])
    worker = Worker(client, task_queue="keel-interactive", workflows=[MyWorkflow])

A plugin given to ``Client.connect`` also configures every worker built on that client. A
client that only submits jobs needs ``KeelClientPlugin`` (or ``keel.client.connect``); a worker
on such a client takes ``KeelPlugin(deps)`` in ``Worker(plugins=[...])``. Workflows, activities
and interceptors are added once however the plugins meet.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

from temporalio.client import ClientConfig
from temporalio.plugin import SimplePlugin
from temporalio.worker import WorkerConfig

from keel.client.plugin import keel_converter, tracing_interceptors, unique_by_type
from keel.workers.registry import INTERCEPTORS, WORKFLOWS, Deps, build_activities

__all__ = ["KeelPlugin"]


def _append_missing(ours: Sequence[Any]) -> Callable[[Sequence[Any] | None], list[Any]]:
    """A SimplePlugin parameter that adds ``ours`` to what a worker has, skipping repeats."""

    def add(existing: Sequence[Any] | None) -> list[Any]:
        have = list(existing or [])
        return have + [item for item in ours if item not in have]

    return add


class KeelPlugin(SimplePlugin):
    """Keel's converter, interceptors, workflow and activities as one Temporal plugin.

    Without ``deps`` it is a client-side plugin (converter and tracing) that also registers
    the workflow on workers, for replayers and for workers that leave Keel's activities to
    another fleet; with ``deps`` the worker runs Keel's activities too.
    """

    def __init__(
        self,
        deps: Deps | None = None,
        *,
        tracing: bool | None = None,
        close_deps: bool = False,
    ) -> None:
        """Build the plugin.

        Args:
            deps: The clients Keel's activities use (``registry.build_deps``).
            tracing: OpenTelemetry tracing; by default when the ``OTEL_*`` variables ask for it.
            close_deps: Close ``deps`` when the last worker running this plugin stops (for a
                plugin that owns them; ``keel worker`` shares one set across its queues and
                closes them itself).
        """
        self.deps = deps
        activities = build_activities(deps) if deps is not None else []
        self._close_deps = close_deps and deps is not None
        self._running = 0
        interceptors = [*INTERCEPTORS, *tracing_interceptors(tracing)]
        self.tracing = len(interceptors) > len(INTERCEPTORS)
        super().__init__(
            "keel.KeelPlugin",
            data_converter=keel_converter,
            interceptors=interceptors,
            workflows=_append_missing(WORKFLOWS),
            activities=_append_missing(activities) if activities else None,
            run_context=self._run_context,
        )

    def configure_client(self, config: ClientConfig) -> ClientConfig:
        """See base class; interceptors of one type are kept once."""
        config = super().configure_client(config)
        if "interceptors" in config:
            config["interceptors"] = unique_by_type(config["interceptors"])
        return config

    def configure_worker(self, config: WorkerConfig) -> WorkerConfig:
        """See base class; interceptors of one type are kept once."""
        config = super().configure_worker(config)
        if "interceptors" in config:
            # The worker also runs its client's interceptors that are worker interceptors: a
            # tracing interceptor from a Keel plugin on the client must not be added twice.
            on_client = {
                type(i) for i in config["client"].config(active_config=True).get("interceptors", [])
            }
            config["interceptors"] = [
                i for i in unique_by_type(config["interceptors"]) if type(i) not in on_client
            ]
        return config

    @asynccontextmanager
    async def _run_context(self) -> AsyncIterator[None]:
        self._running += 1
        try:
            yield
        finally:
            self._running -= 1
            if self._close_deps and self._running == 0 and self.deps is not None:
                await self.deps.aclose()
